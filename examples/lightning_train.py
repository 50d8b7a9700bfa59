"""Watch the gradient noise scale of a Lightning run: one callback, nothing else changes.

An MLP learns scikit-learn's bundled digits with ``lightning.pytorch``.  ``NoiseScaleCallback`` measures B_simple
at every optimizer step (all micro-batches of ``accumulate_grad_batches``, all DDP processes), adds it to the
trainer's logs every ``log_every_n_steps``, records every step in a run store and raises alerts.  With
``--adaptive`` it also drives the batch: an ``ns.BatchSizeController`` chooses how many micro-batches make a step
(``accumulate_grad_batches``, changed at Lightning's safe points) and scales the learning rate by AdaScale's gain.

Run:  python examples/lightning_train.py [--accumulate 4 | --adaptive] [--devices 2] [--epochs 3]
      (needs lightning and scikit-learn: pip install 'noisescale[lightning,demo]')
      then: noisescale show runs/   (or noisescale report RUN -o report.html)
"""

import argparse
import sys

import torch
from torch import nn

import noisescale as ns

try:
    import lightning.pytorch as L
    from sklearn.datasets import load_digits

    from noisescale.integrations.lightning import NoiseScaleCallback
except ImportError as e:
    sys.exit(
        f"examples/lightning_train.py needs lightning and scikit-learn: pip install 'noisescale[lightning,demo]' ({e})"
    )


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="examples per micro-batch and process")
    ap.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    ap.add_argument("--devices", type=int, default=1, help="CPU processes (DDP over gloo when > 1)")
    ap.add_argument("--runs", default="runs", help="folder of the run store")
    ap.add_argument("--every", type=int, default=25, help="print every N steps")
    ap.add_argument("--adaptive", action="store_true", help="let the controller choose the accumulation and lr")
    args = ap.parse_args()
    if args.adaptive and args.accumulate != 1:
        ap.error("--adaptive chooses the accumulation itself: leave --accumulate at 1")

    L.seed_everything(0, verbose=False)
    digits = load_digits()
    data = torch.utils.data.TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)

    def report(m: ns.Measurement) -> None:  # called on the monitor's background thread, once per step
        if m.step % args.every == 0:
            band = "" if m.b_simple_high is None else f" [{m.b_simple_low:.0f}, {m.b_simple_high:.0f}]"
            b = "undefined" if m.b_simple is None else f"{m.b_simple:.0f}"
            print(f"step {m.step:4d}  batch {m.batch_size}  B_simple {b}{band}  ({m.source})", flush=True)

    controller = None
    if args.adaptive:
        step_batch = args.batch * args.devices  # one micro-batch on every process
        controller = ns.BatchSizeController(
            "gns",
            micro_batch=args.batch,
            world_size=args.devices,
            min_batch=step_batch,
            max_batch=8 * step_batch,
            quantize="pow2",
            dwell=2_000,  # examples between two changes: early estimates are noisy
            lr_rule="adascale",  # the learning rate below is tuned for one micro-batch a step
            optimizer="later",  # the callback attaches the optimizer Lightning creates
        )
    noise = NoiseScaleCallback(
        "example" if args.adaptive else "auto",  # micro-batches measure nothing at one per step
        controller=controller,
        run=args.runs,  # a run store, written by global rank 0
        run_name="lightning-digits",
        run_config=vars(args),
        sinks=[ns.alerts.default_rules()],  # alerts, logged and recorded in the run
        callbacks=[report] if args.devices == 1 else [],
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,  # clipping comes after the measurement: it changes nothing measured
        log_every_n_steps=10,  # noisescale/b_simple, noisescale/band/low, ... join the loggers at this cadence
        callbacks=[noise],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsMLP(lr=0.05), loader)
    if trainer.is_global_zero:
        print(f"{noise.monitor.step_count} steps measured ({noise.monitor.source} source); run store {noise.run.path}")
        if controller is not None:
            print(f"controller: {controller.state.changes} batch changes, now {controller.batch_size} examples a step")


if __name__ == "__main__":
    main()
