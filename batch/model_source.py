"""Find the model files a batch job scores with: a training run folder or a TorchServe ``.mar``.

Both share one layout (``model/layout.py``), checked by ``model.artifacts.ModelFolder``. The path
may be local or on any Beam filesystem (``gs://...``); remote models are copied to a local cache
once per process, archives are unpacked once per process.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import torch
from apache_beam.io.filesystems import FileSystems

from batch.io import is_local
from model import layout
from model.artifacts import ModelFolder, ModelFolderError

_lock = threading.Lock()
_resolved: dict[tuple, Path] = {}


class ModelError(ValueError):
    """The model path does not hold a usable model."""


def _cache_root() -> Path:
    root = Path(os.environ.get("BOOKREC_BATCH_CACHE", Path(tempfile.gettempdir()) / "bookrec-batch-models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:16]


def _fetch(path: str) -> Path:
    """A local copy of a remote model file (``.mar``) or folder, made once per process and path."""
    dest = _cache_root() / f"remote-{_key(path)}"
    name = FileSystems.split(path.rstrip("/"))[1]
    try:
        exact = [m for m in FileSystems.match([path])[0].metadata_list if m.path == path]
        if (dest / ".complete").exists():
            return dest / name if exact else dest
        dest.mkdir(parents=True, exist_ok=True)
        if exact:  # a single file, e.g. gs://bucket/models/bookrec.mar
            _copy_file(path, dest / name)
        else:  # a folder: every object under it
            base = path.rstrip("/") + "/"
            files = FileSystems.match([base + "**"])[0].metadata_list
            if not files:
                raise ModelError(f"--model {path}: no such file or folder")
            for meta in files:
                _copy_file(meta.path, dest / meta.path[len(base) :])
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"--model {path}: cannot read it: {err}") from err
    (dest / ".complete").touch()
    return dest / name if exact else dest


def _copy_file(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileSystems.open(src) as fin, dst.open("wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)


def _unpack(archive: Path) -> Path:
    stat = archive.stat()
    dest = _cache_root() / f"mar-{_key(f'{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}')}"
    if not (dest / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(dir=_cache_root(), prefix="unpack-"))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise ModelError(f"--model {archive}: not a readable .mar (zip) archive: {err}") from err
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race; its copy is identical
            pass
    return dest


def resolve(path: str, variant: str = "scripted") -> Path:
    """A local model folder (run folder layout) for ``path``, verified against its manifest."""
    with _lock:
        if is_local(path):
            local = Path(path[len("file://") :] if path.startswith("file://") else path).absolute()
            if not local.exists():
                raise ModelError(f"--model {path}: no such file or folder")
            # An archive replaced in place is unpacked again, a folder whose manifest was rewritten (a
            # retrain into it) verified again: their stamps are part of the key.
            stamped = local if local.is_file() else local / layout.MANIFEST_FILE
            stat = stamped.stat() if stamped.is_file() else None
            key = (str(local), variant, stat and (stat.st_size, stat.st_mtime_ns))
        else:
            key = (path, variant, None)
        if key in _resolved:
            return _resolved[key]
        if not is_local(path):
            local = _fetch(path)
        folder = _unpack(local) if local.is_file() else local
        try:
            ModelFolder(folder).verify(variant, shown=f"--model {path}")
        except ModelFolderError as err:
            raise ModelError(str(err)) from None
        _resolved[key] = folder
        return folder


def model_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(user_dim, book_dim) the model takes, from its standardisation buffers."""
    return int(model.user_mean.shape[0]), int(model.book_mean.shape[0])
