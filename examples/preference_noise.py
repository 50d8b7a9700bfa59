"""Preference tuning with noisy labels: how flipped preferences raise the gradient noise scale.

A tiny causal language model (a Llama built from its config; nothing is downloaded) is tuned with TRL's
``DPOTrainer`` on synthetic preference pairs: the prompt is four words, the chosen completion sorts them, the
rejected one is four random words.  A fraction of the pairs (0%, 10%, 30%) has its labels flipped, as when
annotators disagree.  ``NoiseScaleTrainerCallback`` measures B_simple over micro-batches of pairs (two rows of a
forward pass are one example, and the DPO loss couples them, so per-row norms would be wrong).

What to expect: at the start, where the policy equals the reference, every pair's gradient is the same direction
times a sign, and a flipped label flips the sign.  The mean gradient shrinks by ``1 - 2p`` while its spread stays,
so B_simple = tr(Sigma) / |G|^2 grows by about ``1 / (1 - 2p)^2``: 1.56x at 10%, 6.25x at 30%.  The batch that
uses examples and steps best (McCandlish et al. 2018) grows with it.

Run:  python examples/preference_noise.py [--steps 60] [--flips 0,0.1,0.3] [--plot preference_noise.png]
      (needs TRL: pip install 'noisescale[trl]'; matplotlib for the plot: pip install 'noisescale[report]')
"""

import argparse
import copy
import logging
import math
import os
import statistics
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be fetched

import torch

import noisescale as ns

try:
    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    from noisescale.integrations.huggingface import NoiseScaleTrainerCallback
except ImportError as e:
    sys.exit(f"examples/preference_noise.py needs TRL: pip install 'noisescale[trl]' ({e})")

WORDS = 16  # vocabulary: w0 .. w15, plus padding, end of sequence, unknown


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def preference_pairs(n: int, flip: float, seed: int) -> datasets.Dataset:
    """Pairs whose chosen completion sorts the prompt; a fraction ``flip`` has chosen and rejected swapped."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(0, WORDS, (4,), generator=g).tolist()
        good, bad = sorted(prompt), torch.randint(0, WORDS, (4,), generator=g).tolist()
        if torch.rand((), generator=g).item() < flip:  # the annotator got this one backwards
            good, bad = bad, good
        words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        rows.append({"prompt": words(prompt), "chosen": " " + words(good), "rejected": " " + words(bad)})
    return datasets.Dataset.from_list(rows)


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # the same starting model for every flip rate
    config = transformers.LlamaConfig(
        vocab_size=WORDS + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config)


def tune(flip: float, args: argparse.Namespace) -> list[ns.Measurement]:
    """DPO on pairs with ``flip`` of the labels flipped; every step's measurement."""
    measured: list[ns.Measurement] = []
    noise = NoiseScaleTrainerCallback(callbacks=[measured.append])  # DPOConfig: pairs, micro-batches of pairs
    model = tiny_llama()
    pairs_needed = args.steps * args.batch * args.accumulate
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,  # pairs per micro-batch
            gradient_accumulation_steps=args.accumulate,  # micro-batches per step: the small batches
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            beta=0.1,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=config,
            train_dataset=preference_pairs(pairs_needed, flip, seed=args.seed),
            processing_class=tokenizer(),
            callbacks=[noise],
        )
        trainer.remove_callback(transformers.PrinterCallback)  # the logs (with noisescale/b_simple) stay in state
        trainer.train()
    return measured


def pooled(measured: list[ns.Measurement]) -> float | None:
    """B_simple over a span of steps: the mean of the steps' unbiased tr(Sigma) over the mean of their |G|^2.

    Each step's two estimates are unbiased, so their means are too; the ratio is taken once, at the end (a mean of
    per-step ratios would be dominated by the steps whose |G|^2 estimate came out near zero).  ``inf`` when the
    mean |G|^2 is not above zero: the signal is too weak for steps of this size to see at all.
    """
    steps = [m for m in measured if m.status == "ok" and m.grad_sq_raw is not None and m.trace_cov_raw is not None]
    if not steps:
        return None
    grad_sq = statistics.fmean(m.grad_sq_raw for m in steps)
    trace = statistics.fmean(m.trace_cov_raw for m in steps)
    return trace / grad_sq if grad_sq > 0 else math.inf


def summary(measured: list[ns.Measurement]) -> dict[str, float | None]:
    """B_simple pooled over the first and the second half of the run, and the monitor's smoothed last value."""
    half = len(measured) // 2
    last = measured[-1]
    return {
        "early": pooled(measured[:half]),
        "late": pooled(measured[half:]),
        "last": last.b_simple,
        "low": last.b_simple_low,
        "high": last.b_simple_high,
    }


def plot(series: dict[float, list[ns.Measurement]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot: matplotlib is not installed; pip install 'noisescale[report]' to write {path})")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [m.b_simple for ms in series.values() for m in ms if m.b_simple is not None and math.isfinite(m.b_simple)]
    top, bottom = 10 * max(values, default=10.0), min(values, default=10.0) / 10
    nan = float("nan")
    for flip, measured in series.items():
        steps = [m.step for m in measured]
        b = [nan if m.b_simple is None else min(m.b_simple, top) for m in measured]  # undefined: gaps, not zeros
        line = ax.plot(steps, b, label=f"{flip:.0%} flipped")
        # the band's upper edge is unbounded where |G|^2 cannot be told from zero: drawn to the top of the chart
        low = [nan if m.b_simple_low is None else max(m.b_simple_low, bottom) for m in measured]
        high = [nan if m.b_simple_high is None else min(m.b_simple_high, top) for m in measured]
        ax.fill_between(steps, low, high, color=line[0].get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("B_simple (pairs)")
    ax.set_title("DPO on synthetic preferences: flipped labels raise the noise scale")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flips", default="0,0.1,0.3", help="fractions of flipped labels, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="preference_noise.png", help="PNG to write ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tensors this small only pay for the synchronisation of more threads
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    datasets.disable_progress_bars()

    flips = [float(f) for f in args.flips.split(",")]
    batch = args.batch * args.accumulate
    series = {}
    for flip in flips:
        series[flip] = tune(flip, args)
        print(f"tuned with {flip:.0%} of the labels flipped: {len(series[flip])} steps of {batch} pairs", flush=True)

    base = summary(series[flips[0]])
    print()
    print(f"B_simple in pairs, over steps of {batch} pairs in {args.accumulate} micro-batches (the small batches)")
    print("flipped   first half  x vs first  1/(1-2p)^2  second half  x vs first  last (smoothed) [band]")
    for flip in flips:
        s = summary(series[flip])
        theory = 1 / (1 - 2 * flip) ** 2 if flip < 0.5 else float("inf")
        ratio_e = s["early"] / base["early"] if s["early"] is not None and base["early"] else None
        ratio_l = s["late"] / base["late"] if s["late"] is not None and base["late"] else None
        print(
            f"{flip:>7.0%}  {_f(s['early']):>11}  {_x(ratio_e):>10}  {theory:>9.2f}x  {_f(s['late']):>11}  "
            f"{_x(ratio_l):>10}  {_f(s['last'])} [{_f(s['low'])}, {_f(s['high'])}]"
        )
    worst = summary(series[flips[-1]])
    if worst["late"] and base["late"] and math.isfinite(base["late"]):
        k = worst["late"] / base["late"]
        if math.isfinite(k):
            print(
                f"\nWith {flips[-1]:.0%} flipped labels the noise scale is {k:.1f}x that with {flips[0]:.0%}: a batch "
                f"{k:.1f}x larger gives the same balance of steps and examples (McCandlish et al. 2018: the steps "
                "needed fall as 1 + B_simple/B, the examples grow as 1 + B/B_simple)."
            )
        else:
            print(
                f"\nWith {flips[-1]:.0%} flipped labels the mean gradient of the second half cannot be told from "
                f"zero in steps of {batch} pairs (its estimate is not above 0): B_simple is beyond what this batch "
                "can measure, and far beyond the batch itself."
            )
    if args.plot:
        plot(series, args.plot)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"  # inf prints as "inf": |G|^2 could not be told from zero


def _x(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}x"


if __name__ == "__main__":
    main()
