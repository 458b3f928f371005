"""Serving metrics of bookrec, derived from a batch's request bodies and the engine's answers.

``tally`` is pure (bodies + results in, counts out) so it is tested without TorchServe; ``emit``
hands the counts to TorchServe's metrics API (``context.metrics``), which prints them on the
worker's stdout and the frontend exports them on the Prometheus endpoint (``/metrics`` on the
metrics port, with ``metrics_mode=prometheus`` and ``model_metrics_auto_detect=true`` in
config.properties). Counts are summed per batch, so a batch costs one metric line per label set,
not one per request. docs/MONITORING.md explains each metric.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections import Counter
from typing import Any

from handlers.schema import request_schema

log = logging.getLogger("bookrec.metrics")

ACTIONS = ("rate", "recommend")
REQUESTS = "bookrec_requests"  # counter {action}
USERS = "bookrec_users"  # counter {action, user=known|new}, answered requests
BOOKS = "bookrec_books"  # counter {book=known|new}, books in answered rate requests
ERRORS = "bookrec_errors"  # counter {status, field}: field from error_fields()
RATING_BINS = "bookrec_predicted_rating"  # counter {action, bin="1".."9"}: ratings in [bin, bin+1)
RATING_SUM = "bookrec_predicted_rating_sum"  # counter {action}: sum of the predicted ratings
STAGE_SECONDS = "bookrec_stage_seconds"  # histogram {stage}: the engine's per-stage time per batch

COUNTERS = (REQUESTS, USERS, BOOKS, ERRORS, RATING_BINS, RATING_SUM)
_INDEX = re.compile(r"\[\d+\]")
UNKNOWN_FIELD = "unknown_field"

Key = tuple[str, tuple[tuple[str, str], ...]]


def action_of(body: Any, status: int, payload: dict[str, Any]) -> str:
    """``rate`` / ``recommend`` as asked (also for refused requests), ``invalid`` when unreadable."""
    if status == 200 and payload.get("action") in ACTIONS:
        return payload["action"]
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            return "invalid"
    if isinstance(body, dict) and body.get("action") in ACTIONS:
        return body["action"]
    return "invalid"


@functools.cache
def error_fields() -> frozenset[str]:
    """Every value the ``field`` label of ``bookrec_errors`` takes: each field path of the request
    schema (list indices as ``[]``), ``body``, ``none`` (a 500) and ``unknown_field``."""
    schema = request_schema()
    paths = {"body", "none", UNKNOWN_FIELD}

    def walk(node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        for option in node.get("oneOf", []) + node.get("anyOf", []):
            walk(option, path)
        for name, child in node.get("properties", {}).items():
            paths.add(f"{path}.{name}".lstrip("."))
            walk(child, f"{path}.{name}")
        if "items" in node:
            paths.add(f"{path}[]".lstrip("."))
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    return frozenset(paths)


def error_field(payload: dict[str, Any]) -> str:
    """The refused field as a label from the fixed ``error_fields()``: list indices dropped
    (``books[7].year`` -> ``books[].year``) and any field the schema lacks, which a client names at
    will, as ``unknown_field``; so no request adds a series."""
    field = (payload.get("error") or {}).get("field")
    if not field:
        return "none"
    label = _INDEX.sub("[]", str(field))
    return label if label in error_fields() else UNKNOWN_FIELD


def rating_bin(value: float) -> str:
    """``"k"`` for a rating in [k, k+1), 1..9 (the 1-10 scale; 10 counts in bin 9)."""
    return str(min(9, max(1, math.floor(value))))


def tally(bodies: list[Any], results: list[tuple[int, dict[str, Any]]]) -> Counter[Key]:
    """Counter of (metric, labels) -> value for one batch."""
    counts: Counter[Key] = Counter()

    def add(name: str, value: float = 1, **labels: str) -> None:
        counts[(name, tuple(sorted(labels.items())))] += value

    for body, (status, payload) in zip(bodies, results, strict=True):
        action = action_of(body, status, payload)
        add(REQUESTS, action=action)
        if status != 200:
            add(ERRORS, status=str(status), field=error_field(payload))
            continue
        if action == "similar":  # no user and no predicted rating
            continue
        user = "known" if (payload.get("user") or {}).get("known") else "new"
        add(USERS, action=action, user=user)
        if action == "rate":
            values = [p["rating"] for p in payload.get("predictions", [])]
            for p in payload.get("predictions", []):
                add(BOOKS, book="known" if p.get("isbn") is not None else "new")
        else:
            values = [r["score"] for r in payload.get("recommendations", [])]
        for value in values:
            add(RATING_BINS, action=action, bin=rating_bin(value))
        if values:
            add(RATING_SUM, float(sum(values)), action=action)
    return counts


def stage_timings(engine: Any, results: list[tuple[int, dict[str, Any]]]) -> dict[str, float] | None:
    """The engine's per-stage seconds of this batch (``engine.last_timings``, when the engine has
    it), only for a batch that answered a recommend request (the stages are recommend's)."""
    timings = getattr(engine, "last_timings", None)
    if not timings or not any(s == 200 and p.get("action") == "recommend" for s, p in results):
        return None
    return {str(k): float(v) for k, v in timings.items()}


def emit(metrics: Any, counts: Counter[Key], timings: dict[str, float] | None = None) -> None:
    """Send one batch's counts (and the engine's per-stage seconds, when it reports them) to
    TorchServe's metrics cache. A metrics failure is logged, never raised into the answer."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    try:
        for (name, labels), value in sorted(counts.items()):
            dims = [Dimension(key, value_) for key, value_ in labels]
            metrics.add_metric(name, value, "count", None, dims, MetricTypes.COUNTER)
        for stage, seconds in sorted((timings or {}).items()):
            dims = [Dimension("stage", str(stage))]
            metrics.add_metric(STAGE_SECONDS, float(seconds), "s", None, dims, MetricTypes.HISTOGRAM)
    except Exception:
        log.exception("could not record serving metrics")
