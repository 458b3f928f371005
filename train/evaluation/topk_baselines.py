"""Top-K recommendation baselines sharing one fit/score interface.

Every baseline is fitted on a scipy CSR matrix [n_users, n_items] of implicit interactions (1.0 per
rated pair, see :func:`interaction_matrix`) and scores the rows of ``history``, a CSR [U, n_items]
holding each scored user's known items: their training interactions for a warm user, or the few
items a new user revealed (fold-in), so one call serves both. ``score`` returns a dense float32
[U, n_items]; the caller scores users in blocks (:func:`recommend_top_k` does) so that memory stays at
about ``block * n_items * 4`` bytes, e.g. 2,048 users x 27,108 books = 222 MB.

Defaults: 64 factors for ALS and lambda 500 for EASE follow the evaluation protocol of issue 7;
100 neighbours without shrink for item-kNN is the common choice. ``bench/bench_topk_baselines.py
--tune`` fits the grid (kNN neighbours 20..all and shrink 0/10/50, ALS regularisation x alpha, EASE
lambda 100..1000) on the training split and reads it on the validation split, never on test; change
a default only on what that table shows.
"""

from __future__ import annotations

import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from train.evaluation.metrics import top_k_excluding

__all__ = [
    "ALS",
    "EASE",
    "BaselineSkipped",
    "ItemKNN",
    "MostPopular",
    "TopKBaseline",
    "interaction_matrix",
    "recommend_top_k",
]


class BaselineSkipped(RuntimeError):
    """A baseline cannot run on this data (e.g. EASE's dense item x item matrix would not fit)."""


@runtime_checkable
class TopKBaseline(Protocol):
    name: str

    def fit(self, train: sp.csr_matrix) -> TopKBaseline: ...

    def score(self, history: sp.csr_matrix) -> np.ndarray: ...


def interaction_matrix(user_rows: npt.ArrayLike, item_rows: npt.ArrayLike, n_users: int, n_items: int) -> sp.csr_matrix:
    """CSR float32 [n_users, n_items] with 1.0 at every (user, item) pair; duplicate pairs collapse to 1.0."""
    u = np.asarray(user_rows, dtype=np.int64).ravel()
    i = np.asarray(item_rows, dtype=np.int64).ravel()
    if u.shape != i.shape:
        raise ValueError(f"length mismatch: user_rows has {u.size}, item_rows has {i.size}")
    if u.size and (u.min() < 0 or u.max() >= n_users):
        raise ValueError(f"user_rows outside 0..{n_users - 1}")
    if i.size and (i.min() < 0 or i.max() >= n_items):
        raise ValueError(f"item_rows outside 0..{n_items - 1}")
    m = sp.csr_matrix((np.ones(u.size, dtype=np.float32), (u, i)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _binary(m: sp.spmatrix, what: str, n_items: int | None = None) -> sp.csr_matrix:
    """``m`` as a CSR float32 matrix of ones at its non-zero entries; checks its width."""
    if not sp.issparse(m) or m.ndim != 2:
        raise ValueError(f"{what} must be a 2-D scipy sparse matrix, got {type(m).__name__}")
    if n_items is not None and m.shape[1] != n_items:
        raise ValueError(f"{what} has {m.shape[1]} item columns, the model was fitted on {n_items}")
    out = sp.csr_matrix(m, dtype=np.float32, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


class _Fitted:
    n_items: int | None = None

    def _need_fit(self) -> int:
        if self.n_items is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        return self.n_items


class MostPopular(_Fitted):
    """Every user gets the books with the most training interactions."""

    name = "most-popular"

    def fit(self, train: sp.csr_matrix) -> MostPopular:
        x = _binary(train, "train")
        self.n_items = x.shape[1]
        self.counts = np.asarray(x.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        return np.tile(self.counts, (h.shape[0], 1))


def _keep_top_per_column(s: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of every column of ``s`` (ties: lower row index first)."""
    csc = s.tocsc()
    csc.sort_indices()
    counts = np.diff(csc.indptr)
    cols = np.repeat(np.arange(csc.shape[1]), counts)
    order = np.lexsort((csc.indices, -csc.data, cols))  # by column, then value desc, then row
    starts = np.repeat(csc.indptr[:-1], counts)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size) - starts
    keep = rank < k
    return sp.csr_matrix((csc.data[keep], (csc.indices[keep], cols[keep])), shape=csc.shape, dtype=np.float32)


def _cap_heavy_rows(x: sp.csr_matrix, max_pairs: int, seed: int) -> sp.csr_matrix:
    """``x`` with the longest rows cut to a seeded sample of ``cap`` items, ``cap`` the largest that
    keeps ``sum(min(len(row), cap) ** 2)`` (the co-occurrence pairs ``x.T @ x`` builds) within
    ``max_pairs``. A reader of 10,000 books alone adds 10^8 pairs (over a GB) and says little about
    any two of them; a matrix within the budget is returned unchanged."""
    lengths = np.diff(x.indptr)
    if int((lengths.astype(np.int64) ** 2).sum()) <= max_pairs:
        return x
    lo, hi = 1, int(lengths.max())
    while lo < hi:  # the largest cap within the budget
        mid = (lo + hi + 1) // 2
        if int((np.minimum(lengths, mid).astype(np.int64) ** 2).sum()) <= max_pairs:
            lo = mid
        else:
            hi = mid - 1
    rng = np.random.default_rng(seed)
    keep = np.ones(x.nnz, dtype=bool)
    for row in np.flatnonzero(lengths > lo):
        start = x.indptr[row]
        drop = rng.choice(lengths[row], lengths[row] - lo, replace=False)
        keep[start + drop] = False
    rows = np.repeat(np.arange(x.shape[0]), lengths)[keep]
    return sp.csr_matrix((x.data[keep], (rows, x.indices[keep])), shape=x.shape, dtype=np.float32)


class ItemKNN(_Fitted):
    """Item-item cosine kNN: score = history @ S, S the cosine similarity of item columns.

    ``S[i, j] = co(i, j) / (|i| |j| + shrink)`` with co the number of users who have both items and
    |i| the square root of item i's user count; the diagonal is zero. For each target item j only its
    ``neighbours`` most similar items are kept (None keeps all), the classic item-kNN prune, which also
    bounds the memory of S to ``neighbours * n_items`` entries. Readers with very long histories are
    cut to a seeded sample so the co-occurrence count stays within ``max_pairs`` (see
    :func:`_cap_heavy_rows`); below that budget (every shared-data run) nothing is cut.
    """

    def __init__(
        self, neighbours: int | None = 100, shrink: float = 0.0, max_pairs: int = 50_000_000, seed: int = 0
    ) -> None:
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None, got {neighbours}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.neighbours = neighbours
        self.shrink = shrink
        self.max_pairs = max_pairs
        self.seed = seed
        self.name = f"item-kNN (cosine, {neighbours or 'all'} neighbours)"

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        x = _binary(train, "train")
        self.n_items = x.shape[1]
        x = _cap_heavy_rows(x, self.max_pairs, self.seed)
        co = (x.T @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        norm = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel())
        rows = np.repeat(np.arange(co.shape[0]), np.diff(co.indptr))
        co.data = (co.data / (norm[rows] * norm[co.indices] + self.shrink)).astype(np.float32)
        self.sim = co if self.neighbours is None else _keep_top_per_column(co, self.neighbours)
        return self

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        return np.asarray((h @ self.sim).toarray(), dtype=np.float32)


class ALS(_Fitted):
    """Implicit-feedback ALS (Hu, Koren, Volinsky) from the ``implicit`` library, CPU.

    Users are folded in at scoring time: their factors are solved in closed form against the fitted
    item factors from ``history`` (implicit's ``recalculate_user``), so warm and new users take the
    same path. ``num_threads=0`` uses every core; BLAS is held to one thread during fitting, as
    implicit recommends (its own threads already fill the cores), which also silences its warning.
    """

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.01,
        alpha: float = 1.0,
        iterations: int = 15,
        seed: int = 0,
        num_threads: int = 0,
        show_progress: bool = False,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed
        self.num_threads = num_threads
        self.show_progress = show_progress
        self.name = f"ALS ({factors} factors)"

    def fit(self, train: sp.csr_matrix) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        x = _binary(train, "train")
        self.n_items = x.shape[1]
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"implicit")
            self.model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=self.num_threads,
            )
            self.model.fit(x, show_progress=self.show_progress)
        self.item_factors = np.ascontiguousarray(self.model.item_factors, dtype=np.float32)
        return self

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        users = self.model.recalculate_user(np.arange(h.shape[0]), h)
        return np.asarray(users @ self.item_factors.T, dtype=np.float32)


class EASE(_Fitted):
    """EASE-R (Steck 2019): B = I - P / diag(P), P = (X'X + lambda I)^-1, diag(B) = 0; score = history @ B.

    Only items with at least one training interaction enter the inverse: an item nobody has has an
    all-zero Gram row, so its rows and columns of B are exactly zero and leaving it out changes
    nothing. The active-item count n still costs a dense n x n float32 matrix, two of them at the peak
    of the inverse (Cholesky, then its inverse), so ``fit`` raises :class:`BaselineSkipped` when n
    exceeds ``max_items``; callers report the baseline as skipped.
    """

    def __init__(self, lam: float = 500.0, max_items: int = 40_000) -> None:
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = lam
        self.max_items = max_items
        self.name = f"EASE (λ={lam:g})"

    def fit(self, train: sp.csr_matrix) -> EASE:
        x = _binary(train, "train")
        self.n_items = x.shape[1]
        self.active = np.flatnonzero(np.diff(x.tocsc().indptr) > 0)
        n = self.active.size
        if n > self.max_items:
            self.n_items = None
            raise BaselineSkipped(
                f"EASE skipped: {n:,} items with training interactions exceed max_items={self.max_items:,} "
                f"(its dense item x item matrix needs 2 x {n * n * 4 / 1e9:.1f} GB)"
            )
        xa = x[:, self.active]
        g = torch.from_numpy((xa.T @ xa).toarray().astype(np.float32, copy=False))
        g.diagonal().add_(self.lam)
        chol = torch.linalg.cholesky(g)
        del g
        p = torch.cholesky_inverse(chol)
        del chol
        p.div_(-p.diagonal().clone())  # column j divided by -P_jj
        p.fill_diagonal_(0.0)
        self.weights = p.numpy()
        return self

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        out = np.zeros((h.shape[0], self.n_items), dtype=np.float32)
        out[:, self.active] = h[:, self.active] @ self.weights
        return out


# Most scores one block of users holds (float32): 2^25 = 128 MB; ``top_k_excluding`` takes about
# three times that at its peak (its copy, and the partition's).
SCORE_BUDGET = 1 << 25


def recommend_top_k(
    model: TopKBaseline, history: sp.csr_matrix, exclude: sp.spmatrix, k: int, block: int | None = None
) -> np.ndarray:
    """Top-k item indices [U, k] (best first, -1 padding) for every row of ``history``.

    Scores ``block`` users at a time (default: as many as keep ``block * n_items`` within
    ``SCORE_BUDGET``, at most 2,048), so memory stays bounded whatever the catalog size, and never
    returns an item stored in ``exclude`` (same rows as ``history``).
    """
    if block is None:
        block = max(1, min(2048, SCORE_BUDGET // max(history.shape[1], 1)))
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    history = sp.csr_matrix(history)
    exclude = sp.csr_matrix(exclude)
    if exclude.shape[0] != history.shape[0]:
        raise ValueError(f"exclude has {exclude.shape[0]} rows, history has {history.shape[0]}")
    out = np.empty((history.shape[0], k), dtype=np.int64)
    for start in range(0, history.shape[0], block):
        stop = min(start + block, history.shape[0])
        out[start:stop] = top_k_excluding(model.score(history[start:stop]), exclude[start:stop], k)
    return out
