"""``NoiseScaleTrainerCallback`` in TRL's ``DPOTrainer``: pairs are the examples, micro-batches of pairs the source."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.preference import pairs, tiny_llama, word_tokenizer

import noisescale as ns
from noisescale.errors import ConfigError

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from noisescale.integrations.huggingface import NoiseScaleTrainerCallback  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def dpo(tmp_path: Path, cb: Any, *, accumulation: int, steps: int = 2) -> Any:
    model = tiny_llama()
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-3,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs(32)),
        processing_class=word_tokenizer(),
        callbacks=[cb],
    )
    trainer.train()
    return trainer


def test_dpo_counts_pairs_and_measures_micro_batches_of_pairs(tmp_path):
    rows: list[ns.Measurement] = []
    cb = NoiseScaleTrainerCallback(callbacks=[rows.append])
    trainer = dpo(tmp_path, cb, accumulation=2)
    assert [m.batch_size for m in rows] == [8, 8]  # 2 micro-batches of 4 pairs (8 rows each)
    assert [m.source for m in rows] == ["microbatch", "microbatch"]
    assert all(m.status == "ok" and m.b_simple is not None for m in rows)
    logged = [h for h in trainer.state.log_history if "noisescale/b_simple" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert logged[0]["noisescale/b_simple"] == rows[0].b_simple


def test_dpo_refuses_per_example_norms_over_rows(tmp_path):
    # the chosen and rejected rows of a pair share one loss term: their gradients are not independent examples
    with pytest.raises(ConfigError, match="loss_couples_examples"):
        dpo(tmp_path, NoiseScaleTrainerCallback(source="example"), accumulation=1, steps=1)


def test_a_trl_version_outside_the_range_fails_at_construction(monkeypatch):
    from noisescale.integrations._versions import FrameworkVersionError

    monkeypatch.setattr(trl, "__version__", "0.9.6")
    with pytest.raises(FrameworkVersionError, match=r"supports trl>=1\.0,<2, found trl 0\.9\.6"):
        NoiseScaleTrainerCallback()
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.raises(FrameworkVersionError, match="pip install"):
        NoiseScaleTrainerCallback()


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 0.5], ids=["no-clip", "clip"])
def test_dpo_same_series_as_the_plain_loop(tmp_path, accumulation, clip):
    """DPOTrainer with the callback against a plain loop that measures with GNSMonitor and computes each micro-batch's
    loss with TRL's own DPO loss, on the micro-batches the trainer drew, in its order."""
    import torch
    from tests.helpers.frameworks import assert_same_series, row

    def build(out: str, model: Any, callbacks: list[Any]) -> Any:
        args = trl.DPOConfig(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
            learning_rate=1e-2,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=clip,
            bf16=False,  # DPOConfig's default trains under bfloat16 autocast; the plain loop runs in float32
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        return trl.DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=datasets.Dataset.from_list(pairs(32)),
            processing_class=word_tokenizer(),
            callbacks=callbacks,
        )

    rows: list[ns.Measurement] = []
    model = tiny_llama()
    plain_model = copy.deepcopy(model)
    trainer = build("a", model, [NoiseScaleTrainerCallback(callbacks=[rows.append])])
    drawn: list[tuple[dict[str, Any], dict[str, Any]]] = []
    compute_loss = trainer.compute_loss

    def recording(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        assert not args
        if model.training and torch.is_grad_enabled():
            drawn.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}, kwargs))
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    assert len(drawn) == 3 * accumulation

    reference = build("b", plain_model, [])  # only its DPO loss (and its reference model) is used
    opt = torch.optim.SGD(plain_model.parameters(), lr=1e-2)
    plain_model.train()
    want = []
    with ns.GNSMonitor(plain_model, loss_couples_examples=True) as monitor:
        for s in range(3):
            micro = drawn[s * accumulation : (s + 1) * accumulation]
            for inputs, kwargs in micro:
                loss = reference.compute_loss(plain_model, inputs, **kwargs)
                if not (trainer.model_accepts_loss_kwargs and kwargs.get("num_items_in_batch") is not None):
                    loss = loss / accumulation  # the Trainer's own rule for when it divides by the accumulation
                loss.backward()
            want.append(row(monitor.step(batch_size=4 * accumulation)))
            if clip:
                torch.nn.utils.clip_grad_norm_(plain_model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    got = [row(m) for m in rows]
    assert_same_series(got, want, rel=1e-6)
    assert {r["status"] for r in got} == ({"ok"} if accumulation == 2 else {"undefined"})
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
