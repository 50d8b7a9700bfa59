"""Alerts on a small MLP trained on scikit-learn's digits, with one bad data shard in the middle.

Run:  python examples/alerts_bad_shard.py   (needs scikit-learn: pip install 'noisescale[demo]')
      python examples/alerts_bad_shard.py --clean --steps 800 --batch-size 8   (no bad shard, another batch)

From step 401 to 500 the labels are random, as if a mislabelled shard had slipped into the data. The noise scale
of the whole model and of most layers moves by more than 3x within 10 steps, and the `noise_jump` alert fires
with its suggested action; the alerts go to the Python log and into the run store as events.
"""

import argparse
import logging
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

import noisescale as ns

logging.basicConfig(level=logging.INFO, format="%(message)s")  # the alerts' log channel writes here
parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--steps", type=int, default=700)
parser.add_argument("--clean", action="store_true", help="no bad shard")
args = parser.parse_args()

torch.manual_seed(0)
batch_size, steps, lr = args.batch_size, args.steps, 0.05
bad_shard = range(0) if args.clean else range(401, 501)

digits = load_digits()
x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y_all = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

run = ns.Run("bad-shard", dir=tempfile.mkdtemp())
monitor = ns.GNSMonitor(model, source="example", sinks=[run, ns.alerts.default_rules()])
for step in range(1, steps + 1):
    idx = torch.randint(0, len(x_all), (batch_size,))
    y = torch.randint(0, 10, (batch_size,)) if step in bad_shard else y_all[idx]
    loss = nn.functional.cross_entropy(model(x_all[idx]), y)
    loss.backward()
    m = monitor.step(batch_size=batch_size)
    monitor.log({"loss": loss.detach()})  # the loss-stalled rule reads it
    optimizer.step()
    optimizer.zero_grad()
    if step % 100 == 0:
        band = f"[{m.b_simple_low:.1f}, {m.b_simple_high:.1f}]"
        print(f"step {step}  loss {loss.item():.3f}  B_simple {m.b_simple:.1f} {band}")
monitor.close()

with ns.open_run(run.path) as reader:
    alerts = [e for e in reader.events() if e["kind"] == "alert"]
print(f"{len(alerts)} alert events recorded in {run.path}:")
for e in alerts:
    print(f"  step {e['step']:4d}  {e['data']['state']:8s} {e['data']['rule']:20s} {e['data']['layer'] or ''}")
