"""``NoiseScaleTrainerCallback`` in ``transformers.Trainer``: the plain loop's numbers, logs, checkpoints, versions."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.frameworks import assert_same_series, plain_series, regression_data, row, tiny_net
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError

transformers = pytest.importorskip("transformers")
from noisescale.integrations.huggingface import NoiseScaleTrainerCallback  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

MICRO = 4
LR = 0.2


class Regression(nn.Module):
    """A plain module the Trainer can train: keyword inputs, a dict with the loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(transformers.TrainerCallback):
    """Records the batches the model trains on (in order) and the logs it sees after the noisescale callback."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logs: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
        def record(module: nn.Module, a: Any, kw: dict[str, Any]) -> None:
            if module.training and torch.is_grad_enabled():
                self.batches.append((kw["x"].clone(), kw["labels"].clone()))

        model.register_forward_pre_hook(record, with_kwargs=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


def arguments(tmp_path: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": MICRO,
        "learning_rate": LR,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "num_train_epochs": 1,
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 1,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def train(tmp_path: Path, net: nn.Module, x: torch.Tensor, y: torch.Tensor, cb: Any, **kwargs: Any) -> Recorder:
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=Regression(net), args=arguments(tmp_path, **kwargs), train_dataset=Rows(x, y), callbacks=[cb, recorder]
    )
    trainer.train()
    return recorder


def steps(recorder: Recorder, accumulation: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    b = recorder.batches
    return [b[i : i + accumulation] for i in range(0, len(b), accumulation)]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_same_series_as_the_plain_loop(tmp_path, accumulation, clip):
    x, y = regression_data(n=24)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleTrainerCallback(callbacks=[rows.append])
    recorder = train(tmp_path, net, x, y, cb, gradient_accumulation_steps=accumulation, max_grad_norm=clip)
    # the Trainer shuffles: the plain loop replays the batches it trained on, in its order
    want, plain_net = plain_series(plain_net, steps(recorder, accumulation), lr=LR, clip=clip or None)
    got = [row(m) for m in rows]
    assert_same_series(got, want)
    assert len(got) == 6 // accumulation
    assert {r["source"] for r in got} == {"example" if accumulation == 1 else "microbatch"}
    for a, b in zip(net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adds_the_measurement_to_the_trainers_logs(tmp_path):
    x, y = regression_data(n=32)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleTrainerCallback(callbacks=[rows.append])
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=Regression(tiny_net()),
        args=arguments(tmp_path, logging_steps=2),
        train_dataset=Rows(x, y),
        callbacks=[cb, recorder],
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "noisescale/b_simple" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8]
    by_step = {m.step: m for m in rows}
    for h in logged:
        m = by_step[h["step"]]
        assert h["noisescale/b_simple"] == m.b_simple
        assert h["noisescale/band/high"] == m.b_simple_high
        assert h["noisescale/batch_size"] == MICRO
    # callbacks after this one (the progress printer, your own) see the values in the logs dict itself
    seen = [log for log in recorder.logs if "loss" in log]
    assert len(seen) == 4 and all("noisescale/b_simple" in log for log in seen)


def test_run_store_gets_measurements_loss_and_learning_rate(tmp_path):
    x, y = regression_data(n=16)
    cb = NoiseScaleTrainerCallback(run=tmp_path / "runs", run_name="hf", run_config={"lr": LR})
    train(tmp_path, tiny_net(), x, y, cb)
    assert cb.run.closed
    with ns.open_run(cb.run.path) as reader:
        assert reader.info.status == "finished" and reader.info.config == {"lr": LR}
        assert len(reader.series("b_simple")) == 4
        assert len(reader.metric("loss").value) == 4
        assert reader.metric("lr").value == [LR] * 4


@pytest.mark.parametrize("trainer_restores", [False, True], ids=["callback-restores", "trainer-restores"])
def test_checkpoint_and_resume_continue_exactly(tmp_path, trainer_restores):
    x, y = regression_data(n=24)  # 6 steps; a checkpoint after step 2
    common = {"save_strategy": "steps", "save_steps": 2, "restore_callback_states_from_checkpoint": trainer_restores}

    def run(tag: str, **kwargs: Any) -> tuple[list[ns.Measurement], Any, Any]:
        rows: list[ns.Measurement] = []
        rules = ns.alerts.default_rules(channels=[])
        cb = NoiseScaleTrainerCallback(callbacks=[rows.append], sinks=[rules])
        trainer = transformers.Trainer(
            model=Regression(tiny_net()),
            args=arguments(tmp_path / tag, **common, **kwargs),
            train_dataset=Rows(x, y),
            callbacks=[cb],
        )
        return rows, trainer, rules

    straight, t0, rules0 = run("straight")
    t0.train()
    resumed, t1, rules1 = run("straight")  # same output_dir: resume from its checkpoint-2
    t1.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-2"))

    assert [m.step for m in resumed] == [3, 4, 5, 6]
    assert_same_series([row(m) for m in resumed], [row(m) for m in straight[2:]], rel=1e-12)
    assert rules1.state_dict()["history"] == rules0.state_dict()["history"]


def test_two_callbacks_cannot_be_taken_over(tmp_path):
    keep = [NoiseScaleTrainerCallback(), NoiseScaleTrainerCallback()]
    with pytest.raises(ConfigError, match="found 2 waiting"):
        NoiseScaleTrainerCallback(restored_by_trainer=True)
    assert len(keep) == 2


def test_state_is_json_and_reads_back(tmp_path):
    import json

    x, y = regression_data(n=8)
    cb = NoiseScaleTrainerCallback(sinks=[ns.alerts.default_rules(channels=[])])
    train(tmp_path, tiny_net(), x, y, cb)
    state = cb.state()
    text = json.dumps(state)
    from noisescale.integrations._checkpoint import from_json

    loaded = from_json(json.loads(text)["attributes"]["saved_state"])
    original = cb.monitor.state_dict()
    assert loaded["monitor"]["step_count"] == original["step_count"] == 2
    for key in ("sums", "n"):
        assert torch.equal(loaded["monitor"]["ema"][key], original["ema"][key])
        assert loaded["monitor"]["ema"][key].dtype == torch.float64


def test_multi_process_training_is_refused(tmp_path):
    cb = NoiseScaleTrainerCallback()

    class Args:
        world_size = 2
        n_gpu = 1

    with pytest.raises(ConfigError, match="single-process training"):
        cb.on_train_begin(Args(), None, None, model=Regression(tiny_net()))


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="source must be one of"):
        NoiseScaleTrainerCallback(source="ranks")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="confidence"):
        NoiseScaleTrainerCallback(confidence=2.0)
    with pytest.raises(ConfigError, match="rows_per_example"):
        NoiseScaleTrainerCallback(rows_per_example=0)


def test_a_transformers_version_outside_the_range_fails_at_construction(monkeypatch):
    from noisescale.integrations._versions import FrameworkVersionError

    monkeypatch.setattr(transformers, "__version__", "4.40.2")
    with pytest.raises(FrameworkVersionError, match=r"supports transformers>=4\.45,<6, found transformers 4\.40\.2"):
        NoiseScaleTrainerCallback()
    monkeypatch.setattr(transformers, "__version__", "6.0.0.dev0")
    with pytest.raises(FrameworkVersionError, match="pip install"):
        NoiseScaleTrainerCallback()


def test_values_are_never_nan_in_the_logs(tmp_path):
    # one example per step: the example source cannot estimate; the logs say nothing rather than a made-up number
    x, y = regression_data(n=3)
    cb = NoiseScaleTrainerCallback()
    recorder = train(tmp_path, tiny_net(), x, y, cb, per_device_train_batch_size=1)
    training_logs = [log for log in recorder.logs if "loss" in log]
    assert training_logs and all("noisescale/b_simple" not in log for log in training_logs)
    assert all(log["noisescale/batch_size"] == 1 for log in training_logs)
    assert cb.latest is not None and cb.latest.status == "undefined"
    assert not any(isinstance(v, float) and math.isnan(v) for log in training_logs for v in log.values())


def test_the_accelerators_grad_scaler_reaches_the_monitor():
    # fp16 training on a GPU scales the loss with the GradScaler that accelerate's optimizer wrapper holds; the
    # monitor divides by its scale (no GPU here: the wiring is checked, the unscaling itself in test_monitor)
    scaler = torch.amp.GradScaler("cpu")

    class Optimizer:
        pass

    class Args:
        world_size, n_gpu = 1, 1

    class State:
        global_step, stateful_callbacks = 0, {}

    optimizer = Optimizer()
    optimizer.scaler = scaler  # type: ignore[attr-defined]
    cb = NoiseScaleTrainerCallback()
    cb.on_train_begin(Args(), State(), None, model=Regression(tiny_net()), optimizer=optimizer)
    assert cb.monitor is not None and cb.monitor.scaler is scaler
    cb.on_train_end(Args(), State(), None)


def test_precondition_measures_adams_noise_scale_as_the_plain_loop(tmp_path):
    x, y = regression_data(n=64)
    net = tiny_net()
    plain_net = copy.deepcopy(net)
    rows: list[ns.Measurement] = []
    cb = NoiseScaleTrainerCallback(callbacks=[rows.append], precondition=True)
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=Regression(net),
        args=arguments(tmp_path, optim="adamw_torch", learning_rate=0.01, gradient_accumulation_steps=2),
        train_dataset=Rows(x, y),
        callbacks=[cb, recorder],
    )
    trainer.train()
    opt = torch.optim.AdamW(plain_net.parameters(), lr=0.01, weight_decay=0.0)
    monitor = ns.GNSMonitor(plain_net, "microbatch", precondition=opt)
    want = []
    for step in steps(recorder, 2):
        for xb, yb in step:
            (nn.functional.mse_loss(plain_net(xb), yb) / 2).backward()
        want.append(monitor.step(2 * MICRO))
        opt.step()
        opt.zero_grad()
    assert len(rows) == len(want) == 8 and rows[-1].b_precond is not None
    for got, ref in zip(rows, want, strict=True):
        assert (got.b_precond is None) == (ref.b_precond is None)
        if ref.b_precond is not None:
            assert math.isclose(got.b_precond, ref.b_precond, rel_tol=1e-5)
    logged = [h for h in trainer.state.log_history if "noisescale/b_precond" in h]
    assert logged and logged[-1]["noisescale/b_precond"] == rows[-1].b_precond
