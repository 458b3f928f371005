"""TorchServe handler of bookrec: JSON in, JSON out, one tensor batch per TorchServe batch.

TorchServe imports this file as a top-level module from the unpacked archive, whose root also holds
the project's ``model/`` and ``handlers/`` packages (shipped as extra files), so nothing needs the
project installed. It must define exactly one class: TorchServe instantiates the only class here.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

# TorchScript is deprecated in current torch; the warnings say nothing actionable to API users.
warnings.filterwarnings("ignore", message=r".*TorchScript.*")
warnings.filterwarnings("ignore", message=r".*torch\.jit.*")

import torch  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from handlers import serving_metrics  # noqa: E402
from handlers.drift_sample import DriftSampler  # noqa: E402
from handlers.engine import BookrecEngine  # noqa: E402
from handlers.schema import Limits  # noqa: E402

log = logging.getLogger("bookrec.handler")

BATCH_HEADER = "x-bookrec-batch-size"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


class BookrecHandler(BaseHandler):
    """Rate (user, book) pairs and recommend top-k catalog books; see docs/SERVING.md."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: BookrecEngine | None = None
        self.drift: DriftSampler | None = None

    def initialize(self, context: Any) -> None:
        """Load catalog, encoder and MLP onto ``cuda:<gpu_id>`` (CPU without CUDA), then warm up."""
        self.context = context
        self.manifest = context.manifest
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler") or {}
        threads = _torch_threads(settings, config)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        self.engine = BookrecEngine(Path(props["model_dir"]), self.device, Limits.from_config(settings))
        self.engine.warm_up()
        self.drift = DriftSampler.from_env(self.engine.catalog.users)
        log.info("drift sample: %s", self.drift.path if self.drift else "off")
        log.info(
            "bookrec %s loaded on %s (%d torch threads): %d books, %d users, ready in %.1f s",
            self.engine.version,
            self.device,
            threads,
            len(self.engine.catalog.books),
            len(self.engine.catalog.users),
            time.perf_counter() - start,
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """One JSON answer per request, in order; each bad request gets its own 4xx status."""
        start = time.perf_counter()
        self.context = context
        if self._is_describe():
            return [json.dumps(self.describe_handle())]
        bodies = [_body(row) for row in data]
        results = self.engine.run(bodies)
        out = []
        for idx, (status, payload) in enumerate(results):
            context.set_response_status(status, REASONS.get(status, ""), idx=idx)
            context.set_response_content_type(idx, "application/json")
            # Lets callers (and the batching test) see how many requests shared this model call.
            context.set_response_header(idx, BATCH_HEADER, str(len(data)))
            out.append(json.dumps(payload, allow_nan=False))
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            counts = serving_metrics.tally(bodies, results)
            serving_metrics.emit(metrics, counts, serving_metrics.stage_timings(self.engine, results))
            metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        if self.drift is not None:
            self.drift.record(bodies, results)
        return out

    def describe_handle(self) -> dict[str, Any]:
        """What ``GET /models/bookrec?customized=true`` shows: the archive's metadata summary."""
        meta = self.engine.metadata
        return {
            "model_version": self.engine.version,
            "device": str(self.device),
            "books": len(self.engine.catalog.books),
            "users": len(self.engine.catalog.users),
            "limits": vars(self.engine.limits),
            **{key: meta.get(key) for key in ("created_utc", "encoder", "metrics", "fingerprint", "versions")},
        }


def _body(row: Any) -> Any:
    """The request body TorchServe passes: ``data`` or ``body`` (raw bytes, str, or parsed JSON)."""
    if isinstance(row, dict):
        for key in ("data", "body"):
            if key in row:
                return row[key]
        return None
    return row


def _torch_threads(settings: dict[str, Any], config: dict[str, Any]) -> int:
    """Intra-op threads per worker: half the cores divided among the workers, unless configured.

    ``BOOKREC_TORCH_THREADS`` (environment) or ``handler.torch_threads`` (model-config.yaml) win.
    The other half is left to TorchServe's frontend, tokenization and the OS: on a small CPU box,
    intra-op threads competing with those stall each other (OpenMP spin-waits) far more than one
    thread loses on these small matrices.
    """
    explicit = os.environ.get("BOOKREC_TORCH_THREADS") or settings.get("torch_threads")
    if explicit:
        return max(1, int(explicit))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(config.get("maxWorkers") or config.get("minWorkers") or 1)
    return max(1, cores // (2 * max(1, workers)))
