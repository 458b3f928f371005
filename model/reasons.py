"""Why a book was recommended: the sources that listed it and the reader's books behind them.

A recommendation is *brought* by each candidate source whose own list held it (``SOURCES``: the
towers' top-N, the item graph's, the reader's authors'; ``MergedCandidates.sources``). For the two
sources that start from the reader's history, the history books behind the candidate are named:

- **graph**: the history book with the largest contribution to the candidate's graph score (the
  score is ``sum over history books i of W[i, j]``, so the book with the largest ``W[i, j]``);
- **author**: the history books by the candidate's author (the ``MAX_AUTHOR_BOOKS`` most read).

Everything is computed for a block of readers and their k picks at once, with sparse row gathers
and elementwise products: no loop over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.candidates import AuthorIndex, ItemGraph, RankedRows, history_matrix
from model.ranker import SOURCES

MAX_AUTHOR_BOOKS = 3  # history books named behind an author candidate


@dataclass
class Reasons:
    """The reasons of a block's top-k (padding: no source, -1 books)."""

    sources: np.ndarray  # [U, k, 3] bool: listed by the towers / graph / author source
    graph_book: np.ndarray  # [U, k] catalog row of the history book behind a graph candidate, -1 none
    author_books: np.ndarray  # [U, k, MAX_AUTHOR_BOOKS] catalog rows of history books by the same author

    def source_names(self, u: int, n: int) -> list[str]:
        return [name for name, on in zip(SOURCES, self.sources[u, n], strict=True) if on]


class Explainer:
    """The item graph by target book and the books by author, built once per model."""

    def __init__(self, graph: ItemGraph, authors: AuthorIndex):
        self.by_target = graph.weights.T.tocsr()  # row j: W[:, j], the books that lead to j
        self.by_author = authors.book_author.T.tocsr()  # row a: the books of author a
        self.author = authors.author
        self.popularity = authors.popularity
        self._most_read_first = 1.0 + self.popularity.astype(np.float32)  # > 0, so no book drops out
        self.n_books = graph.n_books

    def explain(self, history: list[np.ndarray], picks: np.ndarray, sources: np.ndarray) -> Reasons:
        """Reasons of ``picks`` [U, k] (catalog rows, -1 padding) recommended to readers whose
        ``history[u]`` holds the catalog rows they read, ``sources`` [U, k, 3] who listed each."""
        n_users, k = picks.shape
        hist = history_matrix(history, self.n_books)
        user = np.repeat(np.arange(n_users), k)
        flat = picks.reshape(-1)
        graph_book = np.full(n_users * k, -1, np.int64)
        on = np.flatnonzero(sources[..., 1].reshape(-1) & (flat >= 0))
        if len(on):
            contribution = hist[user[on]].multiply(self.by_target[flat[on]]).tocsr()
            best = np.asarray(contribution.argmax(axis=1)).ravel()
            found = contribution.max(axis=1).toarray().ravel() > 0
            graph_book[on[found]] = best[found]
        author_books = np.full((n_users * k, MAX_AUTHOR_BOOKS), -1, np.int64)
        code = np.where(flat >= 0, self.author[np.maximum(flat, 0)], -1)
        on = np.flatnonzero(sources[..., 2].reshape(-1) & (code >= 0))
        if len(on):
            same = hist[user[on]].multiply(self.by_author[code[on]]).tocsr()
            same.data = same.data * self._most_read_first[same.indices]  # most read first, O(entries)
            author_books[on] = RankedRows.of(same).top(MAX_AUTHOR_BOOKS)
        return Reasons(
            sources & (picks >= 0)[..., None],
            graph_book.reshape(n_users, k),
            author_books.reshape(n_users, k, MAX_AUTHOR_BOOKS),
        )
