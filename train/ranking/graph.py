"""The RP3beta item-item graph (Paudel et al. 2016) over catalog rows, from the training history.

``P_ui`` is the user -> book transition matrix (rows of the binary history normalised), ``P_iu`` the
book -> user one; both are raised elementwise to ``alpha``. ``W = P_iu @ P_ui``, each column j
divided by ``popularity(j) ** beta``, the diagonal dropped, and each row (a source book) cut to its
``neighbours`` largest entries. W is built a block of source books at a time, blocks sized so that
one block's product holds at most ``max_entries`` entries, so memory stays bounded at 270k books.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp

from model.candidates import ItemGraph, RankedRows


def _power(deg: np.ndarray, exponent: float) -> np.ndarray:
    out = np.zeros_like(deg, dtype=np.float64)
    np.power(deg, exponent, out=out, where=deg > 0)
    return out


def cap_heavy_users(x: sp.csr_matrix, max_reads: int, seed: int) -> sp.csr_matrix:
    """``x`` with every user above ``max_reads`` books cut to a seeded sample of ``max_reads``: a
    reader of 10,000 books costs 10^8 co-occurrences and, down-weighted by ``deg(u) ** -alpha``,
    says little about any two of them."""
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


def rp3beta_graph(
    x: sp.csr_matrix,
    alpha: float,
    beta: float,
    neighbours: int,
    max_reads: int = 2000,
    max_entries: int = 20_000_000,
    seed: int = 0,
) -> ItemGraph:
    """The graph of a binary [users, books] history matrix ``x`` (see the module docstring)."""
    x = cap_heavy_users(x.tocsr().astype(np.float32), max_reads, seed)
    deg_user = np.asarray(x.sum(axis=1)).ravel()
    deg_book = np.asarray(x.sum(axis=0)).ravel()
    user_to_book = (sp.diags(_power(deg_user, -1.0) ** alpha) @ x).tocsr().astype(np.float32)
    book_to_user = (x @ sp.diags(_power(deg_book, -1.0) ** alpha)).T.tocsr().astype(np.float32)
    penalty = sp.diags(_power(deg_book, -beta).astype(np.float32))
    # Entries of row i of W: at most sum over i's readers of their reads.
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
        w = (book_to_user[start:end] @ user_to_book @ penalty).tocsr()
        w.setdiag(0.0, k=start)  # no book is its own neighbour
        ranked = RankedRows.of(w)
        keep = ranked.rank < neighbours
        rows = np.repeat(np.arange(w.shape[0]), np.diff(ranked.matrix.indptr))[keep]
        parts.append(sp.csr_matrix((ranked.matrix.data[keep], (rows, ranked.matrix.indices[keep])), shape=w.shape))
    weights = sp.vstack(parts, format="csr", dtype=np.float32) if parts else sp.csr_matrix((0, 0), dtype=np.float32)
    return ItemGraph(weights)
