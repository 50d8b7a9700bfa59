"""The OpenAPI 3.1 document of the dashboard's API, served at ``/api/openapi.json``; the tests check every answer
against it.  Numbers that may be infinite (an unbounded band edge) are sent as the strings ``"inf"``/``"-inf"``
(JSON has no infinity); undefined values are ``null``.
"""

from __future__ import annotations

from typing import Any

from noisescale.dashboard.api import DEFAULT_COLUMNS, MAX_LIMIT, MAX_POINTS, PARAMETERS
from noisescale.dashboard.downsample import LAYER_AGGREGATES
from noisescale.store.reader import MEASUREMENT_FIELDS
from noisescale.types import COLUMNS

__all__ = ["openapi_document"]

_INT = {"type": "integer"}
_INT_OR_NULL = {"type": ["integer", "null"]}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


_PARAM_DOCS: dict[str, tuple[dict[str, Any], str]] = {
    "columns": (
        {"type": "string"},
        f"Measurement columns, comma-separated: any of {', '.join(MEASUREMENT_FIELDS)} "
        f"(default: {','.join(DEFAULT_COLUMNS)}; empty: none).",
    ),
    "metrics": (
        {"type": "string"},
        "Logged metrics, comma-separated (default: every metric of the run; empty: none).",
    ),
    "points": (
        {"type": "integer", "minimum": 1, "maximum": MAX_POINTS},
        "At most this many points per series (default 1000), or columns of the heat map (default 200); a longer "
        "series is downsampled to each bucket's minimum and maximum.",
    ),
    "after": ({"type": "integer", "minimum": -1}, "Only rows after this step (series) or this event id (events)."),
    "column": (
        {"type": "string"},
        f"Per layer (layers): one of {', '.join(COLUMNS)}. Compare: a measurement column, one of "
        f"{', '.join(MEASUREMENT_FIELDS)} (default b_simple).",
    ),
    "kind": (
        {"type": "string"},
        "Layers: 'param' (parameter tensors, default) or 'module'. Events: event kinds, comma-separated "
        "(e.g. 'alert,controller'; default all).",
    ),
    "agg": ({"type": "string", "enum": list(LAYER_AGGREGATES)}, "How a bucket of steps is summarised (default max)."),
    "limit": (
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        "At most this many layers (layers, default 100), events (events, default 1000) or new rows (updates and "
        "stream, default 20000: more comes as a reset).",
    ),
    "order": (
        {"type": "string", "enum": ["noisiest", "name", "model"]},
        "Layer order: highest latest value first (default), by name, or in model order.",
    ),
    "step": ({"type": "integer", "minimum": -1}, "Cursor: the last measurement step already seen (default -1)."),
    "metric_id": ({"type": "integer", "minimum": 0}, "Cursor: the last metric row id already seen (default 0)."),
    "event_id": ({"type": "integer", "minimum": 0}, "Cursor: the last event id already seen (default 0)."),
    "runs": ({"type": "string"}, "Run ids, comma-separated (required)."),
    "metric": ({"type": "string"}, "A logged metric to compare instead of a measurement column."),
    "interval": (
        {"type": "number", "minimum": 0.05, "maximum": 60},
        "Seconds between two looks at the file (default 0.5).",
    ),
}

_RUN_PARAM = {
    "name": "run",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The run's id: its file name without '.sqlite' (the file name and the recorded run id also work).",
}


def _params(endpoint: str) -> list[dict[str, Any]]:
    out = []
    for name in PARAMETERS[endpoint]:
        schema, text = _PARAM_DOCS[name]
        param = {"name": name, "in": "query", "required": name == "runs", "schema": schema, "description": text}
        if name in ("columns", "metrics"):
            param["allowEmptyValue"] = True  # `?metrics=`: none
        out.append(param)
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "A query parameter is unknown or out of range (the message says what is expected).",
        401: "The dashboard was started with --token and the request did not carry it.",
        403: "The run file is a link to a file outside the dashboard's folder.",
        404: "No run with this id in the dashboard's folder.",
        422: "The run file is there but cannot be read (damaged, not a run, newer schema).",
    }
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _ref("Error")}}} for c in codes}


def _ok(schema: str, text: str) -> dict[str, Any]:
    return {"200": {"description": text, "content": {"application/json": {"schema": _ref(schema)}}}}


def _schemas() -> dict[str, Any]:
    num = _ref("Num")
    series = _obj(
        {
            "rows": _INT,
            "downsampled": {"type": "boolean"},
            "bucket_steps": _INT,
            "step": _array(_INT),
            "examples": _array(_INT_OR_NULL),
            "wall_time": _array({"type": "number"}),
            "values": {"type": "object", "additionalProperties": _array(num)},
        }
    )
    series["description"] = (
        "Points in step order. Downsampled: each bucket of bucket_steps steps gives its first step with each "
        "column's minimum and its last step with the maximum; rows counts the stored rows they stand for."
    )
    metric_at = {"anyOf": [_obj({"step": _INT, "value": num}), {"type": "null"}]}
    alert = _obj(
        {
            "id": _INT,
            "step": _INT_OR_NULL,
            "rule": {"type": "string"},
            "layer": _STR_OR_NULL,
            "state": _STR_OR_NULL,
            "severity": _STR_OR_NULL,
            "message": {"type": "string"},
            "action": _STR_OR_NULL,
        }
    )
    overview_props = {
        "id": {"type": "string"},
        "file": {"type": "string"},
        "run_id": {"type": "string"},
        "name": {"type": "string"},
        "status": {"type": "string"},
        "stale": {"type": "boolean"},
        "started_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "ended_at": _NUM_OR_NULL,
        "duration_s": {"type": "number"},
        "first_step": _INT_OR_NULL,
        "last_step": _INT_OR_NULL,
        "examples": _INT_OR_NULL,
        "batch_size": _INT_OR_NULL,
        "source": _STR_OR_NULL,
        "coverage": _NUM_OR_NULL,
        "skipped_steps": _INT,
        "b_simple": _obj({"step": _INT_OR_NULL, "value": num, "low": num, "high": num}),
        "loss": metric_at,
        "val_loss": metric_at,
        "lr": metric_at,
        "alerts": _obj({"events": _INT, "firing": _array(alert), "pending": _array(alert)}),
        "events": _INT,
        "controller_decisions": _INT,
        "layers": _INT,
    }
    detail_props = {
        **overview_props,
        "config": {"type": "object"},
        "metrics": _array({"type": "string"}),
        "modules": _INT,
        "noisescale_version": {"type": "string"},
        "host": _STR_OR_NULL,
        "schema_version": _INT,
    }
    cursor = _obj({"step": _INT, "metric_id": _INT, "event_id": _INT})
    event = _obj(
        {
            "id": _INT,
            "step": _INT_OR_NULL,
            "examples": _INT_OR_NULL,
            "wall_time": {"type": "number"},
            "kind": {"type": "string"},
            "message": {"type": "string"},
            "data": {"description": "The event's JSON data (alerts and controller decisions: see the docs)."},
        }
    )
    return {
        "Num": {
            "description": "A number; null where undefined; 'inf' or '-inf' for an infinite value.",
            "anyOf": [_NUM_OR_NULL, {"enum": ["inf", "-inf"]}],
        },
        "Error": _obj(
            {"error": {"type": "string"}, "status": _INT, "parameter": _STR_OR_NULL}, required=["error", "status"]
        ),
        "Alert": alert,
        "Overview": _obj(overview_props),
        "RunDetail": _obj(detail_props),
        "RunsList": _obj(
            {
                "runs": _array(_ref("Overview")),
                "unreadable": _array(_obj({"file": {"type": "string"}, "error": {"type": "string"}})),
            }
        ),
        "Series": series,
        "Cursor": cursor,
        "SeriesResponse": _obj(
            {
                "id": {"type": "string"},
                "points": _INT,
                "after": _INT_OR_NULL,
                "measurements": _ref("Series"),
                "metrics": {"type": "object", "additionalProperties": _ref("Series")},
                "cursor": _ref("Cursor"),
            }
        ),
        "Layers": _obj(
            {
                "id": {"type": "string"},
                "column": {"type": "string", "enum": list(COLUMNS)},
                "kind": {"type": "string", "enum": ["param", "module"]},
                "agg": {"type": "string", "enum": list(LAYER_AGGREGATES)},
                "order": {"type": "string"},
                "total_layers": _INT,
                "downsampled": {"type": "boolean"},
                "bucket_steps": _INT,
                "step": _array(_INT),
                "step_end": _array(_INT),
                "examples": _array(_INT_OR_NULL),
                "wall_time": _array(_NUM_OR_NULL),
                "layers": _array(_obj({"name": {"type": "string"}, "latest": num, "values": _array(num)})),
            }
        ),
        "Event": event,
        "Events": _obj(
            {"id": {"type": "string"}, "events": _array(_ref("Event")), "more": {"type": "boolean"}, "cursor": _INT}
        ),
        "Updates": _obj(
            {
                "id": {"type": "string"},
                "status": {"type": "string"},
                "reset": {"type": "boolean"},
                "overview": _ref("Overview"),
                "measurements": _ref("Series"),
                "metrics": {"type": "object", "additionalProperties": _ref("Series")},
                "events": _array(_ref("Event")),
                "cursor": _ref("Cursor"),
            }
        ),
        "Compare": _obj(
            {
                "column": _STR_OR_NULL,
                "metric": _STR_OR_NULL,
                "points": _INT,
                "runs": _array(
                    _obj(
                        {
                            "id": {"type": "string"},
                            "name": {"type": "string"},
                            "status": {"type": "string"},
                            "series": _ref("Series"),
                        }
                    )
                ),
            }
        ),
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint of ``noisescale dashboard``."""
    run_errors = _errors(400, 401, 403, 404, 422)
    paths: dict[str, Any] = {
        "/api/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Every run of the folder with its key numbers, newest first.",
                "parameters": _params("runs"),
                "responses": {**_ok("RunsList", "The runs."), **_errors(400, 401)},
            }
        },
        "/api/runs/{run}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run's key numbers, config and metric names.",
                "parameters": [_RUN_PARAM, *_params("run")],
                "responses": {**_ok("RunDetail", "The run."), **run_errors},
            }
        },
        "/api/runs/{run}/series": {
            "get": {
                "operationId": "getSeries",
                "summary": "Measurement columns and metrics over time, downsampled with extremes kept.",
                "parameters": [_RUN_PARAM, *_params("series")],
                "responses": {**_ok("SeriesResponse", "The series."), **run_errors},
            }
        },
        "/api/runs/{run}/layers": {
            "get": {
                "operationId": "getLayers",
                "summary": "Per-layer values over time (a heat map), noisiest layers first.",
                "parameters": [_RUN_PARAM, *_params("layers")],
                "responses": {**_ok("Layers", "The heat map."), **run_errors},
            }
        },
        "/api/runs/{run}/events": {
            "get": {
                "operationId": "getEvents",
                "summary": "The run's events: alerts (kind 'alert'), controller decisions (kind 'controller'), ...",
                "parameters": [_RUN_PARAM, *_params("events")],
                "responses": {**_ok("Events", "The events."), **run_errors},
            }
        },
        "/api/runs/{run}/updates": {
            "get": {
                "operationId": "getUpdates",
                "summary": "What was written after a cursor (one poll of the live stream).",
                "parameters": [_RUN_PARAM, *_params("updates")],
                "responses": {**_ok("Updates", "New rows and events."), **run_errors},
            }
        },
        "/api/runs/{run}/stream": {
            "get": {
                "operationId": "streamUpdates",
                "summary": "Server-sent events while the run is written: 'update' events whose data is an Updates "
                "object, then one 'end' event when the run has stopped and everything was sent. The id of each "
                "event is the cursor 'step:metric_id:event_id' (sent back as Last-Event-ID on reconnection).",
                "parameters": [_RUN_PARAM, *_params("stream")],
                "responses": {
                    "200": {
                        "description": "A text/event-stream; each event's data is an Updates object.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **run_errors,
                },
            }
        },
        "/api/compare": {
            "get": {
                "operationId": "compareRuns",
                "summary": "One measurement column or metric of several runs, for an overlay.",
                "parameters": _params("compare"),
                "responses": {**_ok("Compare", "The runs' series."), **run_errors},
            }
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document.",
                "responses": {
                    "200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {}}}},
                    **_errors(401),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "noisescale dashboard",
            "version": version,
            "description": "Read-only JSON API over the run files of one folder. When the server was started with "
            "--token, every request carries it: header 'Authorization: Bearer T' or 'X-Noisescale-Token: T', or "
            "query parameter 'token=T'.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "header": {"type": "apiKey", "in": "header", "name": "X-Noisescale-Token"},
                "query": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        "security": [{}, {"bearer": []}, {"header": []}, {"query": []}],
    }
