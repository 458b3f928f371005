"""TorchServe handler of bookrec: JSON in, JSON out, one tensor batch per TorchServe batch.

TorchServe imports this file as a top-level module from the unpacked archive, whose root also holds
the project's ``model/`` and ``handlers/`` packages (shipped as extra files), so nothing needs the
project installed. It must define exactly one class: TorchServe instantiates the only class here.

``BaseHandler`` does the rest, as for TorchServe's own handlers: ``initialize`` picks the device and
loads the archive's TorchScript MLP; ``handle`` answers describe requests, runs the three stages
below, emits ``HandlerTime`` and honours ``ENABLE_TORCH_PROFILER``. With ``handler: {profile: true}``
in model-config.yaml (the archive builder's default), ``@timed`` reports each stage's milliseconds
as ``ts_handler_preprocess`` / ``ts_handler_inference`` / ``ts_handler_postprocess``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

# TorchScript is deprecated in current torch; the warnings say nothing actionable to API users.
warnings.filterwarnings("ignore", message=r".*TorchScript.*")
warnings.filterwarnings("ignore", message=r".*torch\.jit.*")

import torch  # noqa: E402
from ts.handler_utils.timer import timed  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from handlers import serving_metrics  # noqa: E402
from handlers.drift_sample import DriftSampler  # noqa: E402
from handlers.engine import BookrecEngine  # noqa: E402
from handlers.schema import Limits  # noqa: E402
from handlers.stages import Batch  # noqa: E402
from model.artifacts import ModelFolder  # noqa: E402
from model.book_index import set_threads  # noqa: E402

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
        """BaseHandler loads the MLP onto ``cuda:<gpu_id>`` (CPU without CUDA); then the catalog and
        encoder join it, and the engine warms up."""
        start = time.perf_counter()
        config = getattr(context, "model_yaml_config", None) or {}
        settings = config.get("handler") or {}
        threads = _torch_threads(settings, config)
        set_threads(threads)  # torch's and the book index's (faiss) OpenMP pools alike
        model_dir = Path(context.system_properties["model_dir"])
        # A missing or truncated file is refused by name before anything loads; the hashes are
        # checked while it loads, and a changed file is refused by name before the first request.
        with ModelFolder(model_dir).verifying(serving=True):
            super().initialize(context)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device, for @timed's CUDA events
            self.engine = BookrecEngine(
                model_dir, self.device, Limits.from_config(settings), rating_model=self.model, verified=True
            )
        loaded = time.perf_counter()
        self.engine.warm_up()
        self.drift = DriftSampler.from_env(self.engine.catalog.users)
        log.info("drift sample: %s", self.drift.path if self.drift else "off")
        done = time.perf_counter()
        log.info(
            "bookrec %s loaded on %s (%d torch threads): %d books, %d users, ready in %.1f s "
            "(verified and loaded in %.1f s, warmed up in %.1f s)",
            self.engine.version,
            self.device,
            threads,
            len(self.engine.catalog.books),
            len(self.engine.catalog.users),
            done - start,
            loaded - start,
            done - loaded,
        )

    @timed
    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        """Parse and validate every request of the batch; a bad one is refused on its own."""
        bodies = [_body(row) for row in data]
        return Batch(bodies, self.engine.validate(bodies))

    @timed
    def inference(self, data: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the valid requests as one batch (one by one should the batch fail)."""
        return replace(data, results=self.engine.answer(data.parsed))

    @timed
    def postprocess(self, data: Batch) -> list[str]:
        """One JSON answer per request, in order, with its own status; then metrics and drift sample."""
        out = []
        for idx, (status, payload) in enumerate(data.results):
            self.context.set_response_status(status, REASONS.get(status, ""), idx=idx)
            self.context.set_response_content_type(idx, "application/json")
            # Lets callers (and the batching test) see how many requests shared this model call.
            self.context.set_response_header(idx, BATCH_HEADER, str(len(data.bodies)))
            out.append(json.dumps(payload, allow_nan=False))
        counts = serving_metrics.tally(data.bodies, data.results)
        serving_metrics.emit(self.context.metrics, counts, serving_metrics.stage_timings(self.engine, data.results))
        if self.drift is not None:
            self.drift.record(data.bodies, data.results)
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
            **{key: meta.get(key) for key in ("created_utc", "encoder", "metrics", "fingerprint", "versions", "code")},
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
