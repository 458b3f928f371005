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
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from model.candidates import interaction_matrix
from model.topk import top_k_excluding
from train.ranking.graph import MAX_ENTRIES, MAX_READS, cap_heavy_users, co_read_rows, rp3beta_rows

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


def _widest(settings: list[dict[str, Any]], n: int, key: Callable[[dict[str, Any]], Any]) -> int | None:
    """The most ``neighbours`` among the run of settings from ``n`` on that share ``key`` with
    ``settings[n]`` (None, all of them, where one keeps all): what one build must keep for the run."""
    run = list(itertools.takewhile(lambda s: key(s) == key(settings[n]), settings[n:]))
    return None if any(s["neighbours"] is None for s in run) else max(s["neighbours"] for s in run)


class ItemKNN(_Fitted):
    """Item-item cosine kNN: score = history @ S, S the cosine similarity of item columns.

    ``S[i, j] = co(i, j) / (|i| |j| + shrink)`` with co the number of users who have both items and
    |i| the square root of item i's user count; the diagonal is zero. For each target item j only its
    ``neighbours`` most similar items are kept (None keeps all; ties: the lower item), the classic
    item-kNN prune, which also bounds the memory of S to ``neighbours * n_items`` entries. S is built
    a block of items at a time and its heaviest readers are cut first, as the RP3beta graph is
    (``train.ranking.graph``: ``co_read_rows``, ``cap_heavy_users``).
    """

    def __init__(
        self,
        neighbours: int | None = 100,
        shrink: float = 0.0,
        max_reads: int = MAX_READS,
        max_entries: int = MAX_ENTRIES,
        seed: int = 0,
    ) -> None:
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None, got {neighbours}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.neighbours = neighbours
        self.shrink = shrink
        self.max_reads, self.max_entries, self.seed = max_reads, max_entries, seed
        self.name = f"item-kNN (cosine, {neighbours or 'all'} nn" + (f", shrink {shrink:g})" if shrink else ")")

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        setting = {"neighbours": self.neighbours, "shrink": self.shrink}
        fitted = next(self.grid(train, [setting], self.max_reads, self.max_entries, self.seed))
        self.n_items, self.sim = fitted.n_items, fitted.sim
        return self

    @classmethod
    def grid(
        cls,
        train: sp.csr_matrix,
        settings: list[dict[str, Any]],
        max_reads: int = MAX_READS,
        max_entries: int = MAX_ENTRIES,
        seed: int = 0,
    ) -> Iterator[ItemKNN]:
        """One fitted model per setting (``neighbours``, ``shrink``), in order. S is built once per
        run of equal shrinks, keeping the run's widest ``neighbours`` ranked, so each ``neighbours``
        is a mask (list settings of one shrink together)."""
        x = cap_heavy_users(_binary(train, "train"), max_reads, seed)
        n_items = x.shape[1]
        by_item = x.T.tocsr()
        norm = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel())

        def cosine(shrink: float) -> Callable[[int, int], sp.spmatrix]:
            def block(start: int, end: int) -> sp.spmatrix:
                co = (by_item[start:end] @ x).tocoo()
                sim = co.data.astype(np.float64) / (norm[co.row + start] * norm[co.col] + shrink)
                return sp.csr_matrix((sim.astype(np.float32), (co.row, co.col)), shape=co.shape)

            return block

        ranked, current = None, None
        for n, setting in enumerate(settings):
            model = cls(**setting, max_reads=max_reads, max_entries=max_entries, seed=seed)
            if ranked is None or model.shrink != current:
                ranked = None  # the previous ranking goes before the next is built
                widest = _widest(settings, n, lambda s: s["shrink"])
                ranked, current = co_read_rows(x, cosine(model.shrink), widest, max_entries), model.shrink
            # S is symmetric, so the best of its row j are the best of its column j: S keeps them as columns.
            model.n_items, model.sim = n_items, ranked.head(model.neighbours).matrix.T.tocsr()
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
    as the reference implementation of Dacrema et al. 2019 does); score = history @ W. W is the
    ranking stage's item graph (``train.ranking.graph``), heavy readers cut and built a block of items
    at a time alike, so with the graph's settings and seed it is the shipped graph.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        neighbours: int = 100,
        max_reads: int = MAX_READS,
        max_entries: int = MAX_ENTRIES,
        seed: int = 0,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        self.alpha, self.beta, self.neighbours = alpha, beta, neighbours
        self.max_reads, self.max_entries, self.seed = max_reads, max_entries, seed
        self.name = f"RP3β (α {alpha:g}, β {beta:g}, {neighbours} nn)"

    def fit(self, train: sp.csr_matrix) -> RP3beta:
        setting = {"alpha": self.alpha, "beta": self.beta, "neighbours": self.neighbours}
        fitted = next(self.grid(train, [setting], self.max_reads, self.max_entries, self.seed))
        self.n_items, self.weights = fitted.n_items, fitted.weights
        return self

    @classmethod
    def grid(
        cls,
        train: sp.csr_matrix,
        settings: list[dict[str, Any]],
        max_reads: int = MAX_READS,
        max_entries: int = MAX_ENTRIES,
        seed: int = 0,
    ) -> Iterator[RP3beta]:
        """One fitted model per setting (``alpha``, ``beta``, ``neighbours``), in order. The walk is
        built once per run of equal (alpha, beta), keeping the run's widest ``neighbours`` ranked
        per item, so each ``neighbours`` is a mask (list settings of one walk together)."""
        x = cap_heavy_users(_binary(train, "train"), max_reads, seed)
        ranked, current = None, None
        for n, setting in enumerate(settings):
            model = cls(**setting, max_reads=max_reads, max_entries=max_entries, seed=seed)
            walk = (model.alpha, model.beta)
            if walk != current:
                ranked = None  # the previous walk goes before the next is built
                widest = _widest(settings, n, lambda s: (s["alpha"], s["beta"]))
                ranked, current = rp3beta_rows(x, *walk, widest, max_entries), walk
            model.n_items, model.weights = x.shape[1], ranked.head(model.neighbours).matrix
            yield model

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
