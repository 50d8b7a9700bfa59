"""Tiny Hugging Face language models, randomly initialised: the ``example`` source covers them exactly.

Llama and Qwen2 bring hand-written RMSNorms, GPT-2 its transposed-weight ``Conv1D`` and an embedding tied to the
output head, GPT-NeoX plain ``Linear`` and ``LayerNorm``.  Per-example squared norms are checked against
``torch.func`` per-example gradients of the same model.  Needs ``transformers`` (in the ``dev`` extra); nothing
is downloaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.helpers.reference import torch_func_sq_norms
from torch import nn

import noisescale as ns
from noisescale.collectors.example import ExampleCollector

T = pytest.importorskip("transformers")

VOCAB, B, LENGTH = 50, 4, 12
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _models() -> dict[str, Callable[[], nn.Module]]:
    eager: dict[str, Any] = {"attn_implementation": "eager"}
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2, **eager)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2, **eager)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, **eager)),
        "gpt2": lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
                **eager,
            )
        ),
    }


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _models()[name]().double().train()


def _torch_func_sq_norms(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each example's share of the batch loss's squared gradient norm (``tests.helpers.reference``)."""
    return torch_func_sq_norms(model, batch)


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, LENGTH), generator=torch.Generator().manual_seed(seed))
    # One row of positions per example: GPT-2's own (1, T) positions are broadcast over the batch.
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(LENGTH).expand(B, LENGTH)}


@pytest.mark.parametrize("name", list(_models()))
def test_per_example_norms_match_torch_func(name: str) -> None:
    model = _build(name)
    collector = ExampleCollector(model, keep_per_example=True)
    assert collector.coverage == 1.0
    batch = _inputs(1)
    model(**batch).loss.backward()  # the mean over the batch's tokens: example i's share is its mean loss / B
    got = collector.per_example_sq_norms()
    collector.close()

    expected = _torch_func_sq_norms(model, batch)
    assert set(got) == set(expected)
    for pname, want in expected.items():
        # Llama's and Qwen2's RMSNorms normalise in float32 even in a float64 model.
        torch.testing.assert_close(got[pname], want, rtol=1e-6, atol=1e-12 * float(want.max()), msg=pname)


@pytest.mark.parametrize("name", list(_models()))
def test_monitor_measures_a_training_run(name: str) -> None:
    model = _build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ns.GNSMonitor(model, source="example") as monitor:
        for step in range(3):
            model(**_inputs(step)).loss.backward()
            m = monitor.step(batch_size=B)
            opt.step()
            opt.zero_grad()
        assert m.status == "ok" and m.coverage == 1.0
        assert m.trace_cov_raw is not None and m.trace_cov_raw > 0 and math.isfinite(m.trace_cov_raw)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_measurement(use_reentrant: bool) -> None:
    """Activation checkpointing of the decoder blocks: their activations are recomputed in the backward pass."""

    def measure(checkpointing: bool) -> list[float | None]:
        model = _build("llama")
        if checkpointing:
            kwargs = {"use_reentrant": use_reentrant}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        with ns.GNSMonitor(model, source="example") as monitor:
            model(**_inputs(3)).loss.backward()
            m = monitor.step(batch_size=B)
        assert len(calls) == (2 if checkpointing else 1)  # checkpointed: recomputed in the backward pass
        return [m.grad_sq_raw, m.trace_cov_raw, *(layer.trace_cov_raw for layer in m.layers.values())]

    plain = measure(False)
    assert all(v is not None for v in plain)
    assert measure(True) == pytest.approx(plain, rel=1e-9)


def test_bert_masked_lm_is_covered_but_for_its_twice_registered_bias() -> None:
    """BERT's LM head registers its decoder bias twice: refused as shared, left out with ``on_unsupported``."""
    torch.manual_seed(0)
    config = T.BertConfig(
        **SMALL,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = T.BertForMaskedLM(config).double().train()
    with pytest.raises(ns.SharedParameterError, match=r"parameter shared by \['cls.predictions.bias'"):
        ExampleCollector(model)
    collector = ExampleCollector(model, on_unsupported="ignore", keep_per_example=True)
    left_out = {n for n, _ in model.named_parameters()} - {n for n, _ in collector.params}
    assert left_out == {"cls.predictions.bias"} and collector.coverage > 0.99
    batch = _inputs(2)
    model(**batch).loss.backward()
    got = collector.per_example_sq_norms()
    collector.close()

    expected = _torch_func_sq_norms(model, batch)
    # The key biases' gradients are zero but for rounding (softmax ignores a shift shared by every key): an
    # absolute tolerance on the scale of the whole model's norms.
    scale = max(float(v.max()) for v in expected.values())
    for pname, g in got.items():
        torch.testing.assert_close(g, expected[pname], rtol=1e-6, atol=1e-12 * scale, msg=pname)
