"""The rating model and catalog a worker process scores with, loaded once per process.

Beam's Dask translation calls a DoFn's ``setup`` once per Dask partition, and a long-lived worker
(a Dask cluster, a reused SDK harness) runs job after job: the job's ``ScoringContext`` is built
per job, but the model and catalog under it come from here, loaded once per process and model.

The key is the model folder, the variant and the device; the entry is also stamped with the size
and modification time of every file it was loaded from, so a model rewritten in place (a retrain
into the same folder) is loaded again, never served stale. One entry is kept: a worker scoring
another model drops the previous one instead of holding two catalogs in memory.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from model import layout
from model.artifacts import ModelFolder
from model.catalog import Catalog

_lock = threading.Lock()
_entry: tuple[tuple, tuple, Loaded] | None = None  # (key, stamp, loaded)
loads: Counter[str] = Counter()  # model loads of this process, by run id (what the jobs report)


@dataclass(frozen=True)
class Loaded:
    """What every job over the same model folder shares (read-only once loaded)."""

    folder: ModelFolder
    model: torch.nn.Module
    catalog: Catalog


def _stamp(folder: Path, variant: str) -> tuple:
    names = (layout.MODEL_FILES[variant], *(layout.catalog_path(f) for f in layout.CATALOG_FILES))
    out = []
    for name in names:
        st = os.stat(folder / name)
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def get(folder: Path, variant: str, device: torch.device, run_id: str = "") -> Loaded:
    """The loaded model of ``folder`` (a local, complete model folder), from this process's cache
    when its files are unchanged; each real load is counted under ``run_id``."""
    global _entry
    key = (str(Path(folder).absolute()), variant, str(device))
    with _lock:  # threads of one worker wait for the first load instead of repeating it
        stamp = _stamp(Path(folder), variant)
        if _entry is not None and _entry[0] == key and _entry[1] == stamp:
            return _entry[2]
        _entry = None  # the previous model goes before the next one is loaded
        models = ModelFolder(folder)
        loaded = Loaded(models, models.load_rating_model(variant, device), models.load_catalog())
        _entry = (key, stamp, loaded)
        loads[run_id] += 1
        return loaded


def clear() -> None:
    """Forget the cached model (tests, and callers that need the memory back)."""
    global _entry
    with _lock:
        _entry = None
