"""Pack a training run folder into a TorchServe archive (``model-store/bookrec.mar``).

    python -m serving.archive --run-dir runs/bookcrossing --out model-store

The archive holds everything the handler reads, laid out like a run folder so the same
``Catalog.load`` / ``load_serving_encoder`` code loads it:

    model_scripted.pt        TorchScript MLP (the serialized file)
    retrieval_scripted.pt    TorchScript retrieval towers; retrieval_settings.json: rerank settings;
                             book_vectors.npy: the towers' vector of every catalog book
    item_graph.npz           the ranking stage, where the run has one: item graph, TorchScript
    ranker_scripted.pt       ranker and ranking_settings.json (the run's reports, retrieval.json
    ranking_settings.json    and ranking.json, stay in the run folder)
    book_index.faiss         the book vectors' HNSW index and book_index.json, its settings, where the
                             catalog reached the index threshold (smaller ones are searched exhaustively)
    bookrec_handler.py       the handler (TorchServe's entry point), from handlers/
    encoder/                 BERT-tiny weights, config, tokenizer, encoder.json, and the TorchScript
                             trace the worker embeds with (encoder_scripted.pt: no transformers import)
    catalog/                 books (ISBN, title, author, year, publisher + text embeddings),
                             users (+ embeddings), training history, feature_spec.json
    model/, handlers/        the project's code, so the worker imports it without an install: every
                             module of model/, and of handlers/ the WORKER_FILES (an allow-list)
    model-config.yaml        batchSize, maxBatchDelay, min/maxWorkers, responseTimeout, and the handler
                             section: request limits and ``profile`` (per-stage handler timings)
    metadata.json            training config, metrics, data fingerprint, versions, file hashes, and
                             the code: git commit and feature-code hash of each step that made the
                             model's files (the run's steps.json) and at archiving
    manifest.json            the run's manifest (size and SHA-256 of every model file, the stages),
                             less the rating-model variants that stay in the run folder

No requirements file is shipped: the worker installs nothing and downloads nothing. The archive
ships the checked-out ``model/`` code; it refuses a run any step of which that made model files ran
with different ``model/`` code (its feature-code hash differs) unless ``--allow-code-change``, since
that code computes the features and scores the model was trained on. Rerunning a step that makes no
model file (``evaluate``) does not change that record.

The run folder is verified against its manifest first (``ModelFolder.verify``): a missing, truncated
or changed file is refused by name. The new archive is written into a temporary folder of the store,
opened and verified, and only then replaces the old one. Errors are one line on stderr, exit 2;
``python -m serving.archive --write-manifest RUN`` writes the manifest of an older run one trusts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from handlers.schema import Limits
from model import layout, manifest
from model.artifacts import ModelFolder, ModelFolderError, code_identity
from model.manifest import file_sha256

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bookrec"
HANDLER_FILE = "bookrec_handler.py"  # handlers/ file TorchServe loads; the archiver puts it at the root
# The handlers/ modules the worker imports, by name: a new one ships only once listed here.
WORKER_FILES = ("__init__.py", "drift_sample.py", "engine.py", "schema.py", "serving_metrics.py", "stages.py")
SHARED_PACKAGE = "model"  # shipped whole: every .py file of the package
SERIALIZED = layout.MODEL_FILES[layout.SHIPPED_VARIANT]
# Copied into metadata.json when present (a run without them still archives).
RUN_INFO = {
    "fingerprint": layout.FINGERPRINT_FILE,
    "versions": layout.VERSIONS_FILE,
    "steps": layout.STEPS_RECORD,
    "evaluation": layout.EVALUATION_REPORT,
    "compression": layout.COMPRESSION_REPORT,
    "train": layout.TRAIN_REPORT,
    "features": layout.FEATURES_REPORT,
    "update": layout.UPDATE_RECORD,  # a version made by a catalog update: what it was built from
}


class CodeChanged(RuntimeError):
    """The checked-out model/ code is not the code the run was trained with."""


class IncompleteRun(ModelFolderError):
    """The run folder lacks a run-folder file the archive reads (its config)."""


class ArchiveError(RuntimeError):
    """The archiver failed, or the archive it wrote does not verify (the store keeps its old one)."""


# A worker's resident memory serving the full Book-Crossing model (BENCHMARKS.md, "Scale": 1.71 GiB).
WORKER_MEMORY = int(1.75 * 2**30)


def default_workers(cores: int | None = None, memory: int | None = None) -> int:
    """Workers for this machine: one per two cores (each worker gets the other core as intra-op
    thread and the Java frontend needs some CPU too), but two at least, so that a crashed worker
    leaves one serving while TorchServe replaces it; no more than half the RAM holds at
    ``WORKER_MEMORY`` each, and one at least."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(max(2, cores // 2), memory // 2 // WORKER_MEMORY))


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


def _copy_code(dest: Path) -> None:
    """The worker's Python sources: all of ``model/``, the ``WORKER_FILES`` of ``handlers/``."""
    for package, files in (
        (SHARED_PACKAGE, sorted(p.name for p in (REPO / SHARED_PACKAGE).glob("*.py"))),
        ("handlers", WORKER_FILES),
    ):
        (dest / package).mkdir(parents=True)
        for name in files:
            shutil.copy2(REPO / package / name, dest / package / name)


def code_record(folder: ModelFolder, allow_change: bool = False) -> dict[str, Any]:
    """The code each step that made the model's files ran with (``steps.json``; ``versions.json`` in a
    run from before that record) and the code being shipped; raises ``CodeChanged`` when a feature-code
    hash differs, unless ``allow_change``."""
    steps = folder.read_json(layout.STEPS_RECORD)
    if steps:
        trained = {name: entry["code"] for name, entry in steps.items() if entry.get("model_files")}
    else:
        trained = {"run": (folder.read_json(layout.VERSIONS_FILE) or {}).get("code") or {}}
    shipped = code_identity()
    other = {
        name: code
        for name, code in trained.items()
        if code.get("feature_code_sha256") not in (None, shipped["feature_code_sha256"])
    }
    if other and not allow_change:
        made = ", ".join(
            f"{name} with feature-code hash {code['feature_code_sha256'][:12]} (commit {code.get('git_commit')})"
            for name, code in other.items()
        )
        raise CodeChanged(
            f"{folder.path} was made with other model/ code ({made}) than the checkout ships "
            f"({shipped['feature_code_sha256'][:12]}, commit {shipped['git_commit']}): retrain, check out that "
            "commit, or pass --allow-code-change"
        )
    return {"trained_with": trained, "archived_with": shipped, "same_feature_code": not other}


def metadata(folder: ModelFolder, payload: Path, version: str, code: dict[str, Any]) -> dict[str, Any]:
    """Training config, metrics, data fingerprint, versions, code and a hash of every shipped file."""
    import torch
    import transformers

    info = {name: folder.read_json(file) for name, file in RUN_INFO.items()}
    evaluation = info.pop("evaluation") or {}
    return {
        "model_name": MODEL_NAME,
        "version": version,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(folder.path),
        "config": yaml.safe_load((folder / layout.CONFIG_FILE).read_text()),
        "encoder": folder.read_json(layout.encoder_path(layout.ENCODER_META)),
        "metrics": evaluation.get("results", {}),
        "evaluation_meta": evaluation.get("meta", {}),
        **info,
        "code": code,
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
    allow_code_change: bool = False,
    file_name: str = MODEL_NAME,
) -> Path:
    """Write ``out/bookrec.mar`` (or ``out/bookrec/`` with ``archive_format='no-archive'``);
    ``file_name`` names another file of the store (``bookrec-2.0.mar``: a second version of the
    model ``bookrec``, registered beside the first for a swap)."""
    if not file_name or Path(file_name).name != file_name or file_name.startswith("."):
        raise ArchiveError(f"archive file name {file_name!r}: a plain name of the model store is needed")
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    folder = ModelFolder(run_dir)
    folder.verify(serving=True, shown=f"{run_dir} (run folder)")
    if not (run_dir / layout.CONFIG_FILE).is_file():
        raise IncompleteRun(f"{run_dir}: not a complete training run; missing {layout.CONFIG_FILE}")
    code = code_record(folder, allow_code_change)
    out.mkdir(parents=True, exist_ok=True)
    limits = limits or Limits()
    name = file_name if archive_format == "no-archive" else f"{file_name}.mar"
    # The new archive is written beside the old one and replaces it only once it verifies.
    staged = Path(tempfile.mkdtemp(dir=out, prefix=f".{MODEL_NAME}-building-"))
    try:
        with tempfile.TemporaryDirectory(prefix="bookrec-archive-") as tmp:
            _archive(
                folder,
                Path(tmp),
                staged,
                version,
                code,
                archive_format,
                limits,
                profile,
                workers,
                batch_size,
                max_batch_delay,
                response_timeout,
            )
        produced = MODEL_NAME if archive_format == "no-archive" else f"{MODEL_NAME}.mar"
        if produced != name:  # the archiver names its output after the model
            os.replace(staged / produced, staged / name)
        _check_archive(staged / name)
        _replace(staged / name, out / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out / name


def _archive(
    folder: ModelFolder,
    tmp_dir: Path,
    export: Path,
    version: str,
    code: dict[str, Any],
    archive_format: str,
    limits: Limits,
    profile: bool,
    workers: int | None,
    batch_size: int,
    max_batch_delay: int,
    response_timeout: int,
) -> None:
    """Run torch-model-archiver on the run folder's shipped files, writing into ``export``."""
    run_dir = folder.path
    payload = tmp_dir / "payload"  # its *contents* land at the archive root (--extra-files)
    payload.mkdir()
    for name in (layout.ENCODER_DIR, layout.CATALOG_DIR):
        shutil.copytree(run_dir / name, payload / name)
    for name in (layout.RETRIEVAL_FILE, layout.RETRIEVAL_SETTINGS, layout.BOOK_VECTORS):
        shutil.copy2(run_dir / name, payload / name)
    # The ranking stage ships when the run has all of it (a run without the ranking step serves
    # the towers' order, as before).
    if all((run_dir / name).is_file() for name in layout.RANKING_FILES):
        for name in layout.RANKING_FILES:
            shutil.copy2(run_dir / name, payload / name)
    # So does the book index (catalogs below its threshold have none and are searched exhaustively).
    if folder.has_index():
        for name in layout.INDEX_FILES:
            shutil.copy2(run_dir / name, payload / name)
    # The run's manifest, less the rating-model variants that stay in the run folder.
    record = folder.read_manifest()
    shipped = [SERIALIZED, *(str(p.relative_to(payload)) for p in sorted(payload.rglob("*")) if p.is_file())]
    record["files"] = {name: entry for name, entry in record["files"].items() if name in shipped}
    manifest.write(payload, record)
    _copy_code(payload)
    config_file = tmp_dir / layout.MODEL_CONFIG
    config_file.write_text(
        yaml.safe_dump(
            model_config(batch_size, max_batch_delay, workers or default_workers(), response_timeout, limits, profile),
            sort_keys=False,
        )
    )
    meta = metadata(folder, payload, version, code)
    meta["files"][SERIALIZED] = file_sha256(run_dir / SERIALIZED)
    meta["files"][HANDLER_FILE] = file_sha256(REPO / "handlers" / HANDLER_FILE)
    (payload / layout.METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "model_archiver.model_packaging",
        "--model-name",
        MODEL_NAME,
        "--version",
        version,
        "--serialized-file",
        str(run_dir / SERIALIZED),
        "--handler",
        str(REPO / "handlers" / HANDLER_FILE),
        "--extra-files",
        str(payload),
        "--config-file",
        str(config_file),
        "--export-path",
        str(export),
        "--archive-format",
        archive_format,
        "--force",
    ]
    # The archiver stages files in $TMPDIR/<model-name>; a private TMPDIR keeps two builds apart.
    (tmp_dir / "stage").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_dir / "stage")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}): {detail[0]}")


def _check_archive(path: Path) -> None:
    """Open the new archive (a .mar, or the no-archive folder) and verify its manifest."""
    if path.is_dir():
        _verify(path, path)
        return
    with tempfile.TemporaryDirectory(prefix="bookrec-check-", dir=path.parent) as tmp:
        try:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as err:
            raise ArchiveError(f"{path.name}: the archive written cannot be read back: {err}") from None
        _verify(Path(tmp), path)


def _verify(folder: Path, shown: Path) -> None:
    try:
        ModelFolder(folder).verify(serving=True, shown=f"{shown.name} (new archive)")
    except ModelFolderError as err:
        raise ArchiveError(str(err)) from None


def _replace(new: Path, old: Path) -> None:
    """Put ``new`` in the place of ``old`` (a file by one rename; a folder by two, the old one kept
    until the new one is in place)."""
    if new.is_file():
        os.replace(new, old)
        return
    retired = new.with_name(new.name + ".old")
    if old.exists():
        os.replace(old, retired)
    os.replace(new, old)
    shutil.rmtree(retired, ignore_errors=True)


def write_manifest(run_dir: Path) -> Path:
    """Write the manifest of a run folder made before models had one, from its files as they are:
    only for a folder one trusts (the manifest vouches for whatever it holds now)."""
    return ModelFolder(Path(run_dir).resolve()).write_manifest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="training run folder (required unless --write-manifest)")
    parser.add_argument(
        "--write-manifest",
        type=Path,
        metavar="RUN",
        help="only write the manifest of RUN, a run folder made before models had one that you trust, and exit",
    )
    parser.add_argument("--verbose", action="store_true", help="a traceback with an error")
    parser.add_argument("--out", default=Path("model-store"), type=Path, help="model store folder")
    parser.add_argument("--version", default="1.0", help="model version shown by the management API")
    parser.add_argument(
        "--name", default=MODEL_NAME, help="archive file name without .mar (a second version: bookrec-2.0)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="TorchServe batchSize")
    parser.add_argument(
        "--max-batch-delay", type=int, default=1, help="TorchServe maxBatchDelay (ms); a lone request waits this long"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="min/maxWorkers (default: cores // 2 but at least 2; fewer when half the RAM can't hold them)",
    )
    parser.add_argument("--response-timeout", type=int, default=60, help="seconds before a worker is restarted")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-stage handler timings (ts_handler_*) on the metrics endpoint",
    )
    parser.add_argument(
        "--allow-code-change",
        action="store_true",
        help="archive even though the run was trained with other model/ code than the checkout's",
    )
    defaults = Limits()
    parser.add_argument("--max-books", type=int, default=defaults.max_books)
    parser.add_argument("--max-ratings", type=int, default=defaults.max_ratings)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-string", type=int, default=defaults.max_string)
    args = parser.parse_args(argv)
    if args.run_dir is None and args.write_manifest is None:
        parser.error("the following arguments are required: --run-dir")
    limits = Limits(args.max_books, args.max_ratings, args.max_k, args.max_string)
    try:
        if args.write_manifest is not None:
            print(f"wrote {write_manifest(args.write_manifest)}")
            return 0
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
            allow_code_change=args.allow_code_change,
            file_name=args.name,
        )
    except (ModelFolderError, CodeChanged, ArchiveError) as err:
        if args.verbose:
            raise
        print(f"python -m serving.archive: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
