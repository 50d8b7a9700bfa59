"""Watch the gradient noise scale of a Hugging Face causal language model, per layer, while it trains.

A tiny Llama is built from its config (nothing is downloaded) and trained on bytes of the Python standard
library's own source.  The ``example`` source measures every parameter exactly: ``LlamaRMSNorm`` is recognised
without registration, and the blocks can be checkpointed.

Run:  python examples/hf_causal_lm.py [--steps 200] [--checkpointing] [--bf16]
      (needs transformers: pip install 'noisescale[hf]')
"""

import argparse
import math
import sys
import time

import torch

import noisescale as ns

try:
    import transformers
except ImportError:
    sys.exit("examples/hf_causal_lm.py needs transformers, which is not installed: pip install 'noisescale[hf]'")
from noisescale.demo.charlm import load_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--checkpointing", action="store_true", help="recompute the decoder blocks in the backward pass")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--every", type=int, default=25, help="print every N steps")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.context,
    )
    model = transformers.LlamaForCausalLM(config)
    if args.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    batch, context = args.batch, args.context
    monitor = ns.GNSMonitor(model, source="example")  # every parameter, exact per-example norms
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; corpus {len(data):,} bytes")

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - context - 1, (batch,))
        ids = torch.stack([data[s : s + context] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        m = monitor.step(batch_size=batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0 or step == args.steps:
            band = f"[{m.b_simple_low:.0f}, {m.b_simple_high:.0f}]" if m.b_simple_high is not None else ""
            noisiest = max(
                (
                    (name, b)
                    for name, layer in m.modules.items()
                    if (b := layer.b_simple) is not None and math.isfinite(b)
                ),
                key=lambda item: item[1],
                default=("-", None),
            )
            print(
                f"step {step:4d}  loss {loss.item():.3f}  B_simple {m.b_simple or float('nan'):7.1f} {band}  "
                f"noisiest module {noisiest[0]} ({noisiest[1] or float('nan'):.0f})  "
                f"{(time.perf_counter() - t0) / step * 1e3:.0f} ms/step"
            )
    monitor.close()


if __name__ == "__main__":
    main()
