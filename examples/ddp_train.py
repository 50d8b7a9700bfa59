"""Measure the gradient noise scale while training with DistributedDataParallel.

The default source, "rank", reads each rank's local gradient as DDP receives it, just before the all-reduce:
the ranks are the small batches and the averaged gradient is the big one, so it costs almost nothing.

    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py                  # CPU, gloo
    torchrun --standalone --nproc-per-node 8 examples/ddp_train.py                  # 8 GPUs, NCCL
    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py --source=example # per-example norms

Override any setting below with --name=value.
"""

import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import noisescale as ns

# -----------------------------------------------------------------------------
# settings
batch_size = 128  # examples per optimizer step, all ranks and micro-batches together
accum_steps = 2  # micro-batches per rank and step (the first ones under no_sync)
max_steps = 300
lr = 1e-3
source = "rank"  # "rank" (free), "example" (per-example norms), "microbatch" (per micro-batch)
log_every = 25
seed = 1337
for arg in sys.argv[1:]:  # --name=value overrides, nanoGPT style
    name, value = arg.removeprefix("--").split("=")
    assert name in globals(), f"unknown setting {name}"
    globals()[name] = type(globals()[name])(value)
# -----------------------------------------------------------------------------

# one process per device: NCCL on GPUs, gloo on CPUs
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
if backend == "nccl":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
master = rank == 0  # only rank 0 prints
assert batch_size % (world * accum_steps) == 0, "batch_size must split evenly over ranks and micro-batches"
local_batch = batch_size // world
torch.manual_seed(seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)


# data: sklearn's 8x8 digits if installed, else a synthetic stand-in of the same shape
def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    except ImportError:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1797, 64, generator=g)
        y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    return x.to(device), y.to(device)


x_all, y_all = load_data()


def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # each rank draws its own local_batch examples: together they are the step's batch_size
    g = torch.Generator().manual_seed(seed + step * world + rank)
    idx = torch.randint(len(x_all), (local_batch,), generator=g).to(device)
    return x_all[idx], y_all[idx]


# model and optimizer
model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 10)).to(device)
model = DDP(model, device_ids=[device.index] if backend == "nccl" else None)
optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

# the monitor: hooks the parameters (source="rank", DDP's all-reduce untouched), or the layers (source="example")
monitor = ns.GNSMonitor(model, source=source)


def fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.1f}"


t0 = time.perf_counter()
for step in range(max_steps):
    x, y = get_batch(step)
    for k, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
        last = k == accum_steps - 1
        with contextlib.nullcontext() if last else model.no_sync():  # all-reduce once, on the last micro-batch
            loss = F.cross_entropy(model(xm), ym) / accum_steps
            loss.backward()
    m = monitor.step(batch_size=batch_size)  # after backward, before clipping; the same numbers on every rank
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # every rank reads the same measurement, so a decision taken from it (grow the batch, ...) agrees everywhere
    if step % log_every == 0 or step == max_steps - 1:
        b, low, high = m.b_simple, m.b_simple_low, m.b_simple_high  # reading syncs with the device once
        if master:
            dt = (time.perf_counter() - t0) / (step + 1) * 1000
            print(
                f"step {step:4d} | loss {loss.item() * accum_steps:.3f} | B_simple {fmt(b)} [{fmt(low)}, {fmt(high)}]"
                f" | this step {fmt(m.b_simple_raw)} | {m.status} | {dt:.1f} ms/step"
            )

if master:
    print(f"done: {world} ranks x {local_batch} examples, source={monitor.source}, B_simple={fmt(m.b_simple)}")
monitor.close()
dist.destroy_process_group()
