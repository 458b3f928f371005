"""One owner of a model folder: a training run folder or an unpacked ``.mar`` (same layout).

``ModelFolder`` checks that a folder is complete, loads each model variant onto a device, and reads
the metadata; ``ModelFolder.load`` returns a ``LoadedModel`` (catalog, rating scorer,
recommender and, for serving, the encoder). Training, the archive builder, the handler and the batch
job all go through it, so a file name or a loading rule changes in one place (``model/layout.py``
holds the names).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model import layout, manifest
from model.book_index import BookIndex
from model.candidates import AuthorIndex, ItemGraph
from model.catalog import Catalog
from model.checkpoint import load_checkpoint, load_scripted
from model.encoder import ScriptedTextEncoder, TextEncoder, load_serving_encoder
from model.ranker import RankingSettings, RankingStage
from model.recommend import Recommender, RetrievalSettings, embed_book_set
from model.scoring import Scorer
from model.similar import SimilarIndex, SimilarSettings, author_index

VARIANTS = tuple(layout.MODEL_FILES)
# The code that turns a user or a book into features and features into scores: this package.
FEATURE_CODE_DIR = Path(__file__).resolve().parent


class ModelFolderError(ValueError):
    """The folder is not a model folder that may be loaded (the message says which file and why)."""


class IncompleteModelFolder(ModelFolderError):
    """The folder lacks files a model folder must hold."""


class CorruptModelFolder(ModelFolderError):
    """A file of the folder is not the file its manifest lists, or the folder has no manifest."""


# How to get a manifest for a folder made before models had one.
NO_MANIFEST_HINT = (
    f"no {layout.MANIFEST_FILE} (made before models had one): retrain it, or, for a run folder you trust, "
    "write one with `python -m serving.archive --write-manifest RUN` and archive it again"
)


def _hash_problems(files: list[tuple[str, Path, str]]) -> list[str]:
    """A problem per (name, path, listed SHA-256) whose file hashes to something else."""
    return [
        f"{name}: SHA-256 differs from the manifest (file changed or corrupt)"
        for name, path, sha256 in files
        if manifest.file_sha256(path) != sha256
    ]


def _refuse(where: str | Path, problems: list[str]) -> None:
    if problems:
        raise CorruptModelFolder(f"{where}: {'; '.join(problems)}")


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device; "auto" is CUDA when present, else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def release_unused_memory() -> None:
    """Hand the memory freed by loading back to the OS: Arrow's pool keeps what reading the catalog's
    Parquet freed, and glibc keeps freed heap pages; at full size the two held ~0.7 GB of a worker."""
    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only
        trim(0)


def feature_code_sha256(folder: Path = FEATURE_CODE_DIR) -> str:
    """One hash of the shared model code (``model/*.py``, names and contents): two folders with the
    same hash compute the same features and scores from the same files."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_identity(folder: Path = FEATURE_CODE_DIR) -> dict[str, Any]:
    """The git commit of the checkout (None outside git), whether it had local changes, and the
    feature code's hash: saved with every run and archive, so a model names the code it ran with."""
    commit = dirty = None
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": commit, "git_dirty": dirty, "feature_code_sha256": feature_code_sha256(folder)}


@dataclass(frozen=True)
class ModelFolder:
    """A folder laid out as ``model/layout.py`` says."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------------------ completeness
    def missing(self, variant: str = layout.SHIPPED_VARIANT, *, serving: bool = False) -> list[str]:
        """Files scoring with ``variant`` needs that the folder lacks (with ``serving``, also the encoder)."""
        if variant not in layout.MODEL_FILES:
            raise ValueError(f"model variant must be one of {VARIANTS}, got {variant!r}")
        needed = (layout.MODEL_FILES[variant], *layout.SCORING_FILES, *(layout.SERVING_FILES if serving else ()))
        missing = [name for name in needed if not (self.path / name).is_file()]
        # The ranking stage is optional but whole: part of it (a folder from before its settings had a
        # file of their own) would otherwise be served as no ranking stage at all.
        for optional in (layout.RANKING_FILES, layout.INDEX_FILES):
            absent = [name for name in optional if not (self.path / name).is_file()]
            missing += absent if len(absent) < len(optional) else []
        return missing

    def check(self, variant: str = layout.SHIPPED_VARIANT, *, serving: bool = False, shown: str | None = None) -> None:
        """Raise ``IncompleteModelFolder`` naming every missing file."""
        missing = self.missing(variant, serving=serving)
        if missing:
            raise IncompleteModelFolder(
                f"{shown or self.path}: not a complete training run folder or bookrec.mar; missing {', '.join(missing)}"
            )

    def verify(self, variant: str = layout.SHIPPED_VARIANT, *, serving: bool = False, shown: str | None = None) -> None:
        """Check the folder against its manifest before loading it: every file scoring with ``variant``
        needs (with ``serving``, also the encoder's) is listed, present, and of the listed size and
        SHA-256, and a model listed with a ranking stage or a book index holds all of it. Raises
        ``IncompleteModelFolder`` / ``CorruptModelFolder`` naming each bad file."""
        problems, hashed = self._listing_problems(variant, serving=serving, shown=shown)
        _refuse(shown or self.path, problems + _hash_problems(hashed))

    @contextmanager
    def verifying(
        self, variant: str = layout.SHIPPED_VARIANT, *, serving: bool = False, shown: str | None = None
    ) -> Iterator[None]:
        """``verify`` around a body that loads the folder: the listing and the sizes are checked
        first, the SHA-256s on a second thread while the body loads (hashing a full-size model's
        791 MB takes 1.5-2 s of a worker's start; the hash releases the GIL). On leaving, a file
        whose hash differs is refused by name, also when the body failed because of it."""
        problems, hashed = self._listing_problems(variant, serving=serving, shown=shown)
        _refuse(shown or self.path, problems)
        with ThreadPoolExecutor(1, thread_name_prefix="bookrec-verify") as pool:
            hashes = pool.submit(_hash_problems, hashed)
            try:
                yield
            finally:
                _refuse(shown or self.path, hashes.result())

    def _listing_problems(
        self, variant: str, *, serving: bool, shown: str | None
    ) -> tuple[list[str], list[tuple[str, Path, str]]]:
        """``verify``'s problems short of the hashes, and the (name, path, listed SHA-256) of the
        files still to hash: listed, present and of the listed size."""
        self.check(variant, serving=serving, shown=shown)
        record = self.read_manifest(shown)
        listed: dict[str, dict[str, Any]] = record["files"]
        needed = [layout.MODEL_FILES[variant], *layout.SCORING_FILES]
        if serving:
            needed += [name for name in listed if name.startswith(f"{layout.ENCODER_DIR}/")]
            needed += [name for name in layout.SERVING_FILES if name not in needed]
        withdrawn = layout.catalog_path(layout.WITHDRAWN_FILE)
        if withdrawn in listed or (self.path / withdrawn).is_file():
            needed.append(withdrawn)  # a withdrawn book must never come back by a lost file
        features = layout.catalog_feature_paths()
        if any(name in listed or (self.path / name).is_file() for name in features):
            needed += features  # both or neither: one alone would be computed or mapped at random
        ranking = bool(record.get("stages", {}).get("ranking"))
        if ranking or self.has_ranking():
            needed += layout.RANKING_FILES
        indexed = bool(record.get("stages", {}).get("index"))
        if indexed or self.has_index():
            needed += layout.INDEX_FILES
        problems, hashed = [], []
        if ranking and not self.has_ranking():
            absent = [name for name in layout.RANKING_FILES if not (self.path / name).is_file()]
            problems.append(f"the model has a ranking stage but {', '.join(absent)} missing")
        if indexed and not self.has_index():
            absent = [name for name in layout.INDEX_FILES if not (self.path / name).is_file()]
            problems.append(f"the model has a book index but {', '.join(absent)} missing")
        reported = (layout.RANKING_FILES if ranking else ()) + (layout.INDEX_FILES if indexed else ())
        for name in needed:
            entry, path = listed.get(name), self.path / name
            if entry is None:
                problems.append(f"{name}: not in {layout.MANIFEST_FILE} (a file the model was not made with)")
            elif not path.is_file():
                if name not in reported:
                    problems.append(f"{name}: missing")
            elif path.stat().st_size != entry["bytes"]:
                size = path.stat().st_size
                problems.append(
                    f"{name}: {size} bytes, the manifest lists {entry['bytes']} (file changed or truncated)"
                )
            else:
                hashed.append((name, path, entry["sha256"]))
        return problems, hashed

    def read_manifest(self, shown: str | None = None) -> dict[str, Any]:
        """The folder's manifest; ``CorruptModelFolder`` when it has none or it is unreadable."""
        path = self.path / layout.MANIFEST_FILE
        if not path.is_file():
            raise CorruptModelFolder(f"{shown or self.path}: {NO_MANIFEST_HINT}")
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptModelFolder(f"{shown or self.path}: {layout.MANIFEST_FILE} is unreadable: {err}") from None
        files = record.get("files") if isinstance(record, dict) else None
        entries_ok = isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
        if not entries_ok or record.get("format") != manifest.FORMAT:
            raise CorruptModelFolder(
                f"{shown or self.path}: {layout.MANIFEST_FILE} is not a format-{manifest.FORMAT} manifest"
            )
        return record

    def write_manifest(self) -> Path:
        """Record the folder's model files as they are now (training, and a folder one trusts)."""
        self.check(serving=True)
        return manifest.write(self.path, manifest.build(self.path))

    # ----------------------------------------------------------------------------------- loading
    def load_rating_model(self, variant: str = layout.SHIPPED_VARIANT, device: str | torch.device = "cpu"):
        """The rating MLP in eval mode: TorchScript through ``torch.jit.load`` alone, the eager
        variants (fp32, pruned, int8) from their checkpoints."""
        path = self.path / layout.MODEL_FILES[variant]
        if variant == layout.SHIPPED_VARIANT:
            return load_scripted(path, device)
        return load_checkpoint(path, map_location=device).to(device).eval()

    def rating_models(self) -> dict[str, torch.nn.Module]:
        """Every rating-model variant the folder holds, by variant name, on the CPU."""
        return {v: self.load_rating_model(v) for v in VARIANTS if (self.path / layout.MODEL_FILES[v]).is_file()}

    def load_catalog(self) -> Catalog:
        return Catalog.load(self.path)

    def load_encoder(self, device: str | torch.device = "cpu") -> ScriptedTextEncoder | TextEncoder:
        """The encoder new users' and books' texts are embedded with (``load_serving_encoder``)."""
        return load_serving_encoder(self.path / layout.ENCODER_DIR, device)

    def load_towers(self, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
        return load_scripted(self.path / layout.RETRIEVAL_FILE, device)

    def book_vectors(self) -> torch.Tensor:
        """The towers' unit vector [B, dim] of every catalog book, in catalog row order.

        Mapped, not read: where the recommender keeps them as stored (fp32 on the CPU) a worker
        starts without copying the file into memory of its own and the workers of one archive share
        its pages; otherwise its one conversion reads the pages directly. The mapping is
        copy-on-write: a write would change this process's copy only, never the file.
        """
        return torch.from_numpy(np.load(self.path / layout.BOOK_VECTORS, mmap_mode="c"))

    def retrieval_settings(self) -> RetrievalSettings:
        return RetrievalSettings.load(self.path / layout.RETRIEVAL_SETTINGS)

    def has_ranking(self) -> bool:
        """Whether the folder holds the ranking stage (item graph, ranker and its settings)."""
        return all((self.path / name).is_file() for name in layout.RANKING_FILES)

    def has_index(self) -> bool:
        """Whether the folder holds a book index (the index file and its settings)."""
        return all((self.path / name).is_file() for name in layout.INDEX_FILES)

    def book_index(self, *, mapped: bool = True) -> BookIndex | None:
        """The book index over the catalog's vectors; None where the folder has none (exhaustive).
        ``mapped`` (searching): its vectors mapped from the file, read-only; ``mapped=False`` to add books."""
        if not self.has_index():
            return None
        return BookIndex.load(self.path / layout.BOOK_INDEX, self.path / layout.BOOK_INDEX_SETTINGS, mapped=mapped)

    def ranks(self) -> bool:
        """Whether top-k lists of this folder go through its ranking stage (held and enabled)."""
        return self.has_ranking() and self.ranking_settings().enabled

    def ranking_settings(self) -> RankingSettings:
        return RankingSettings.load(self.path / layout.RANKING_SETTINGS)

    def item_graph(self) -> ItemGraph:
        return ItemGraph.load(self.path / layout.ITEM_GRAPH)

    def load_ranker(self, device: str | torch.device = "cpu") -> torch.jit.ScriptModule | None:
        """The shipped ranker; None where the folder has none."""
        path = self.path / layout.RANKER_FILE
        return load_scripted(path, device) if path.is_file() else None

    def ranking_stage(
        self,
        catalog: Catalog,
        book_rows: np.ndarray | None = None,
        device: str | torch.device = "cpu",
        *,
        settings: RankingSettings | None = None,
        ranker: torch.nn.Module | None = None,
    ) -> RankingStage:
        """The item graph, author index and ranker over the book set of catalog rows ``book_rows``
        (None: the whole catalog). ``settings`` / ``ranker`` replace the folder's (training)."""
        graph = self.item_graph()
        settings = settings or self.ranking_settings()
        if ranker is None:
            ranker = self.load_ranker(device)
        authors = AuthorIndex(
            *(code.numpy() for code in catalog.group_code_columns()),
            np.bincount(catalog.rated_books, minlength=len(catalog.books)),
            per_author=settings.per_author,
        )
        years = catalog.books["year"].fillna(0).to_numpy(np.float32)
        return RankingStage(graph, authors, years, settings, ranker, book_rows, catalog.withdrawn_mask())

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder, None when absent."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def metadata(self) -> dict[str, Any]:
        """The archive's metadata (``metadata.json``); empty for a run folder."""
        return self.read_json(layout.METADATA_FILE) or {}

    def load(
        self,
        device: str | torch.device = "cpu",
        *,
        variant: str = layout.SHIPPED_VARIANT,
        rating_model: torch.nn.Module | None = None,
        encoder: bool = False,
        **scorer_options: Any,
    ) -> LoadedModel:
        """Everything that scores, on ``device``: catalog, rating scorer over every catalog book,
        recommender and (with ``encoder``) the text encoder. ``rating_model`` is used instead of
        loading ``variant`` when the caller already holds it (TorchServe loads the serialized file)."""
        device = resolve_device(device)
        catalog = self.load_catalog()
        model = rating_model if rating_model is not None else self.load_rating_model(variant, device)
        scorer = Scorer(model, catalog.book_feats, device, **scorer_options)
        recommender = self.recommender_for(scorer, catalog)
        loaded = LoadedModel(self, catalog, scorer, recommender, self.load_encoder(device) if encoder else None)
        release_unused_memory()
        return loaded

    def recommender_for(
        self,
        scorer: Scorer,
        catalog: Catalog,
        book_rows: torch.Tensor | None = None,
        *,
        from_features: bool = False,
    ) -> Recommender:
        """The recommender over the book set of a rating ``scorer``, whose books are the
        catalog rows ``book_rows`` (-1: outside the catalog; None: the whole catalog in order). The
        catalog's shipped vectors are used, or, with ``from_features`` (the set's features came from
        elsewhere), the towers embed the scorer's features. The folder's book index serves the
        whole catalog in order only; any other book set is searched exhaustively."""
        towers = self.load_towers(scorer.device)
        if from_features:
            vectors = embed_book_set(towers, catalog, scorer.book_feats, book_rows)
        else:
            vectors = self.book_vectors() if book_rows is None else self.book_vectors()[book_rows]
        ranking = None
        if self.ranks():
            rows = None if book_rows is None else book_rows.numpy().astype(np.int64)
            ranking = self.ranking_stage(catalog, rows, scorer.device)
        withdrawn = None
        if len(catalog.withdrawn):  # the book set's positions of withdrawn catalog books
            mask = catalog.withdrawn_mask()
            rows = None if book_rows is None else book_rows.numpy().astype(np.int64)
            withdrawn = mask if rows is None else np.where(rows >= 0, mask[np.maximum(rows, 0)], False)
        whole = book_rows is None or torch.equal(book_rows, torch.arange(len(catalog.books)))
        index = self.book_index() if whole and not from_features else None
        return Recommender(towers, vectors, scorer, self.retrieval_settings(), ranking, index, withdrawn)


@dataclass
class LoadedModel:
    """A model folder loaded for scoring: what the engine, the batch job and the evaluation share."""

    folder: ModelFolder
    catalog: Catalog
    scorer: Scorer
    recommender: Recommender | None  # None where only ratings are asked for (batch "all" mode)
    encoder: ScriptedTextEncoder | TextEncoder | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = self.folder.metadata()

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def similar_index(self, settings: SimilarSettings | None = None) -> SimilarIndex:
        """The "similar books" sources of this model: the catalog's book vectors, the item graph (where
        the model has a ranking stage) and the author index, shared with the recommender when its
        ranking stage covers the whole catalog; then the towers source is the recommender's own
        search (its book index at large catalogs) over its vectors, with no second copy in a worker's
        memory. The catalog's withdrawn books are never offered."""
        recommender = self.recommender
        ranking = recommender.ranking if recommender is not None else None
        withdrawn = self.catalog.withdrawn_mask() if len(self.catalog.withdrawn) else None
        if recommender is not None and ranking is not None and ranking.whole:
            return SimilarIndex(
                recommender.book_vectors, ranking.graph, ranking.authors, settings, withdrawn, recommender.nearest_books
            )
        has = self.folder.has_ranking()
        graph = self.folder.item_graph() if has else None
        authors = author_index(self.catalog, self.folder.ranking_settings().per_author if has else 50)
        return SimilarIndex(self.folder.book_vectors(), graph, authors, settings, withdrawn)
