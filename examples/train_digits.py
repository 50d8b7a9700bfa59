"""Train a small MLP on scikit-learn's bundled digits and watch the gradient noise scale.

Run:  python examples/train_digits.py   (needs scikit-learn: pip install 'noisescale[demo]')

B_simple = tr(Sigma)/|G|^2 is the batch size at which gradient noise and signal are equal. It starts small
and grows as the loss falls: a batch that was "large" at the start becomes "small" later on.
"""

import sys
import time

import torch
from torch import nn

import noisescale as ns

try:
    from sklearn.datasets import load_digits
except ImportError:
    sys.exit("examples/train_digits.py needs scikit-learn, which is not installed: pip install 'noisescale[demo]'")

torch.manual_seed(0)
batch_size, steps, lr = 64, 600, 0.05

# data: 1797 8x8 images, 10 classes, shipped inside scikit-learn (no download)
digits = load_digits()
x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y_all = torch.tensor(digits.target)

model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
monitor = ns.GNSMonitor(model, source="example")  # per-example norms: exact, no accumulation needed


def fmt(v):  # a value that is not defined yet (no signal, zero gradient) is None, never a silent 0
    return "undefined" if v is None else f"{v:7.1f}"


t_measure = 0.0
for _ in range(steps):
    idx = torch.randint(0, len(x_all), (batch_size,))
    loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
    loss.backward()

    t0 = time.perf_counter()
    m = monitor.step(batch_size=batch_size)  # after backward, before optimizer.step()
    t_measure += time.perf_counter() - t0

    optimizer.step()
    optimizer.zero_grad()
    if m.step % 50 == 0:  # the monitor counts steps from 1
        print(
            f"step {m.step:4d}  loss {loss.item():.3f}  B_simple {fmt(m.b_simple)} "
            f"[{fmt(m.b_simple_low)}, {fmt(m.b_simple_high)}]  (batch {batch_size})"
        )

print(f"monitor.step() took {1e3 * t_measure / steps:.2f} ms per step on average")
monitor.close()
