"""What a worker needs to score: model, features, the book set, and turning scores into Arrow rows.

``ScoringContext.load`` runs once per worker process and job (the DoFns share it through
``apache_beam.utils.shared.Shared``): it takes the process's loaded model folder
(``batch/model_cache.py``: ``ModelFolder``, as serving and the evaluation load it) into a
``LoadedModel`` over the job's book set, validates every feature row and
prepares the exclusion index. Each user block then costs one user projection, one
``AllPairsScorer.score_projected`` (or one ``Recommender.recommend``) and one Arrow record
batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from apache_beam.io.filesystems import FileSystems

from batch import model_cache, schemas
from batch.all_pairs import DEFAULT_BLOCK_PAIRS, AllPairsScorer
from batch.io import _local, is_local
from batch.model_source import ModelError, model_dims, resolve
from batch.native_head import attach
from model import layout
from model import similar as similar_books
from model.artifacts import LoadedModel, release_unused_memory, resolve_device
from model.catalog import Catalog
from model.isbn import normalise_isbn
from model.ranker import SOURCES
from model.scoring import Scorer
from model.similar import SimilarIndex

log = logging.getLogger("bookrec.batch")

# Dead-letter reasons (the part before ":" also names the Metrics counter).
UNKNOWN = "unknown_id"
MISSING = "missing_features"
WRONG_DIM = "wrong_dimension"
NON_FINITE = "non_finite_features"

DeadLetter = tuple[str, str, str]  # (kind, id, reason)


@dataclass(frozen=True)
class JobSpec:
    """Everything the workers need; small and picklable (it travels inside the DoFns)."""

    model: str
    output: str
    temp_dir: str
    run_id: str
    mode: str = "all"
    k: int = 10
    exclude_rated: bool = False
    variant: str = "scripted"
    books: tuple[str, ...] | None = None  # the --books filter, as given
    user_features: str | None = None
    book_features: str | None = None
    num_shards: int = 1
    block_users: int = 64
    compression: str = "zstd"
    device: str = "cpu"
    precision: str = "fp32"
    kernel: str = "auto"
    threads: int = 1

    def tag(self) -> str:
        """Identity of the loaded context: two jobs in one process never share a stale one."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_features(path: str, id_column: str, id_type: pa.DataType) -> tuple[np.ndarray, pa.ListArray]:
    """(ids, features list column) of an external feature table: Parquet with ``id_column`` and
    ``features`` (a list of floats per row)."""
    if is_local(path):
        table = pq.read_table(_local(path), columns=[id_column, "features"])
    else:
        with FileSystems.open(path) as fh:
            table = pq.read_table(pa.BufferReader(fh.read()), columns=[id_column, "features"])
    ids = table[id_column].cast(id_type).to_numpy(zero_copy_only=False)
    return ids, table["features"].combine_chunks()


def validate_rows(feats: torch.Tensor) -> list[str | None]:
    """Reason per row of a feature matrix, None for a usable row."""
    finite = torch.isfinite(feats).all(dim=1).tolist()
    return [None if ok else f"{NON_FINITE}: NaN or infinite values" for ok in finite]


def matrix_from_lists(column: pa.ListArray | pa.FixedSizeListArray, dim: int) -> tuple[torch.Tensor, list[str | None]]:
    """Dense [N, dim] float32 rows from a list column, and the reason each unusable row is unusable
    (null, wrong length, non-finite); unusable rows are zero-filled."""
    n = len(column)
    out = np.zeros((n, dim), np.float32)
    reasons: list[str | None] = [None] * n
    if isinstance(column, pa.FixedSizeListArray):
        column = column.cast(pa.list_(column.type.value_type))
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = column.values.cast(pa.float32()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    for i in range(n):
        if not valid[i]:
            reasons[i] = f"{MISSING}: features are null"
        elif lengths[i] != dim:
            reasons[i] = f"{WRONG_DIM}: {lengths[i]} values, the model takes {dim}"
        else:
            out[i] = values[offsets[i] : offsets[i + 1]]
    feats = torch.from_numpy(out)
    for i, reason in enumerate(validate_rows(feats)):
        if reasons[i] is None and reason is not None:
            reasons[i] = reason
    return feats, reasons


@dataclass
class _Side:
    """Feature rows of one side (users or books) and where each id lives."""

    feats: torch.Tensor
    index: dict
    reasons: list[str | None]
    source: str = "catalog"


class ScoringContext:
    """Per-worker state: model, features, projected book set, exclusion index, Arrow builders."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        loaded = model_cache.get(resolve(spec.model, spec.variant), spec.variant, self.device, spec.run_id)
        folder, model, catalog = loaded.folder, loaded.model, loaded.catalog
        self.user_dim, self.book_dim = model_dims(model)
        self.users = self._side(catalog.user_feats, catalog.users["user_id"].tolist(), spec.user_features, "user")
        books = self._side(catalog.book_feats, catalog.books["isbn"].tolist(), spec.book_features, "book")

        # The book set: the --books filter (or every source book), minus rows that cannot be scored.
        wanted = list(dict.fromkeys(spec.books)) if spec.books is not None else list(books.index)
        self.book_dead: list[DeadLetter] = []
        rows, isbns = [], []
        for isbn in wanted:
            row = books.index.get(isbn)
            if row is None:
                self.book_dead.append(("book", isbn, f"{UNKNOWN}: ISBN not in the {books.source}"))
            elif books.reasons[row] is not None:
                self.book_dead.append(("book", isbn, books.reasons[row]))
            else:
                rows.append(row)
                isbns.append(isbn)
        self.isbn_dictionary = pa.array(isbns, pa.string())
        self.n_books = len(isbns)
        self.scorer = Scorer(model, books.feats[torch.tensor(rows, dtype=torch.long)], self.device)
        # All pairs: the head kernel (compiled where it can be) over the projected book set. Top-k
        # rates only the recommender's candidates, through the scorer.
        self.all_pairs: AllPairsScorer | None = None
        if spec.mode == "all":
            block_pairs = DEFAULT_BLOCK_PAIRS if self.device.type == "cpu" else 1 << 22
            self.all_pairs = attach(
                AllPairsScorer(self.scorer, precision=spec.precision, threads=spec.threads, block_pairs=block_pairs),
                spec.kernel,
            )
        recommender = None
        if spec.mode == "topk":
            catalog_rows = torch.tensor([catalog.book_index.get(i, -1) for i in isbns], dtype=torch.long)
            external = books.source != "catalog"
            recommender = folder.recommender_for(self.scorer, catalog, catalog_rows, from_features=external)
        elif spec.mode == "similar":
            # The answers come from the whole catalog through the recommender's own search, as the
            # handler's do (its index at large catalogs), so both give the same lists. The job's
            # scorer serves when its book set is the catalog in order (no --books filter).
            whole = rows == list(range(len(catalog.books)))
            scorer = self.scorer if whole else Scorer(model, catalog.book_feats, self.device)
            recommender = folder.recommender_for(scorer, catalog)
        self.model = LoadedModel(folder, catalog, self.scorer, recommender)
        self.catalog_isbns = pa.array(catalog.books["isbn"].tolist(), pa.string())
        self.similar: SimilarIndex | None = None
        if spec.mode == "similar":
            # Queries: the book set's ISBNs by their position in the planned list (--books or the
            # catalog); the answers come from the whole catalog.
            self.similar = self.model.similar_index()
            self.queries = list(spec.books) if spec.books is not None else catalog.books["isbn"].tolist()
            self.scorable = set(isbns)
        release_unused_memory()
        self.k = min(spec.k, self.n_books)
        self._exclusion = self._exclusion_index(catalog, isbns) if spec.exclude_rated else None
        self._tiled = np.zeros(0, np.int32)
        self._ranks = np.tile(np.arange(1, self.k + 1, dtype=np.int32), max(spec.block_users, 1))
        self.schema = schemas.writer_schema(spec.mode)

    def _side(self, catalog_feats: torch.Tensor, catalog_ids: list, external: str | None, kind: str) -> _Side:
        dim = self.user_dim if kind == "user" else self.book_dim
        if external is None:
            if catalog_feats.shape[1] != dim:
                width = catalog_feats.shape[1]
                raise ValueError(f"catalog {kind} features have {width} columns, the model takes {dim}")
            index = {(int(i) if kind == "user" else str(i)): n for n, i in enumerate(catalog_ids)}
            return _Side(catalog_feats, index, validate_rows(catalog_feats))
        id_col, id_type = ("user_id", pa.int64()) if kind == "user" else ("isbn", pa.string())
        ids, column = read_features(external, id_col, id_type)
        feats, reasons = matrix_from_lists(column, dim)
        index: dict = {}
        for n, i in enumerate(ids.tolist()):
            key = normalise_isbn(i) if kind == "book" and i is not None else i  # ISBNs as training spells them
            index.setdefault(key, n)  # the first row of a repeated id wins
        return _Side(feats, index, reasons, source=f"{kind} features file {external}")

    def _exclusion_index(self, catalog: Catalog, isbns: list[str]) -> np.ndarray:
        """The book-set position of every catalog book (-1 outside the set)."""
        position = np.full(len(catalog.books), -1, np.int64)
        rows = [catalog.book_index.get(isbn, -1) for isbn in isbns]
        found = np.asarray(rows, np.int64) >= 0
        position[np.asarray(rows, np.int64)[found]] = np.flatnonzero(found)
        return position

    def reads(self, user_ids: np.ndarray) -> list[np.ndarray]:
        """Catalog rows each user read in training (empty for unknown users)."""
        return self.model.catalog.reads_of(user_ids.tolist())

    def rated(self, user_ids: np.ndarray, reads: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Book-set positions each user read in training (empty without --exclude-rated)."""
        if self._exclusion is None:
            return [np.zeros(0, np.int64)] * len(user_ids)
        out = []
        for read in self.reads(user_ids) if reads is None else reads:
            pos = self._exclusion[read]
            out.append(pos[pos >= 0])
        return out

    def resolve_users(self, user_ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, list[DeadLetter]]:
        """(scorable ids, their feature rows, dead letters) of a block of requested user ids; in
        --mode similar the ids are query positions and the rows catalog rows (a query outside the
        book set is the book set's dead letter, reported once)."""
        if self.similar is not None:
            isbns = [self.queries[i] for i in user_ids.tolist()]
            keep = [n for n, isbn in enumerate(isbns) if isbn in self.scorable]
            rows = torch.tensor([self.model.catalog.book_index[isbns[n]] for n in keep], dtype=torch.long)
            return user_ids[keep], rows, []
        good, rows, dead = [], [], []
        for user in user_ids.tolist():
            row = self.users.index.get(user)
            if row is None:
                dead.append(("user", str(user), f"{UNKNOWN}: user_id not in the {self.users.source}"))
            elif self.users.reasons[row] is not None:
                dead.append(("user", str(user), self.users.reasons[row]))
            else:
                good.append(user)
                rows.append(row)
        return np.asarray(good, np.int64), torch.tensor(rows, dtype=torch.long), dead

    @torch.inference_mode()
    def score_block(self, user_ids: np.ndarray, rows: torch.Tensor) -> pa.RecordBatch:
        """One record batch with every output row of a block of resolved users."""
        if self.similar is not None:
            return self._similar(rows.numpy())
        feats = self.users.feats[rows]
        if self.spec.mode == "all":
            return self._all_pairs(user_ids, self.all_pairs.score_projected(self.scorer.project_users(feats)))
        return self._top_k(user_ids, feats)

    def _all_pairs(self, user_ids: np.ndarray, scores: torch.Tensor) -> pa.RecordBatch:
        n_u, n_b = scores.shape
        score = scores.cpu().numpy().reshape(-1)
        if len(self._tiled) < n_u * n_b:  # book positions repeated per user, built once and sliced
            self._tiled = np.tile(np.arange(n_b, dtype=np.int32), max(n_u, self.spec.block_users))
        index = self._tiled[: n_u * n_b]
        user = np.repeat(user_ids, n_b)
        if self._exclusion is not None:
            rated = self.rated(user_ids)
            if any(len(r) for r in rated):
                keep = np.ones(n_u * n_b, bool)
                for i, r in enumerate(rated):
                    keep[i * n_b + r] = False
                score, index, user = score[keep], index[keep], user[keep]
        isbn = pa.DictionaryArray.from_arrays(pa.array(index), self.isbn_dictionary, safe=False)
        return pa.RecordBatch.from_arrays([pa.array(user), isbn, pa.array(score)], schema=self.schema)

    def _top_k(self, user_ids: np.ndarray, feats: torch.Tensor) -> pa.RecordBatch:
        """The two-stage top-k of a block of users (``Recommender``, as the handler)."""
        n_u = len(user_ids)
        reads = self.reads(user_ids)
        recs = self.model.recommender.recommend(feats, reads, self.k, self.rated(user_ids, reads))
        reasons = self.model.recommender.explain(reads, recs)
        sources = reasons.sources.reshape(-1, len(SOURCES))
        because_graph = reasons.graph_book.reshape(-1)
        because_author = reasons.author_books.reshape(-1, reasons.author_books.shape[-1])
        idx = recs.rows.cpu().numpy().reshape(-1)
        score = recs.rating.cpu().numpy().reshape(-1)
        relevance = recs.relevance.cpu().numpy().reshape(-1)
        keep = idx >= 0  # fewer than k unrated books (tiny catalogs only)
        if len(self._ranks) < n_u * self.k:
            self._ranks = np.tile(np.arange(1, self.k + 1, dtype=np.int32), n_u)
        rank = self._ranks[: n_u * self.k]
        user = np.repeat(user_ids, self.k)
        if not keep.all():
            idx, score, relevance, rank, user = idx[keep], score[keep], relevance[keep], rank[keep], user[keep]
            sources, because_graph, because_author = sources[keep], because_graph[keep], because_author[keep]
        isbn = self.isbn_dictionary.take(pa.array(idx))
        columns = [
            pa.array(user),
            pa.array(rank),
            isbn,
            pa.array(score),
            pa.array(relevance),
            source_lists(sources, SOURCES),
            self.catalog_isbns.take(pa.array(because_graph, mask=because_graph < 0)),
            self._isbn_lists(because_author),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _similar(self, rows: np.ndarray) -> pa.RecordBatch:
        """The k most similar books of a block of query books (catalog rows), ``model/similar.py``."""
        k = min(self.spec.k, len(self.catalog_isbns))
        found = self.similar.of_books(rows, k)
        flat = found.rows.reshape(-1)
        keep = flat >= 0  # fewer than k books with any source's vote
        query = np.repeat(rows, k)[keep]
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), len(rows))[keep]
        columns = [
            self.catalog_isbns.take(pa.array(query)),
            pa.array(rank),
            self.catalog_isbns.take(pa.array(flat[keep])),
            pa.array(found.score.reshape(-1)[keep]),
            source_lists(found.sources.reshape(-1, len(similar_books.SOURCES))[keep], similar_books.SOURCES),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _isbn_lists(self, rows: np.ndarray) -> pa.ListArray:
        """A list of catalog ISBNs per row of ``rows`` [N, m] (catalog rows, -1 padding)."""
        present = rows >= 0
        offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), self.catalog_isbns.take(pa.array(rows[present])))

    @classmethod
    def load(cls, spec: JobSpec) -> ScoringContext:
        log.info("preparing model %s for scoring (run %s)", spec.model, spec.run_id)
        contexts[spec.run_id] += 1
        try:
            return cls(spec)
        except ModelError as err:
            # The driver found the model; a worker that cannot is on another machine or sees
            # another filesystem.
            raise ModelError(
                f"{err} on worker {worker_name()}: a local --model must be at the same absolute path "
                "on every worker (a shared filesystem), or use a remote URI such as gs://..."
            ) from None

    def worker_stats(self) -> WorkerStats:
        """This process's counts for the run (reported in ``_SUCCESS``)."""
        run_id = self.spec.run_id
        return WorkerStats(worker_name(), contexts[run_id], model_cache.loads[run_id])


def source_lists(flags: np.ndarray, sources: tuple[str, ...]) -> pa.ListArray:
    """The names of the ``sources`` set in each row of ``flags`` [N, len(sources)]."""
    offsets = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int32)
    names = np.broadcast_to(np.array(sources, dtype=object), flags.shape)[flags]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(names.tolist(), pa.string()))


contexts: Counter[str] = Counter()  # ScoringContexts built by this process, by run id


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerStats:
    """How often one worker process set up the run's scoring state and loaded the model."""

    worker: str
    contexts: int
    model_loads: int


def catalog_ids(model_dir: Path, kind: str) -> list:
    """Ids of the catalog's users (int) or books (str), in catalog order, without loading features."""
    name, column = (layout.USERS_FILE, "user_id") if kind == "user" else (layout.BOOKS_FILE, "isbn")
    values = pq.read_table(model_dir / layout.catalog_path(name), columns=[column])[column].to_pylist()
    return [int(v) for v in values] if kind == "user" else [str(v) for v in values]
