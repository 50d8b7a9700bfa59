"""Spawned ranks training a tiny model with Lightning's DDP strategy (gloo, CPU) and ``NoiseScaleCallback``.

The process group already exists (``dist_harness``); ``LOCAL_RANK`` in the environment tells Lightning the
processes were launched from outside, so it joins them instead of launching its own.
"""

import os
import tempfile
from typing import Any

import torch

N = 32  # rows, shuffled and dealt to the ranks by the DistributedSampler Lightning adds
MICRO = 4
LR = 0.2
# (name, source, accumulate_grad_batches, gradient_clip_val)
SCENARIOS = (("auto-1", "auto", 1, None), ("example-1", "example", 1, 0.05), ("auto-2", "auto", 2, 0.05))
# The controller scenario: 2 epochs of 4 batches a rank; accumulation 1 -> 2 at step 2 (2 batches done: safe), then
# 2 -> 4 decided at step 4 (2 batches into epoch 2: not a multiple of 4) and taken at step 5, the epoch's end.
CONTROLLER_MILESTONES = ((16, 4 * MICRO), (40, 8 * MICRO))
CONTROLLER_EPOCHS = 2
CONTROLLER_ACCUMULATION = (1, 1, 2, 2, 2)  # per step, as the safe points allow


def lightning_worker(rank: int, world: int) -> dict[str, Any]:
    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world)})
    import lightning.pytorch as L
    from tests.helpers.frameworks import regression_data, tiny_net
    from tests.helpers.lightning_modules import Regression

    import noisescale as ns
    from noisescale.integrations.lightning import NoiseScaleCallback

    x, y = regression_data(n=N)
    out: dict[str, Any] = {}
    for name, source, accumulation, clip in SCENARIOS:
        rows: list[ns.Measurement] = []
        model = Regression(tiny_net(), LR)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(
                accelerator="cpu",
                devices=world,
                strategy="ddp",
                max_epochs=1,
                accumulate_grad_batches=accumulation,
                gradient_clip_val=clip,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                logger=False,
                default_root_dir=tmp,
                callbacks=[NoiseScaleCallback(source, callbacks=[rows.append])],
            )
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
            trainer.fit(model, loader)
        out[name] = {
            "rows": [m.to_dict(per_layer=False) for m in rows],
            "weights": [p.detach().clone() for p in model.net.parameters()],
        }
    out["controller"] = _controller_run(world, x, y)
    return out


def _controller_run(world: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    import lightning.pytorch as L
    from tests.helpers.frameworks import tiny_net
    from tests.helpers.lightning_modules import Regression

    import noisescale as ns
    from noisescale.integrations.lightning import NoiseScaleCallback

    class Recorder:
        def __init__(self) -> None:
            self.events: list[Any] = []
            self.metrics: list[Any] = []

        def event(self, kind: str, message: str = "", *, step: Any = None, data: Any = None) -> None:
            self.events.append((kind, message, step, data))

        def log(self, step: int, metrics: Any) -> None:
            self.metrics.append((step, dict(metrics)))

    rows: list[ns.Measurement] = []
    run = Recorder()
    ctrl = ns.BatchSizeController(
        "step",
        batch_size=MICRO * world,
        micro_batch=MICRO,
        world_size=world,
        milestones=CONTROLLER_MILESTONES,
        optimizer="later",
        run=run,
    )
    model = Regression(tiny_net(), LR)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy="ddp",
            max_epochs=CONTROLLER_EPOCHS,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            default_root_dir=tmp,
            callbacks=[NoiseScaleCallback("example", callbacks=[rows.append], controller=ctrl)],
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
        trainer.fit(model, loader)
    return {
        "rows": [m.to_dict(per_layer=False) for m in rows],
        "weights": [p.detach().clone() for p in model.net.parameters()],
        "events": run.events,
        "metrics": run.metrics,
        "state": ctrl.state_dict(),
    }
