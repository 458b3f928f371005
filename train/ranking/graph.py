"""Item-item neighbour lists from co-reads: the RP3beta graph (Paudel et al. 2016) over catalog
rows, which the ranking stage ships and the evaluation's RP3beta baseline is, and the block-wise
build that item-kNN's cosine shares.

``P_ui`` is the user -> book transition matrix (rows of the binary history normalised), ``P_iu`` the
book -> user one; both are raised elementwise to ``alpha``. ``W = P_iu @ P_ui``, each column j
divided by ``popularity(j) ** beta``, the diagonal dropped, and each row (a source book) cut to its
``neighbours`` largest entries (ties: the lower column).

Every item-item matrix here is built a block of source books at a time, blocks sized so that one
block's product holds at most ``max_entries`` entries, so memory stays bounded at 270k books. Its
cost is the co-read pairs, ``sum(reads(u) ** 2)`` over readers, so every reader above ``MAX_READS``
books is first cut to a seeded sample of that many (:func:`cap_heavy_users`): the one rule for the
graph and the baselines.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from model.candidates import ItemGraph, RankedRows

MAX_READS = 2000  # books kept of a heavier reader
MAX_ENTRIES = 20_000_000  # entries of one block's product


def _power(deg: np.ndarray, exponent: float) -> np.ndarray:
    out = np.zeros_like(deg, dtype=np.float64)
    np.power(deg, exponent, out=out, where=deg > 0)
    return out


def cap_heavy_users(x: sp.csr_matrix, max_reads: int = MAX_READS, seed: int = 0) -> sp.csr_matrix:
    """``x`` with every user above ``max_reads`` books cut to a seeded sample of ``max_reads`` (``x``
    itself when nobody is): a reader of 10,000 books costs 10^8 co-reads and, down-weighted by
    ``deg(u) ** -alpha`` (or counted once among 10,000 by item-kNN), says little about any two of them."""
    lengths = np.diff(x.indptr)
    heavy = np.flatnonzero(lengths > max_reads)
    if not len(heavy):
        return x
    rng = np.random.default_rng(seed)
    keep = np.ones(x.nnz, bool)
    for row in heavy:
        drop = rng.choice(lengths[row], lengths[row] - max_reads, replace=False)
        keep[x.indptr[row] + drop] = False
    rows = np.repeat(np.arange(x.shape[0]), lengths)[keep]
    return sp.csr_matrix((x.data[keep], (rows, x.indices[keep])), shape=x.shape, dtype=np.float32)


def co_read_rows(
    x: sp.csr_matrix,
    block: Callable[[int, int], sp.spmatrix],
    keep: int | None,
    max_entries: int = MAX_ENTRIES,
) -> RankedRows:
    """The rows of an item-item matrix over the co-reads of ``x`` [users, items], ``block(start,
    end)`` giving its rows ``start:end``, with the diagonal dropped and each row cut to its ``keep``
    largest entries (None: all), ranked."""
    deg_user = np.asarray(x.sum(axis=1)).ravel()
    # Entries of row i: at most the sum over i's readers of their reads.
    cost = np.asarray(x.T @ deg_user).ravel()
    bounds = [0]
    total = 0.0
    for i, c in enumerate(cost):
        if total + c > max_entries and i > bounds[-1]:
            bounds.append(i)
            total = 0.0
        total += c
    bounds.append(x.shape[1])
    parts = []
    for start, end in itertools.pairwise(bounds):
        w = sp.csr_matrix(block(start, end))
        row = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
        w.data[w.indices == row + start] = 0.0  # no item is its own neighbour (RankedRows drops zeros)
        parts.append(RankedRows.of(w).head(keep))
    return RankedRows.stack(parts, x.shape[1])


def rp3beta_rows(
    x: sp.csr_matrix, alpha: float, beta: float, keep: int | None, max_entries: int = MAX_ENTRIES
) -> RankedRows:
    """W's rows (see the module docstring) of a binary float32 [users, books] ``x``, whose heavy
    readers are already cut, each row cut to its ``keep`` largest entries and ranked."""
    deg_user = np.asarray(x.sum(axis=1)).ravel()
    deg_book = np.asarray(x.sum(axis=0)).ravel()
    user_to_book = (sp.diags(_power(deg_user, -1.0) ** alpha) @ x).tocsr().astype(np.float32)
    book_to_user = (x @ sp.diags(_power(deg_book, -1.0) ** alpha)).T.tocsr().astype(np.float32)
    penalty = sp.diags(_power(deg_book, -beta).astype(np.float32))
    return co_read_rows(x, lambda start, end: book_to_user[start:end] @ user_to_book @ penalty, keep, max_entries)


def rp3beta_graph(
    x: sp.csr_matrix,
    alpha: float,
    beta: float,
    neighbours: int,
    max_reads: int = MAX_READS,
    max_entries: int = MAX_ENTRIES,
    seed: int = 0,
) -> ItemGraph:
    """The graph of a binary [users, books] history matrix ``x`` (see the module docstring)."""
    x = cap_heavy_users(x.tocsr().astype(np.float32), max_reads, seed)
    return ItemGraph(rp3beta_rows(x, alpha, beta, neighbours, max_entries).matrix)
