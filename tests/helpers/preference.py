"""Tiny preference data for TRL's trainers, built offline: a word-level tokenizer and pairs of completions."""

from __future__ import annotations

from typing import Any

import torch

WORDS = 24


def word_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over the words ``w0 .. w23``, with pad and end-of-sequence tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of 4 words; the chosen completion sorts them, the rejected one is random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(0, WORDS, (4,), generator=g).tolist()
        r = torch.randint(0, WORDS, (4,), generator=g).tolist()
        words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        out.append({"prompt": words(p), "chosen": " " + words(sorted(p)), "rejected": " " + words(r)})
    return out


def tiny_llama(seed: int = 0) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=WORDS + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
