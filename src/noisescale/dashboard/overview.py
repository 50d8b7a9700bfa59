"""A run's key numbers for the dashboard, each read with an indexed query (never a scan of every step).

``noisescale.store.summarize`` reads every measurement, which takes seconds on a run of a million steps; these
queries touch the last rows of the primary keys and the metrics index only, so the runs list and a run's first
answer stay fast however long the run.
"""

from __future__ import annotations

import json
import time
from typing import Any

from noisescale.dashboard.catalog import RunFile
from noisescale.store.reader import RunReader

__all__ = ["ALERT_KIND", "CONTROLLER_KIND", "STALE_AFTER_S", "alert_states", "metric_names", "overview", "parse_data"]

ALERT_KIND = "alert"
CONTROLLER_KIND = "controller"
STALE_AFTER_S = 120.0  # a 'running' run with no write for this long: its process has probably stopped
KEY_METRICS = ("loss", "val_loss", "lr")


def metric_names(reader: RunReader) -> list[str]:
    """The metric keys logged so far, by a skip-scan of the ``(key, step)`` index (one seek per key)."""
    rows = reader.query(
        "WITH RECURSIVE k(key) AS (SELECT min(key) FROM metrics UNION ALL "
        "SELECT (SELECT min(key) FROM metrics WHERE key > k.key) FROM k WHERE k.key IS NOT NULL) "
        "SELECT key FROM k WHERE key IS NOT NULL"
    )
    return [str(r[0]) for r in rows]


def parse_data(text: Any) -> Any:
    """An event's ``data`` column: its JSON value, or the text itself if it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def alert_states(reader: RunReader) -> dict[str, Any]:
    """The alerts' latest state per ``(rule, layer)``: those firing or pending now, and how many alert events."""
    latest: dict[tuple[str, str | None], dict[str, Any]] = {}
    n = 0
    for eid, step, message, data in reader.query(
        "SELECT id, step, message, data FROM events WHERE kind = ? ORDER BY id", (ALERT_KIND,)
    ):
        n += 1
        d = parse_data(data)
        d = d if isinstance(d, dict) else {}
        rule = str(d.get("rule", "?"))
        layer = d.get("layer")
        latest[(rule, None if layer is None else str(layer))] = {
            "id": int(eid),
            "step": step,
            "rule": rule,
            "layer": layer,
            "state": d.get("state"),
            "severity": d.get("severity"),
            "message": message,
            "action": d.get("action"),
        }
    active = [a for a in latest.values() if a["state"] in ("firing", "pending")]
    return {
        "events": n,
        "firing": [a for a in active if a["state"] == "firing"],
        "pending": [a for a in active if a["state"] == "pending"],
    }


def overview(reader: RunReader, run: RunFile, *, detail: bool = False) -> dict[str, Any]:
    """The key numbers of one run (``detail`` adds its config, metric names and layer names' count).

    Read inside ``reader.snapshot()`` so every number comes from the same state of the file.
    """
    with reader.snapshot():
        info = reader.info
        last = reader.query(
            "SELECT step, examples, wall_time, batch_size, source, coverage, status, skipped_steps "
            "FROM measurements ORDER BY step DESC LIMIT 1"
        )
        first_step = reader.query("SELECT min(step) FROM measurements")[0][0]
        b = reader.query(
            "SELECT step, b_simple, b_simple_low, b_simple_high FROM measurements "
            "WHERE b_simple IS NOT NULL ORDER BY step DESC LIMIT 1"
        )
        names = metric_names(reader)
        latest_metrics = {}
        for key in KEY_METRICS:
            if key in names:
                r = reader.query(
                    "SELECT step, value FROM metrics WHERE key = ? ORDER BY step DESC, id DESC LIMIT 1", (key,)
                )
                latest_metrics[key] = {"step": int(r[0][0]), "value": r[0][1]} if r else None
            else:
                latest_metrics[key] = None
        alerts = alert_states(reader)
        n_events = int(reader.query("SELECT count(*) FROM events")[0][0])
        n_controller = int(reader.query("SELECT count(*) FROM events WHERE kind = ?", (CONTROLLER_KIND,))[0][0])
        n_layers = int(reader.query("SELECT count(*) FROM layers WHERE kind = 'param'")[0][0])
        n_modules = int(reader.query("SELECT count(*) FROM layers WHERE kind = 'module'")[0][0])
    row = last[0] if last else None
    end = info.ended_at if info.ended_at is not None else info.updated_at
    out: dict[str, Any] = {
        "id": run.id,
        "file": run.file,
        "run_id": info.id,
        "name": info.name,
        "status": info.status,
        "stale": info.status == "running" and time.time() - info.updated_at > STALE_AFTER_S,
        "started_at": info.started_at,
        "updated_at": info.updated_at,
        "ended_at": info.ended_at,
        "duration_s": max(0.0, end - info.started_at),
        "first_step": None if first_step is None else int(first_step),
        "last_step": None if row is None else int(row[0]),
        "examples": None if row is None else int(row[1]),
        "batch_size": None if row is None else int(row[3]),
        "source": None if row is None else row[4],
        "coverage": None if row is None else row[5],
        "skipped_steps": 0 if row is None else int(row[7]),
        "b_simple": (
            {"step": int(b[0][0]), "value": b[0][1], "low": b[0][2], "high": b[0][3]}
            if b
            else {"step": None, "value": None, "low": None, "high": None}
        ),
        "loss": latest_metrics["loss"],
        "val_loss": latest_metrics["val_loss"],
        "lr": latest_metrics["lr"],
        "alerts": alerts,
        "events": n_events,
        "controller_decisions": n_controller,
        "layers": n_layers,
    }
    if detail:
        out["config"] = info.config
        out["metrics"] = names
        out["modules"] = n_modules
        out["noisescale_version"] = info.noisescale_version
        out["host"] = info.host
        out["schema_version"] = info.schema_version
    return out
