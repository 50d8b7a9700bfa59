"""``noisescale data RUN``: which groups (data sources) and which examples make a run's gradient noise."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from noisescale.cli.args import positive_int
from noisescale.cli.format import dumps_json, fmt_num, table

__all__ = ["groups_table", "register", "run", "text_report"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "data",
        help="which data sources and examples make the noise",
        description="From a run measured with monitor.step(groups=..., example_ids=...): each group's share of "
        "tr(Sigma), its own B_simple and its alignment with the batch's gradient at the last step, then the "
        "examples whose squared gradient norms stay large (their score over the step's mean, averaged over the "
        "sampled steps), and how many of them each group holds. RUN is a run file, or a run id or name in --dir.",
    )
    p.add_argument("run", metavar="RUN", help="run file path, run id, or run name")
    p.add_argument("--dir", default="runs", help="folder to look RUN up in (default: ./runs)")
    p.add_argument("--top", type=positive_int, default=None, help="examples to list (default: 5%% of those scored)")
    p.add_argument("--since", type=int, default=0, metavar="STEP", help="use scores from this step on (default: all)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.store import open_run
    from noisescale.store.data_summary import data_summary

    with open_run(args.run, dir=args.dir) as reader:
        summary = data_summary(reader, top=args.top, since_step=args.since)
    if args.json:
        sys.stdout.write(dumps_json(summary) + "\n")
    else:
        print(text_report(summary))
    return 0


def _band(v: dict[str, Any], key: str) -> str:
    return f"{fmt_num(v.get(key))} [{fmt_num(v.get(key + '_low'))}, {fmt_num(v.get(key + '_high'))}]"


def groups_table(groups: dict[Any, dict[str, Any]]) -> str:
    """The groups' share of tr(Sigma), own B_simple and alignment, with bands, one row each."""
    rows = [
        [
            str(g),
            str(v.get("examples", "-")),
            _band(v, "share"),
            _band(v, "b_simple"),
            "-" if v.get("grad_sq") is None else f"{v['grad_sq']:.3g}",
            _band(v, "alignment"),
        ]
        for g, v in groups.items()
    ]
    header = ["group", "examples", "share of tr(Sigma)", "B_simple", "|G|^2", "alignment"]
    return table(header, rows, right=[True, True, False, False, True, False])


def text_report(s: dict[str, Any]) -> str:
    run = s["run"]
    lines = [f"run       {run['name']}  ({run['id']})", f"file      {run['path']}"]
    if s["groups"]:
        step = next(iter(s["groups"].values()))["step"]
        lines += ["", f"groups at step {step} (examples: in that step)", groups_table(s["groups"])]
    else:
        lines += ["", "no groups recorded (pass monitor.step(groups=ids) to measure each data source's noise)"]
    if not s["top"]:
        lines += ["", "no per-example scores recorded (pass monitor.step(example_ids=ids); see score_every)"]
        return "\n".join(lines)
    since = f" from step {s['since_step']}" if s["since_step"] else ""
    lines += [
        "",
        f"examples with persistently large gradients: the top {len(s['top'])} of {s['scored_examples']:,} scored "
        f"over {s['score_steps']} sampled steps{since}",
        "(relative: the example's squared gradient norm over its step's mean, averaged; top 10%: how often it was "
        "in its step's top tenth)",
    ]
    flipped = "label_noise" in s
    header = ["rank", "example", "group", "relative", "top 10%", "steps", *(["flipped"] if flipped else [])]
    rows = [
        [
            str(i),
            str(r["example"]),
            "-" if r["group"] is None else str(r["group"]),
            f"{r['relative']:.2f}",
            f"{100 * r['top_decile']:.0f}%",
            str(r["steps"]),
            *((["yes" if r.get("label_flipped") else ""]) if flipped else []),
        ]
        for i, r in enumerate(s["top"], start=1)
    ]
    lines.append(table(header, rows, right=[True, True, True, True, True, True, False][: len(header)]))
    if len(s["top_by_group"]) > 1 or "-" not in s["top_by_group"]:
        parts = ", ".join(f"group {g}: {n}" for g, n in sorted(s["top_by_group"].items()))
        lines += ["", f"the top list by group: {parts}"]
    if flipped:
        ln = s["label_noise"]
        lines += [
            "",
            f"the run flipped {ln['flipped']} labels on purpose: {ln['in_top']} of the top {len(s['top'])} are among "
            f"them (precision {ln['precision']:.2f}, recall {ln['recall']:.2f})",
        ]
    return "\n".join(lines)
