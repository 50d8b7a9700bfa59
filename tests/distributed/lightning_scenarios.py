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
    return out
