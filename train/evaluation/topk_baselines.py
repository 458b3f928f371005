"""Top-K recommendation baselines sharing one fit/score interface.

Every baseline is fitted on a scipy CSR matrix [n_users, n_items] of implicit interactions (1.0 per
rated pair, see :func:`model.candidates.interaction_matrix`) and scores the rows of ``history``, a
CSR [U, n_items] holding each scored user's known items: their training interactions for a warm
user, or the few items a new user revealed (fold-in), so one call serves both. ``score`` returns a
dense float32 [U, n_items]; the caller scores users in blocks (:func:`recommend_top_k` does) so that
memory stays at about ``block * n_items * 4`` bytes, e.g. 2,048 users x 27,108 books = 222 MB.

The constructor defaults are plain starting points: ``train.evaluation.tuning`` fits each
method's grid (``eval.topk_tuning`` in the config) on the training split and keeps the setting with
the best validation recall@10, so the evaluation never reports an untuned baseline.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from model.candidates import interaction_matrix
from model.topk import top_k_excluding

__all__ = [
    "ALS",
    "EASE",
    "BaselineSkipped",
    "ItemKNN",
    "MostPopular",
    "RP3beta",
    "SameAuthor",
    "TopKBaseline",
    "recommend_top_k",
]


class BaselineSkipped(RuntimeError):
    """A baseline cannot run on this data (e.g. EASE's dense item x item matrix would not fit)."""


@runtime_checkable
class TopKBaseline(Protocol):
    name: str

    def fit(self, train: sp.csr_matrix) -> TopKBaseline: ...

    def score(self, history: sp.csr_matrix) -> np.ndarray: ...


def _binary(m: sp.spmatrix, what: str, n_items: int | None = None) -> sp.csr_matrix:
    """``m`` as a CSR float32 matrix of ones at its non-zero entries; checks its width."""
    if not sp.issparse(m) or m.ndim != 2:
        raise ValueError(f"{what} must be a 2-D scipy sparse matrix, got {type(m).__name__}")
    if n_items is not None and m.shape[1] != n_items:
        raise ValueError(f"{what} has {m.shape[1]} item columns, the model was fitted on {n_items}")
    coo = m.tocoo()
    stored = coo.data != 0
    return interaction_matrix(coo.row[stored], coo.col[stored], *m.shape)


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


@dataclass
class _RankedColumns:
    """The entries of a sparse matrix, each with its rank in its column (0 = largest; ties: lower
    row index first), so keeping the top k of every column is a mask, for any k."""

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    data: np.ndarray
    rank: np.ndarray

    @classmethod
    def of(cls, s: sp.spmatrix) -> _RankedColumns:
        csc = sp.csc_matrix(s)
        csc.sort_indices()
        counts = np.diff(csc.indptr)
        cols = np.repeat(np.arange(csc.shape[1]), counts)
        order = np.lexsort((csc.indices, -csc.data, cols))  # by column, then value desc, then row
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size) - np.repeat(csc.indptr[:-1], counts)
        return cls(csc.shape, csc.indices.copy(), cols, csc.data.astype(np.float32), rank)

    def head(self, k: int) -> _RankedColumns:
        """Only the entries ranked below ``k`` (what any top-k with a smaller k needs)."""
        keep = self.rank < k
        return _RankedColumns(self.shape, self.rows[keep], self.cols[keep], self.data[keep], self.rank[keep])

    def top(self, k: int | None) -> sp.csr_matrix:
        """The ``k`` largest entries of every column (None: all of them) as a CSR float32."""
        keep = self.rank < k if k is not None else slice(None)
        return sp.csr_matrix((self.data[keep], (self.rows[keep], self.cols[keep])), shape=self.shape, dtype=np.float32)


def _keep_top_per_column(s: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of every column of ``s`` (ties: lower row index first)."""
    return _RankedColumns.of(s).top(k)


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
        self.name = f"item-kNN (cosine, {neighbours or 'all'} nn" + (f", shrink {shrink:g})" if shrink else ")")

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        setting = {"neighbours": self.neighbours, "shrink": self.shrink}
        fitted = next(self.grid(train, [setting], self.max_pairs, self.seed))
        self.n_items, self.sim = fitted.n_items, fitted.sim
        return self

    @classmethod
    def grid(
        cls, train: sp.csr_matrix, settings: list[dict[str, Any]], max_pairs: int = 50_000_000, seed: int = 0
    ) -> Iterator[ItemKNN]:
        """One fitted model per setting (``neighbours``, ``shrink``), in order. The co-occurrence
        counts are computed once, the similarity and its ranking once per run of equal shrinks (so
        list settings of one shrink together); each ``neighbours`` is then a mask of the ranking."""
        x = _binary(train, "train")
        n_items = x.shape[1]
        x = _cap_heavy_rows(x, max_pairs, seed)
        co = (x.T @ x).tocoo()
        off = co.row != co.col
        norm = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel())
        rows, cols, counts = co.row[off], co.col[off], co.data[off].astype(np.float64)
        ranked, current = None, None
        for setting in settings:
            model = cls(**setting, max_pairs=max_pairs, seed=seed)
            if ranked is None or model.shrink != current:
                ranked = None  # the previous ranking goes before the next is built
                sim = (counts / (norm[rows] * norm[cols] + model.shrink)).astype(np.float32)
                ranked, current = (
                    _RankedColumns.of(sp.csr_matrix((sim, (rows, cols)), shape=(n_items, n_items))),
                    model.shrink,
                )
            model.n_items, model.sim = n_items, ranked.top(model.neighbours)
            yield model

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
        self.name = f"ALS ({factors} factors, reg {regularization:g}, α {alpha:g})"

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
        from threadpoolctl import threadpool_limits

        h = _binary(history, "history", self._need_fit())
        # One BLAS thread while implicit solves the users: with more, OpenBLAS threads inside its
        # OpenMP loop thrash (27x slower on 300 users of a loaded 2-core machine).
        with threadpool_limits(1, "blas"):
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
        self.name = f"EASE (λ {lam:g})"

    def fit(self, train: sp.csr_matrix) -> EASE:
        return self._solve(*self.gram(train, self.max_items))

    @staticmethod
    def gram(train: sp.csr_matrix, max_items: int) -> tuple[int, np.ndarray, sp.csr_matrix]:
        """(n_items, active items, sparse X'X over them): what every lambda's fit starts from.

        Raises :class:`BaselineSkipped` when there are more than ``max_items`` active items."""
        x = _binary(train, "train")
        active = np.flatnonzero(np.diff(x.tocsc().indptr) > 0)
        n = active.size
        if n > max_items:
            raise BaselineSkipped(
                f"EASE skipped: {n:,} items with training interactions exceed max_items={max_items:,} "
                f"(its dense item x item matrix needs 2 x {n * n * 4 / 1e9:.1f} GB)"
            )
        xa = x[:, active]
        return x.shape[1], active, (xa.T @ xa).tocsr()

    @classmethod
    def grid(cls, train: sp.csr_matrix, lams: list[float], max_items: int = 40_000) -> Iterator[EASE]:
        """One fitted EASE per lambda, in order, all from one Gram matrix (kept sparse; only the
        inverse is paid per lambda). Each is yielded before the next is fitted, so a caller that
        keeps only the best so far holds it and the next fit's two dense matrices at the most."""
        shared = cls.gram(train, max_items)
        for lam in lams:
            yield cls(lam, max_items)._solve(*shared)

    def _solve(self, n_items: int, active: np.ndarray, gram: sp.csr_matrix) -> EASE:
        g = torch.from_numpy(gram.toarray().astype(np.float32, copy=False))
        g.diagonal().add_(self.lam)
        chol = torch.linalg.cholesky(g)
        del g
        p = torch.cholesky_inverse(chol)
        del chol
        p.div_(-p.diagonal().clone())  # column j divided by -P_jj
        p.fill_diagonal_(0.0)
        self.weights = p.numpy()
        self.n_items, self.active = n_items, active
        return self

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        out = np.zeros((h.shape[0], self.n_items), dtype=np.float32)
        out[:, self.active] = h[:, self.active] @ self.weights
        return out


class RP3beta(_Fitted):
    """RP3beta (Paudel et al. 2016): a 3-step random walk item -> user -> item, popularity-penalised.

    With binary interactions, ``W[i, j] = deg(i)^-alpha * sum_u x_ui x_uj deg(u)^-alpha * deg(j)^-beta``
    (the walk's transition probabilities raised to ``alpha``; ``beta`` divides by the target's
    popularity), the diagonal zero, and only each item's ``neighbours`` largest entries kept (per row,
    as the reference implementation of Dacrema et al. 2019 does); score = history @ W. W is built
    ``block`` items at a time, so memory stays at one block's co-occurrences plus the kept
    ``neighbours * n_items`` entries whatever the catalog size.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        neighbours: int = 100,
        block: int = 4096,
        max_pairs: int = 50_000_000,
        seed: int = 0,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        self.alpha, self.beta, self.neighbours, self.block = alpha, beta, neighbours, block
        self.max_pairs, self.seed = max_pairs, seed
        self.name = f"RP3β (α {alpha:g}, β {beta:g}, {neighbours} nn)"

    def fit(self, train: sp.csr_matrix) -> RP3beta:
        setting = {"alpha": self.alpha, "beta": self.beta, "neighbours": self.neighbours}
        fitted = next(self.grid(train, [setting], self.block, self.max_pairs, self.seed))
        self.n_items, self.weights = fitted.n_items, fitted.weights
        return self

    @classmethod
    def grid(
        cls,
        train: sp.csr_matrix,
        settings: list[dict[str, Any]],
        block: int = 4096,
        max_pairs: int = 50_000_000,
        seed: int = 0,
    ) -> Iterator[RP3beta]:
        """One fitted model per setting (``alpha``, ``beta``, ``neighbours``), in order. The walk is
        built once per run of equal (alpha, beta), keeping the largest ``neighbours`` of that run
        ranked per item, so each ``neighbours`` is a mask (list settings of one walk together).
        The heaviest readers are cut as item-kNN's are (:func:`_cap_heavy_rows`): at full size one
        reader of 24k books made every block of the walk nearly dense."""
        x = _cap_heavy_rows(_binary(train, "train"), max_pairs, seed)
        n_items = x.shape[1]
        deg_user = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        deg_item = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        blocks: list[_RankedColumns] = []
        current = None
        for n, setting in enumerate(settings):
            model = cls(**setting, block=block, max_pairs=max_pairs, seed=seed)
            walk = (model.alpha, model.beta)
            if walk != current:
                blocks = []  # the previous walk goes before the next is built
                same = itertools.takewhile(lambda s, w=walk: (s["alpha"], s["beta"]) == w, settings[n:])
                widest = max(s["neighbours"] for s in same)
                blocks, current = list(cls._walk(x, deg_user, deg_item, *walk, widest, block)), walk
            # Each block holds W's rows as columns: its per-column ranks are W's per-row ones.
            model.n_items = n_items
            model.weights = sp.vstack([b.top(model.neighbours).T for b in blocks], format="csr", dtype=np.float32)
            yield model

    @staticmethod
    def _walk(
        x: sp.csr_matrix, deg_user: np.ndarray, deg_item: np.ndarray, alpha: float, beta: float, keep: int, block: int
    ) -> Iterator[_RankedColumns]:
        """W's rows ``block`` at a time, transposed and ranked, each row cut to its ``keep`` largest."""

        def power(deg: np.ndarray, exponent: float) -> np.ndarray:
            out = np.zeros_like(deg)
            np.power(deg, exponent, out=out, where=deg > 0)
            return out

        user_to_item = sp.diags(power(deg_user, -alpha)) @ x  # P(item | user) ** alpha
        item_to_user = (x @ sp.diags(power(deg_item, -alpha))).T.tocsr()  # P(user | item) ** alpha
        penalty = sp.diags(power(deg_item, -beta))
        for start in range(0, x.shape[1], block):
            w = (item_to_user[start : start + block] @ user_to_item @ penalty).tocoo()
            off = w.row + start != w.col  # no item recommends itself
            w = sp.csr_matrix((w.data[off], (w.col[off], w.row[off])), shape=(w.shape[1], w.shape[0]))
            yield _RankedColumns.of(w).head(keep)

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        h = _binary(history, "history", self._need_fit())
        return np.asarray((h @ self.weights).toarray(), dtype=np.float32)


class SameAuthor(_Fitted):
    """Content baseline: books by an author of the reader's history first, then the rest; within
    each group by training popularity, and where that ties (books nobody read, e.g. every cold book)
    in a random order fixed by ``seed``. ``authors`` holds an author code per item, -1 where unknown
    (an unknown author matches nobody)."""

    name = "same author first"

    def __init__(self, authors: npt.ArrayLike, seed: int = 0) -> None:
        self.authors = np.asarray(authors, dtype=np.int64).ravel()
        self.seed = seed

    def fit(self, train: sp.csr_matrix) -> SameAuthor:
        x = _binary(train, "train", self.authors.size)
        self.n_items = x.shape[1]
        popularity = np.asarray(x.sum(axis=0)).ravel()
        tiebreak = np.random.default_rng(self.seed).random(self.n_items)
        order = np.lexsort((tiebreak, popularity))  # least popular first
        self.rank = np.empty(self.n_items, np.float32)
        self.rank[order] = np.arange(self.n_items, dtype=np.float32)
        known = np.flatnonzero(self.authors >= 0)
        n_authors = int(self.authors.max(initial=-1)) + 1
        self.by_author = sp.csr_matrix(
            (np.ones(known.size, np.float32), (known, self.authors[known])), shape=(self.n_items, n_authors)
        )
        return self

    def score(self, history: sp.csr_matrix, items: npt.ArrayLike | None = None) -> np.ndarray:
        """[U, len(items)] scores of ``items`` (default: every item): same author adds ``n_items``,
        more than any popularity rank, so it always comes first (exact in float32 below 2^23 items)."""
        h = _binary(history, "history", self._need_fit())
        cols = np.arange(self.n_items) if items is None else np.asarray(items, dtype=np.int64).ravel()
        read_authors = h @ self.by_author  # [U, authors]: how many history books each author wrote
        same = (read_authors @ self.by_author[cols].T).toarray() > 0
        return self.rank[cols][None, :] + np.float32(self.n_items) * same.astype(np.float32)


# Most scores one block of users holds (float32): 2^25 = 128 MB; ``top_k_excluding`` works on them in
# place, with sortable keys for 2^22 of them at a time (32 MB) besides.
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
        out[start:stop] = top_k_excluding(model.score(history[start:stop]), exclude[start:stop], k)[1].numpy()
    return out
