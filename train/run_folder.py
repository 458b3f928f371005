"""The run folder and what makes a run reproducible: package versions and machine, the data
fingerprint, JSON reports, the manifest (the record of which config and code made it: ``train/run_record.py``)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from model import layout
from model.artifacts import ModelFolder
from model.manifest import file_sha256

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-surprise",
    "ftfy",
)


def frame_sha256(frame: pd.DataFrame) -> str:
    """Order-sensitive hash of a table's values (stable across pandas versions)."""
    h = hashlib.sha256()
    for name in frame.columns:
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(frame[name].astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(source: Path, tables: dict[str, pd.DataFrame]) -> dict:
    """Hashes of the input CSVs and of the cleaned tables, with row counts."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(source.glob("*.csv"))}
    cleaned = {name: {"rows": len(df), "sha256": frame_sha256(df)} for name, df in tables.items()}
    return {"source": str(source), "files": files, "tables": cleaned}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> str:
    """One line naming the CPU, core count and accelerator."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, {platform.system()} {platform.machine()}"


def cpu_isa() -> str:
    """The widest vector units ``/proc/cpuinfo`` names: AMX, AVX-512 (with BF16), AVX2; with the
    ISA torch's kernels are held to where ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` say."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "unknown"
    if "amx_tile" in flags:
        widest = "AMX"
    elif "avx512f" in flags:
        widest = "AVX-512" + ("+BF16" if "avx512_bf16" in flags else "")
    else:
        widest = "AVX2" if "avx2" in flags else "pre-AVX2"
    held = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return f"{widest}, held to {' '.join(held)}" if held else widest


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def refresh_manifest(run_dir: Path) -> Path | None:
    """Record the run's model files in its manifest once the folder holds a complete model; a folder
    that does not (a step rewrote part of it, or failed) loses a stale manifest instead, so it is
    refused until a run completes it."""
    folder = ModelFolder(run_dir)
    if folder.missing(serving=True):
        (Path(run_dir) / layout.MANIFEST_FILE).unlink(missing_ok=True)
        return None
    return folder.write_manifest()


@contextmanager
def removed_if_failed(run_dir: Path) -> Iterator[None]:
    """Around work that may create ``run_dir``: if it fails (Ctrl-C included), what it created of the
    path (the folder and any parents made for it) is removed; a folder that was there is left as the
    work leaves it."""
    created = None
    for folder in (run_dir, *run_dir.parents):  # the highest folder of the path that is not there yet
        if folder.exists():
            break
        created = folder
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
