"""Groups and per-example scores in the run store, and ``noisescale show`` / ``data`` / ``report`` reading them."""

from __future__ import annotations

import json
import math
import sqlite3
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale as ns
from noisescale.cli.main import main
from noisescale.group_types import GROUP_FIELDS
from noisescale.store.data_summary import LABEL_NOISE_EVENT, default_top
from noisescale.store.schema import MIGRATIONS, apply_migrations

STEPS = 12
B = 16


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """A small MLP run with two groups and every example scored; returns (path, measurements)."""
    root = tmp_path_factory.mktemp("groups")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    flipped = [3, 5, 7]
    measured = []
    with ns.Run("groups", dir=root / "runs") as run:
        run.event(LABEL_NOISE_EVENT, "3 labels flipped", data={"flipped": flipped})
        monitor = ns.GNSMonitor(model, source="example", run=run, score_every=1)
        for _ in range(STEPS):
            idx = torch.randperm(64, generator=gen)[:B]
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            m = monitor.step(batch_size=B, groups=idx % 2, example_ids=idx)
            measured.append(m.to_dict(per_layer=False))
            opt.step()
            opt.zero_grad()
        monitor.close()
    return run.path, measured


def test_the_store_keeps_every_group_value_and_score(group_run):
    path, measured = group_run
    with ns.open_run(path) as reader:
        assert reader.group_ids() == [0, 1]
        share = reader.group_series(1, "share")
        assert share.step == list(range(2, STEPS + 1))  # the first step arms the hooks
        want = [measured[s - 1]["groups"][1]["share"] for s in share.step]
        assert share.value == want
        latest = reader.latest_groups()
        assert latest[0]["step"] == STEPS
        assert {c: latest[0][c] for c in GROUP_FIELDS} == {c: measured[-1]["groups"][0][c] for c in GROUP_FIELDS}
        assert reader.score_steps() == STEPS - 1
        with pytest.raises(ns.StoreError, match="unknown group column"):
            reader.group_series(0, "nope")


def test_scored_examples_are_the_mean_relative_score(group_run):
    path, measured = group_run
    rel: dict[int, list[float]] = {}
    top: dict[int, list[bool]] = {}
    for d in measured:
        sc = d.get("example_scores")
        if sc is None:
            continue
        mean = statistics.mean(sc["scores"])
        ranked = sorted(sc["scores"])
        for i, s in zip(sc["ids"], sc["scores"], strict=True):
            rel.setdefault(i, []).append(s / mean)
            # percent_rank: (rank - 1) / (n - 1) over the step's scores, in the step's top tenth
            top.setdefault(i, []).append(ranked.index(s) / (len(ranked) - 1) >= 0.9)
    with ns.open_run(path) as reader:
        rows = reader.scored_examples()
    assert len(rows) == len(rel) == reader_count(path)
    for r in rows:
        assert math.isclose(r["relative"], statistics.mean(rel[r["example"]]), rel_tol=1e-9)
        assert math.isclose(r["top_decile"], statistics.mean(top[r["example"]]), rel_tol=1e-9)
        assert r["group"] == r["example"] % 2
    assert [r["relative"] for r in rows] == sorted((r["relative"] for r in rows), reverse=True)


def reader_count(path):
    with ns.open_run(path) as reader:
        return reader.scored_example_count()


def test_data_show_and_report_read_the_groups(group_run, tmp_path, capsys):
    path, _ = group_run
    assert main(["data", str(path), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "share of tr(Sigma)" in out and "alignment" in out
    assert "the top 5 of" in out and "precision" in out
    assert main(["data", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["groups"]) == {"0", "1"} and len(doc["top"]) == default_top(doc["scored_examples"])
    ln = doc["label_noise"]
    hits = sum(r["example"] in (3, 5, 7) for r in doc["top"])
    assert ln["in_top"] == hits and ln["flipped"] == 3
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"groups at step {STEPS}" in out
    assert main(["show", str(path), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["groups"]) == {"0", "1"}
    report = tmp_path / "r.html"
    assert main(["report", str(path), "-o", str(report)]) == 0
    page = report.read_text()
    assert "Data sources and examples" in page and "share of tr(Sigma) by group" in page


def test_a_run_without_groups_says_how_to_get_them(tmp_path, capsys):
    with ns.Run("plain", dir=tmp_path) as run:
        run.log(1, {"loss": 1.0})
    assert main(["data", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "groups=ids" in out and "example_ids=ids" in out


def test_a_file_of_the_previous_schema_reads_with_no_groups(tmp_path, capsys):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn, MIGRATIONS[:4])
    conn.execute(
        "INSERT INTO run (id, name, started_at, updated_at, ended_at, status, config, noisescale_version) "
        "VALUES ('x', 'old', 0, 0, 0, 'finished', '{}', '0.1')"
    )
    conn.close()
    with ns.open_run(path) as reader:
        assert reader.schema_version == 4
        assert reader.group_ids() == [] and reader.latest_groups() == {} and reader.scored_examples() == []
    assert main(["data", str(path)]) == 0
    assert main(["show", str(path)]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_noisy_labels_demo_puts_the_flipped_examples_on_top(tmp_path, capsys):
    assert main(["demo", "--noisy-labels", "0.05", "--steps", "150", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "flipped labels: 75 of the training examples" in out
    (path,) = tmp_path.glob("*.sqlite")
    assert main(["data", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["top"]) == 75 and doc["label_noise"]["precision"] >= 0.8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noisy-labels", "1.5"], "fraction of the training labels"),
        (["--task", "charlm", "--noisy-labels", "0.1"], "digits task"),
    ],
)
def test_noisy_labels_demo_refuses_what_it_cannot_do(tmp_path, capsys, args, message):
    assert main(["demo", *args, "--dir", str(tmp_path), "--steps", "2"]) == 1
    assert message in capsys.readouterr().err
