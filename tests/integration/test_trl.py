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
