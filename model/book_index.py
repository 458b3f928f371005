"""An approximate nearest-neighbour index over the towers' book vectors (faiss HNSW, inner product).

The towers' vectors are unit length, so inner-product search is the cosine search the exhaustive
matmul does; the index only proposes candidates, the ``Recommender`` rescores them exactly. Training
builds one when the catalog is at least ``IndexSettings.threshold`` books (below it the exhaustive
matmul is as fast, ``BENCHMARKS.md``); the model folder holds it as ``layout.BOOK_INDEX`` with its
settings in ``layout.BOOK_INDEX_SETTINGS``.

faiss brings its own OpenMP runtime (the wheel's libgomp) beside torch's: ``set_threads`` sets both,
and ``search`` gives faiss the calling thread's torch thread count, so the two pools never add up
to more threads than the process was given.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

KINDS = ("hnsw",)


@dataclass(frozen=True)
class IndexSettings:
    """How the index is built and searched (defaults chosen in BENCHMARKS.md, "Retrieval index")."""

    kind: str = "hnsw"
    threshold: int = 100_000  # catalogs of at least this many books get an index; smaller stay exhaustive
    m: int = 32  # HNSW links per node (memory: ~2 x m x 4 bytes per book on top of the vectors)
    ef_construction: int = 128  # candidate list while building (build time against graph quality)
    ef_search: int = 400  # candidate list while searching (latency against recall)
    margin: int = 64  # candidates searched beyond the n asked for, so read books can be dropped

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("threshold", "m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.margin < 0:
            raise ValueError(f"index margin must be >= 0, got {self.margin}")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> IndexSettings:
        meta: dict[str, Any] = json.loads(Path(path).read_text())
        return cls(**{k: (str(v) if k == "kind" else int(v)) for k, v in meta.items()})


def _faiss() -> Any:
    """faiss, imported on first use: a model without an index never loads it."""
    import faiss

    return faiss


def set_threads(n: int) -> None:
    """Intra-op threads of the calling thread for torch and, where installed, faiss's own OpenMP."""
    torch.set_num_threads(n)
    try:
        _faiss().omp_set_num_threads(n)
    except ImportError:  # faiss is needed only by models with an index
        pass


class BookIndex:
    """A faiss HNSW inner-product index whose ids are book-set positions (catalog rows)."""

    def __init__(self, index: Any, settings: IndexSettings, *, mapped: bool = False):
        self.index = index
        self.settings = settings
        self.mapped = mapped
        self.index.hnsw.efSearch = settings.ef_search

    @classmethod
    def build(cls, vectors: np.ndarray | torch.Tensor, settings: IndexSettings) -> BookIndex:
        """The index of unit vectors [B, dim] (row i gets id i)."""
        faiss = _faiss()
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        built = cls(faiss.IndexHNSWFlat(x.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT), settings)
        built.add(x)
        return built

    def add(self, vectors: np.ndarray | torch.Tensor) -> None:
        """Append unit vectors [n, dim]; they get the ids after the last (catalog rows appended)."""
        if self.mapped:
            # faiss aborts the process on a write to mapped storage; refuse it here, by name.
            raise ValueError("a mapped book index is read-only: load it with mapped=False to add books")
        self.index.hnsw.efConstruction = self.settings.ef_construction
        self.index.add(np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)))

    def save(self, index_path: Path, settings_path: Path) -> None:
        """Write the index beside ``index_path`` and rename it into place: a process that maps the
        old file keeps reading the old file, never a half-written one."""
        partial = Path(index_path).with_name(f".{Path(index_path).name}.partial")
        _faiss().write_index(self.index, str(partial))
        os.replace(partial, index_path)
        self.settings.save(settings_path)

    @classmethod
    def load(cls, index_path: Path, settings_path: Path, *, mapped: bool = False) -> BookIndex:
        """The saved index; ``mapped``: its vectors mapped from the file instead of read (read-only;
        a worker starts without reading them, and the workers of one archive share their pages)."""
        faiss = _faiss()
        flags = faiss.IO_FLAG_MMAP_IFC if mapped else 0
        return cls(faiss.read_index(str(index_path), flags), IndexSettings.load(settings_path), mapped=mapped)

    @property
    def n_books(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, users: torch.Tensor | np.ndarray, n: int, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``n`` (inner products [U, n] float32, rows [U, n] int64, -1 where fewer
        were found) of each user vector, never one of the rows ``skip`` (withdrawn books); efSearch
        is raised to ``n`` when ``n`` exceeds it."""
        faiss = _faiss()
        x = users.detach().float().cpu().numpy() if isinstance(users, torch.Tensor) else users
        x = np.ascontiguousarray(x, dtype=np.float32)
        # OpenMP's thread count is per calling thread; follow torch's in this one.
        faiss.omp_set_num_threads(torch.get_num_threads())
        params = faiss.SearchParametersHNSW(efSearch=max(self.settings.ef_search, n))
        if skip is not None and len(skip):
            # The graph is still walked through skipped nodes, so the rest is found as before. faiss
            # keeps raw pointers: ids, batch and selector stay referenced here until the search returns.
            ids = np.ascontiguousarray(skip, dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            selector = faiss.IDSelectorNot(batch)
            params.sel = selector
        scores, rows = self.index.search(x, n, params=params)
        return scores, rows
