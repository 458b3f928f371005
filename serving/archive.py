"""Pack a training run folder into a TorchServe archive (``model-store/bookrec.mar``).

    python -m serving.archive --run-dir runs/bookcrossing --out model-store

The archive holds everything the handler reads, laid out like a run folder so the same
``Catalog.load`` / ``load_saved_encoder`` code loads it:

    model_scripted.pt        TorchScript MLP (the serialized file)
    retrieval_scripted.pt    TorchScript retrieval towers; retrieval.json: rerank settings;
                             book_vectors.npy: the towers' vector of every catalog book
    bookrec_handler.py       the handler (TorchServe's entry point), from handlers/
    encoder/                 BERT-tiny weights, config, tokenizer, encoder.json
    catalog/                 books (ISBN, title, author, year, publisher + text embeddings),
                             users (+ embeddings), training history, feature_spec.json
    model/, handlers/        the project's code, so the worker imports it without an install: every
                             module of model/, and of handlers/ the WORKER_FILES (an allow-list)
    model-config.yaml        batchSize, maxBatchDelay, min/maxWorkers, responseTimeout, and the handler
                             section: request limits and ``profile`` (per-stage handler timings)
    metadata.json            training config, metrics, data fingerprint, versions, file hashes

No requirements file is shipped: the worker installs nothing and downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from handlers.schema import Limits
from model.artifacts import file_sha256
from model.layout import BOOK_VECTORS, RETRIEVAL_FILE, RETRIEVAL_META

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bookrec"
HANDLER_FILE = "bookrec_handler.py"  # handlers/ file TorchServe loads; the archiver puts it at the root
# The handlers/ modules the worker imports, by name: a new one ships only once listed here.
WORKER_FILES = ("__init__.py", "drift_sample.py", "engine.py", "schema.py", "serving_metrics.py", "stages.py")
SHARED_PACKAGE = "model"  # shipped whole: every .py file of the package
REQUIRED = (
    "model_scripted.pt",
    "encoder/encoder.json",
    "encoder/config.json",
    "catalog/books.parquet",
    "catalog/users.parquet",
    "catalog/history.parquet",
    "catalog/feature_spec.json",
    BOOK_VECTORS,
    RETRIEVAL_FILE,
    RETRIEVAL_META,
    "config.yaml",
)
# Copied into metadata.json when present (a run without them still archives).
RUN_INFO = ("fingerprint", "versions", "evaluation", "compression", "train", "features")


def default_workers() -> int:
    """Workers for this machine: one per two cores (each worker gets the other core as intra-op
    thread and the Java frontend needs some CPU too), at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


def model_config(
    batch_size: int, max_batch_delay: int, workers: int, response_timeout: int, limits: Limits, profile: bool = True
) -> dict[str, Any]:
    """The archive's model-config.yaml (TorchServe's per-model settings plus a ``handler`` section).

    ``handler.profile`` turns on TorchServe's ``@timed`` stage timers: ``ts_handler_preprocess``,
    ``ts_handler_inference`` and ``ts_handler_postprocess`` (ms per batch) on the metrics endpoint.
    """
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay,
        "responseTimeout": response_timeout,
        "startupTimeout": 120,
        "handler": {"profile": profile, **asdict(limits)},
    }


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _copy_code(dest: Path) -> None:
    """The worker's Python sources: all of ``model/``, the ``WORKER_FILES`` of ``handlers/``."""
    for package, files in (
        (SHARED_PACKAGE, sorted(p.name for p in (REPO / SHARED_PACKAGE).glob("*.py"))),
        ("handlers", WORKER_FILES),
    ):
        (dest / package).mkdir(parents=True)
        for name in files:
            shutil.copy2(REPO / package / name, dest / package / name)


def metadata(run_dir: Path, payload: Path, version: str) -> dict[str, Any]:
    """Training config, metrics, data fingerprint, versions and a hash of every shipped file."""
    import torch
    import transformers

    info = {name: _read_json(run_dir / f"{name}.json") for name in RUN_INFO}
    evaluation = info.pop("evaluation") or {}
    return {
        "model_name": MODEL_NAME,
        "version": version,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "encoder": _read_json(run_dir / "encoder" / "encoder.json"),
        "metrics": evaluation.get("results", {}),
        "evaluation_meta": evaluation.get("meta", {}),
        **info,
        "serving_versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torchserve": _dist_version("torchserve"),
            "torch-model-archiver": _dist_version("torch-model-archiver"),
        },
        "files": {str(p.relative_to(payload)): file_sha256(p) for p in sorted(payload.rglob("*")) if p.is_file()},
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_archive(
    run_dir: Path,
    out: Path,
    version: str = "1.0",
    batch_size: int = 32,
    max_batch_delay: int = 1,
    workers: int | None = None,
    response_timeout: int = 60,
    limits: Limits | None = None,
    archive_format: str = "default",
    profile: bool = True,
) -> Path:
    """Write ``out/bookrec.mar`` (or ``out/bookrec/`` with ``archive_format='no-archive'``)."""
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    missing = [name for name in REQUIRED if not (run_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a complete training run; missing: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="bookrec-archive-") as tmp:
        tmp_dir = Path(tmp)
        payload = tmp_dir / "payload"  # its *contents* land at the archive root (--extra-files)
        payload.mkdir()
        shutil.copytree(run_dir / "encoder", payload / "encoder")
        shutil.copytree(run_dir / "catalog", payload / "catalog")
        for name in (RETRIEVAL_FILE, RETRIEVAL_META, BOOK_VECTORS):
            shutil.copy2(run_dir / name, payload / name)
        _copy_code(payload)
        config_file = tmp_dir / "model-config.yaml"
        config_file.write_text(
            yaml.safe_dump(
                model_config(
                    batch_size, max_batch_delay, workers or default_workers(), response_timeout, limits, profile
                ),
                sort_keys=False,
            )
        )
        meta = metadata(run_dir, payload, version)
        meta["files"]["model_scripted.pt"] = file_sha256(run_dir / "model_scripted.pt")
        meta["files"][HANDLER_FILE] = file_sha256(REPO / "handlers" / HANDLER_FILE)
        (payload / "metadata.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            MODEL_NAME,
            "--version",
            version,
            "--serialized-file",
            str(run_dir / "model_scripted.pt"),
            "--handler",
            str(REPO / "handlers" / HANDLER_FILE),
            "--extra-files",
            str(payload),
            "--config-file",
            str(config_file),
            "--export-path",
            str(out),
            "--archive-format",
            archive_format,
            "--force",
        ]
        # The archiver stages files in $TMPDIR/<model-name>; a private TMPDIR keeps two builds apart.
        (tmp_dir / "stage").mkdir()
        env = {**os.environ, "TMPDIR": str(tmp_dir / "stage")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out / (MODEL_NAME if archive_format == "no-archive" else f"{MODEL_NAME}.mar")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="training run folder")
    parser.add_argument("--out", default=Path("model-store"), type=Path, help="model store folder")
    parser.add_argument("--version", default="1.0", help="model version shown by the management API")
    parser.add_argument("--batch-size", type=int, default=32, help="TorchServe batchSize")
    parser.add_argument(
        "--max-batch-delay", type=int, default=1, help="TorchServe maxBatchDelay (ms); a lone request waits this long"
    )
    parser.add_argument("--workers", type=int, default=None, help="min/maxWorkers (default: cores // 2, at least 1)")
    parser.add_argument("--response-timeout", type=int, default=60, help="seconds before a worker is restarted")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-stage handler timings (ts_handler_*) on the metrics endpoint",
    )
    defaults = Limits()
    parser.add_argument("--max-books", type=int, default=defaults.max_books)
    parser.add_argument("--max-ratings", type=int, default=defaults.max_ratings)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-string", type=int, default=defaults.max_string)
    args = parser.parse_args(argv)
    limits = Limits(args.max_books, args.max_ratings, args.max_k, args.max_string)
    path = build_archive(
        args.run_dir,
        args.out,
        version=args.version,
        batch_size=args.batch_size,
        max_batch_delay=args.max_batch_delay,
        workers=args.workers,
        response_timeout=args.response_timeout,
        limits=limits,
        profile=args.profile,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
