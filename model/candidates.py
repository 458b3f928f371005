"""Candidate sources besides the towers: an item-item graph and the reader's authors.

Both work on catalog rows and on blocks of users at once (one sparse matmul per block):

- **item graph** (RP3beta neighbour lists, built by ``train/ranking/graph.py`` from the training
  history): a reader's score of book j is the sum over history books i of ``W[i, j]``, i.e. the
  history matrix [U, B] times the graph [B, B];
- **same author**: the books by an author of the reader's history, ordered by popularity (the
  history matrix times book -> author times author -> book).

A new user's history is the books rated in the request, so they go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp


def interaction_matrix(user_rows: npt.ArrayLike, item_rows: npt.ArrayLike, n_users: int, n_items: int) -> sp.csr_matrix:
    """CSR float32 [n_users, n_items] with 1.0 at every (user, item) pair; repeated pairs count once."""
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


def history_matrix(history: Sequence[npt.ArrayLike], n_books: int) -> sp.csr_matrix:
    """:func:`interaction_matrix` with one row per user, ``history[u]`` the catalog rows user u read."""
    lengths = [len(h) for h in history]
    rows = np.repeat(np.arange(len(history)), lengths)
    cols = np.concatenate([np.asarray(h, np.int64) for h in history]) if sum(lengths) else np.zeros(0, np.int64)
    return interaction_matrix(rows, cols, len(history), n_books)


@dataclass
class RankedRows:
    """The non-zero entries of a [U, B] score matrix, with each entry's rank within its row."""

    matrix: sp.csr_matrix  # sorted indices
    rank: np.ndarray  # [nnz] 0 = the row's best, aligned with matrix.data

    @classmethod
    def of(cls, m: sp.csr_matrix) -> RankedRows:
        m = m.tocsr()
        m.eliminate_zeros()
        m.sort_indices()
        counts = np.diff(m.indptr)
        row = np.repeat(np.arange(m.shape[0]), counts)
        order = np.lexsort((m.indices, -m.data, row))  # by row, then score desc, then column
        rank = np.empty(m.nnz, np.int64)
        rank[order] = np.arange(m.nnz) - np.repeat(m.indptr[:-1], counts)
        return cls(m, rank)

    def head(self, n: int | None) -> RankedRows:
        """Only each row's ``n`` best entries (None: all of them), still ranked, so any smaller
        ``n`` is a mask of these."""
        if n is None:
            return self
        m = self.matrix
        keep = self.rank < n
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m.shape[0]))])
        return RankedRows(sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape), self.rank[keep])

    @classmethod
    def stack(cls, parts: Sequence[RankedRows], n_cols: int) -> RankedRows:
        """The rows of ``parts`` (each ``n_cols`` wide) one below the other."""
        ms = [p.matrix for p in parts]
        counts = np.concatenate([np.zeros(1, np.int64), *(np.diff(m.indptr) for m in ms)])
        data = np.concatenate([np.zeros(0, np.float32), *(m.data for m in ms)])
        indices = np.concatenate([np.zeros(0, np.int64), *(m.indices for m in ms)])
        rank = np.concatenate([np.zeros(0, np.int64), *(p.rank for p in parts)])
        return cls(sp.csr_matrix((data, indices, np.cumsum(counts)), shape=(len(counts) - 1, n_cols)), rank)

    def top(self, n: int) -> np.ndarray:
        """[U, n] columns of each row's ``n`` best entries, best first, -1 where a row has fewer."""
        m = self.matrix
        out = np.full((m.shape[0], n), -1, np.int64)
        keep = self.rank < n
        row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        out[row[keep], self.rank[keep]] = m.indices[keep]
        return out

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, rank) at each (row, col) pair; score 0 and rank -1 where the entry is zero."""
        return sparse_lookup(self.matrix, rows, cols, self.rank)


def sparse_lookup(
    m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray, extra: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Values of a CSR with sorted indices at (row, col) pairs (0 where absent), and ``extra``
    (an array aligned with ``m.data``) at the same entries (-1 where absent)."""
    if not m.has_sorted_indices:  # a sparse product's indices come unsorted
        m.sort_indices()
    n_cols = np.int64(m.shape[1])
    keys = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) * n_cols + m.indices
    wanted = rows.astype(np.int64) * n_cols + np.maximum(cols, 0)
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    found = (cols >= 0) & (len(keys) > 0) & (keys[at] == wanted) if len(keys) else np.zeros(len(rows), bool)
    value = np.where(found, m.data[at] if len(keys) else 0.0, 0.0).astype(np.float32)
    other = np.where(found, extra[at], -1) if extra is not None and len(keys) else np.full(len(rows), -1)
    return value, other


def rank_entries(query: np.ndarray, col: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank) of (query, column, value) triples in ``RankedRows`` order: ``order`` sorts them
    by query, then value descending, then column; ``rank[i]`` is the i-th sorted entry's position
    within its query (0 = best)."""
    order = np.lexsort((col, -value, query))
    sorted_query = query[order]
    return order, np.arange(len(order)) - np.searchsorted(sorted_query, sorted_query)


def best_first(query: np.ndarray, col: np.ndarray, value: np.ndarray, n_q: int, n: int) -> np.ndarray:
    """[n_q, n] columns of each query's ``n`` largest values (ties: lower column first), -1 padding."""
    order, rank = rank_entries(query, col, value)
    top = order[rank < n]
    out = np.full((n_q, n), -1, np.int64)
    out[query[top], rank[rank < n]] = col[top]
    return out


def drop_columns(m: sp.csr_matrix, exclude: sp.csr_matrix | None, keep: np.ndarray | None) -> sp.csr_matrix:
    """``m`` without the entries of ``exclude`` (same shape, binary) and, with ``keep`` (a bool per
    column), without the columns outside it."""
    if exclude is not None and exclude.nnz:
        m = m - m.multiply(exclude)
    if keep is not None:
        m = m @ sp.diags(keep.astype(np.float32))
    m = m.tocsr()
    m.eliminate_zeros()
    return m


@dataclass
class ItemGraph:
    """Sparse item-item weights [B, B] over catalog rows: row i holds book i's kept neighbours."""

    weights: sp.csr_matrix

    @property
    def n_books(self) -> int:
        return int(self.weights.shape[0])

    def scores(self, history: sp.csr_matrix) -> sp.csr_matrix:
        """[U, B] sum over each user's history books of their neighbour rows."""
        return (history @ self.weights).tocsr()

    def save(self, path: Path) -> None:
        w = self.weights.tocsr()
        np.savez(path, indptr=w.indptr, indices=w.indices, data=w.data.astype(np.float32), shape=np.array(w.shape))

    @classmethod
    def load(cls, path: Path) -> ItemGraph:
        with np.load(path) as z:
            shape = tuple(int(x) for x in z["shape"])
            return cls(sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape))


@dataclass
class AuthorIndex:
    """Books by each author, and each book's author and publisher code (-1 unknown)."""

    author: np.ndarray  # [B] code per catalog book
    publisher: np.ndarray  # [B]
    popularity: np.ndarray  # [B] training reads per catalog book
    per_author: int = 50  # most popular books of an author offered

    def __post_init__(self) -> None:
        n_books = len(self.author)
        self.n_authors = int(self.author.max()) + 1 if n_books and self.author.max() >= 0 else 0
        self.n_publishers = int(self.publisher.max()) + 1 if n_books and self.publisher.max() >= 0 else 0
        self.book_author = _one_hot(self.author, self.n_authors)  # [B, A]
        self.book_publisher = _one_hot(self.publisher, self.n_publishers)  # [B, P]
        # Author -> their ``per_author`` most read books, scored 1 + log1p(reads): by popularity.
        known = np.flatnonzero(self.author >= 0)
        order = known[np.lexsort((known, -self.popularity[known], self.author[known]))]
        code = self.author[order]
        first = np.searchsorted(code, code)  # start of each author's run
        keep = (np.arange(len(order)) - first) < self.per_author
        book = order[keep]
        self.author_books = sp.csr_matrix(
            (1.0 + np.log1p(self.popularity[book]).astype(np.float32), (self.author[book], book)),
            shape=(self.n_authors, n_books),
        )

    def counts(self, history: sp.csr_matrix) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """[U, A] history books per author and [U, P] per publisher."""
        return (history @ self.book_author).tocsr(), (history @ self.book_publisher).tocsr()

    def scores(self, author_counts: sp.csr_matrix) -> sp.csr_matrix:
        """[U, B] the books of the reader's authors, scored by popularity."""
        read = author_counts.copy()
        read.data[:] = 1.0
        return (read @ self.author_books).tocsr()


def _one_hot(code: np.ndarray, n: int) -> sp.csr_matrix:
    known = np.flatnonzero(code >= 0)
    return sp.csr_matrix((np.ones(len(known), np.float32), (known, code[known])), shape=(len(code), n))
