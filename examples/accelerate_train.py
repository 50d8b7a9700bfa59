"""Watch the gradient noise scale of a training loop under Hugging Face Accelerate.

An MLP learns scikit-learn's bundled digits in a loop of our own: ``accelerator.accumulate`` runs the
micro-batches, ``accelerator.sync_gradients`` says when a step's last one has been through backward, and
``AccelerateMonitor`` measures then, with every process's examples.  ``accelerator.save_state`` keeps the
monitor's state with the model's.

Run:  python examples/accelerate_train.py [--accumulate 4] [--epochs 2]
      torchrun --standalone --nproc-per-node 2 examples/accelerate_train.py     # 2 CPU processes (gloo)
      (needs accelerate and scikit-learn: pip install 'noisescale[accelerate,demo]')
"""

import argparse
import sys

import torch
from torch import nn

try:
    from accelerate import Accelerator
    from sklearn.datasets import load_digits

    from noisescale.integrations.accelerate import AccelerateMonitor
except ImportError as e:
    sys.exit(f"examples/accelerate_train.py needs: pip install 'noisescale[accelerate,demo]' ({e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="examples per micro-batch and process")
    ap.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--save", default=None, help="a folder for accelerator.save_state at the end")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    digits = load_digits()
    data = torch.utils.data.TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    gns = AccelerateMonitor(accelerator, model)  # after prepare: DDP's wrapper under several processes
    accelerator.register_for_checkpointing(gns)  # accelerator.save_state / load_state keep its state

    for _ in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                m = gns.after_backward(len(x))  # a Measurement after the step's last micro-batch, else None
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # after the measurement: changes nothing
                optimizer.step()
                optimizer.zero_grad()
            if m is not None:
                gns.log({"loss": loss.detach()})  # to the sinks (a run store, alerts), without waiting
                if m.step % 10 == 0 and accelerator.is_main_process:
                    b = "undefined" if m.b_simple is None else f"{m.b_simple:.0f}"
                    band = "" if m.b_simple_high is None else f" [{m.b_simple_low:.0f}, {m.b_simple_high:.0f}]"
                    print(f"step {m.step:4d}  batch {m.batch_size}  B_simple {b}{band}  ({m.source})", flush=True)
    if args.save:
        accelerator.save_state(args.save)
    gns.close()


if __name__ == "__main__":
    main()
