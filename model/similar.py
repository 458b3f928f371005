""" "Readers of this book also read": the books most like a catalog book or a new one.

Three sources each rank books for a query book, over catalog rows:

- **graph**: the book's row of the item graph (RP3beta weights from co-reads, the ranking stage's
  ``item_graph.npz``), largest weight first; empty for a book nobody read and for a new book;
- **towers**: the nearest book vectors of the retrieval towers (cosine), the query's own vector
  from the catalog or, for a new book, from its text, author and publisher;
- **author**: the other books of the book's author, most read first;
- **popular**: the most read books of the catalog, the same for every query: where a book has few
  readers its graph row is thin, and the books most people read are the likeliest next reads (on
  Book-Crossing the most read books alone beat every item-item list: EVALUATION.md).

The lists are merged by weighted reciprocal-rank fusion: a book's score is
``sum over sources s of weight_s / (offset + rank_s)`` (rank 1 = a source's best; a source that does
not list the book adds nothing), so the three scales (RP3beta weights, cosines, read counts) never
have to be compared. Each source offers its ``depth`` best. The weights are ``SimilarSettings``;
the defaults were chosen on validation (EVALUATION.md, "similar books"). The query book is never its
own answer. Everything runs on a block of query books at once: the recommender's own search for the
vectors (its book index at large catalogs, else one pass), row gathers for the graph and the
authors, and a fusion over the listed (query, book) pairs alone, so no step of a query passes over
the whole catalog where the model has an index. A withdrawn book (a catalog update's,
``Catalog.withdrawn``) is offered by no source, so it is never an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model.candidates import AuthorIndex, ItemGraph, best_first, rank_entries
from model.catalog import Catalog
from model.text import group_key

SOURCES = ("towers", "graph", "author", "popular")
# Most cosines held at once (queries x books): 2^24 floats = 64 MB.
COSINE_BLOCK = 1 << 24


@dataclass(frozen=True)
class SimilarSettings:
    """The fusion's weights per source, its rank offset and how many books each source offers."""

    towers: float = 0.5
    graph: float = 1.0
    author: float = 1.0
    popular: float = 1.0
    offset: float = 10.0
    depth: int = 100

    def weights(self) -> np.ndarray:
        """Weight per source, in ``SOURCES`` order."""
        return np.array([getattr(self, s) for s in SOURCES], np.float32)


@dataclass
class SimilarBooks:
    """Top-k similar books per query (padding: row -1, score 0, no source)."""

    rows: np.ndarray  # [Q, k] catalog rows, best first
    score: np.ndarray  # [Q, k] float32 fused score
    sources: np.ndarray  # [Q, k, 4] bool: listed by the towers / graph / author / popular source

    def source_names(self, q: int, n: int) -> list[str]:
        """The names of the sources that listed the ``n``-th book of query ``q``."""
        return [name for name, on in zip(SOURCES, self.sources[q, n], strict=True) if on]


# The towers source through the recommender's search: (query vectors [Q, dim], excluded catalog
# rows per query, n) -> catalog rows [Q, n], best first, -1 padding (``Recommender.nearest_books``).
Nearest = Callable[[torch.Tensor, list[np.ndarray], int], np.ndarray]


class SimilarIndex:
    """The sources over one catalog: book vectors [B, dim] (unit, catalog order), the item graph
    (None: a model without a ranking stage), the author index, and the withdrawn books (a bool per
    catalog row; None: none) that no source offers. ``nearest``: the recommender's search over the
    same vectors (its book index at large catalogs, so a query costs no pass over every book);
    None: an exact fp32 pass here."""

    def __init__(
        self,
        book_vectors: torch.Tensor,
        graph: ItemGraph | None,
        authors: AuthorIndex,
        settings: SimilarSettings | None = None,
        withdrawn: np.ndarray | None = None,
        nearest: Nearest | None = None,
    ):
        if graph is not None and graph.n_books != book_vectors.shape[0]:
            raise ValueError(f"an item graph of {graph.n_books} books for {book_vectors.shape[0]} book vectors")
        if len(authors.author) != book_vectors.shape[0]:
            raise ValueError(f"an author index of {len(authors.author)} books for {book_vectors.shape[0]} vectors")
        # With ``nearest`` the vectors are the recommender's own (bf16 where it searches in bf16): no copy.
        self.vectors = book_vectors if nearest is not None else book_vectors.float().contiguous()
        self.nearest = nearest
        self.graph = graph.weights.tocsr() if graph is not None else None
        self.authors = authors
        self.settings = settings or SimilarSettings()
        self.withdrawn = withdrawn if withdrawn is not None and withdrawn.any() else None
        if self.withdrawn is not None and len(self.withdrawn) != book_vectors.shape[0]:
            raise ValueError(f"a withdrawn mask of {len(self.withdrawn)} books for {book_vectors.shape[0]} vectors")
        self._blocked = torch.from_numpy(np.flatnonzero(self.withdrawn)) if self.withdrawn is not None else None

    @property
    def n_books(self) -> int:
        return int(self.vectors.shape[0])

    def of_books(self, rows: np.ndarray, k: int) -> SimilarBooks:
        """Top-``k`` similar books of catalog books ``rows`` [Q]."""
        rows = np.asarray(rows, np.int64)
        vectors = self.vectors[torch.from_numpy(rows)].float()
        return self._fuse(vectors, rows, self.authors.author[rows], rows, k)

    def of_new_books(self, vectors: torch.Tensor, author_codes: np.ndarray, k: int) -> SimilarBooks:
        """Top-``k`` similar catalog books of books outside the catalog: their tower vectors [Q, dim]
        and author codes [Q] (-1: an author with no catalog book). No graph row: nobody read them."""
        none = np.full(len(author_codes), -1, np.int64)
        return self._fuse(vectors.float(), none, np.asarray(author_codes, np.int64), none, k)

    # ------------------------------------------------------------------------------------ sources
    # Each source answers [Q, depth] catalog rows per query, best first, -1 padding at the end.
    def towers_rows(self, vectors: torch.Tensor, exclude: np.ndarray) -> np.ndarray:
        """The ``depth`` nearest book vectors per query (inner product of unit vectors: cosine), the
        query's own row left out."""
        depth = min(self.settings.depth, self.n_books)
        if self.nearest is not None:
            own = [np.array([r] if r >= 0 else [], np.int64) for r in exclude.tolist()]
            return self.nearest(vectors, own, depth)
        n_q = vectors.shape[0]
        cols = np.full((n_q, depth), -1, np.int64)
        step = max(1, COSINE_BLOCK // max(self.n_books, 1))
        with torch.inference_mode():
            for s in range(0, n_q, step):
                cos = vectors[s : s + step] @ self.vectors.T
                own = torch.from_numpy(exclude[s : s + step])
                inside = torch.nonzero(own >= 0).squeeze(1)
                cos[inside, own[inside]] = -torch.inf
                if self._blocked is not None:
                    cos[:, self._blocked] = -torch.inf
                top, idx = torch.topk(cos, depth, dim=1)
                cols[s : s + step] = idx.masked_fill(torch.isinf(top), -1).numpy()
        return cols

    def popular_rows(self, exclude: np.ndarray) -> np.ndarray:
        """The ``depth`` most read books of the catalog for every query, the query's own row left out."""
        depth = min(self.settings.depth + 1, self.n_books)
        if not hasattr(self, "_most_read"):  # the same list for every query: sorted once
            order = np.argsort(-self.authors.popularity, kind="stable").astype(np.int64)
            if self.withdrawn is not None:
                order = order[~self.withdrawn[order]]
            self._most_read = order[:depth]
        top = self._most_read[: self.settings.depth + 1]
        cols = np.where(top[None, :] == exclude[:, None], -1, top[None, :])
        # The query dropped, the rest shift up: ranks stay contiguous.
        order = np.argsort(cols < 0, axis=1, kind="stable")
        return np.take_along_axis(cols, order, axis=1)[:, : self.settings.depth]

    def graph_rows(self, rows: np.ndarray) -> np.ndarray:
        """The item graph's rows of the queries (empty for new books), largest weight first."""
        if self.graph is None:
            return np.full((len(rows), 0), -1, np.int64)
        picked = self.graph[np.maximum(rows, 0)]
        return self._best(picked, np.repeat(rows >= 0, np.diff(picked.indptr)), np.full(len(rows), -1))

    def author_rows(self, author_codes: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """The most read books of each query's author, the query itself left out."""
        picked = self.authors.author_books[np.maximum(author_codes, 0)]
        return self._best(picked, np.repeat(author_codes >= 0, np.diff(picked.indptr)), exclude)

    def _best(self, picked: sp.csr_matrix, keep: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """[Q, depth] columns of each row of ``picked`` by value (ties: lower column first), only
        entries where ``keep``, never the row's ``exclude`` column nor a withdrawn book."""
        query = np.repeat(np.arange(picked.shape[0]), np.diff(picked.indptr))
        keep = keep & (picked.data != 0) & (picked.indices != exclude[query])
        if self.withdrawn is not None:
            keep &= ~self.withdrawn[picked.indices]
        return best_first(query[keep], picked.indices[keep], picked.data[keep], picked.shape[0], self.settings.depth)

    # ------------------------------------------------------------------------------------- fusion
    def _fuse(
        self, vectors: torch.Tensor, rows: np.ndarray, author_codes: np.ndarray, exclude: np.ndarray, k: int
    ) -> SimilarBooks:
        return fuse(self.sources(vectors, rows, author_codes, exclude), self.settings, k)

    def sources(
        self, vectors: torch.Tensor, rows: np.ndarray, author_codes: np.ndarray, exclude: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Each source's [Q, depth] rows for a block of queries, in ``SOURCES`` order (a source of
        weight 0 is left empty)."""
        s = self.settings
        empty = np.full((len(rows), 0), -1, np.int64)
        return (
            self.towers_rows(vectors, exclude) if s.towers > 0 else empty,
            self.graph_rows(rows) if s.graph > 0 else empty,
            self.author_rows(author_codes, exclude) if s.author > 0 else empty,
            self.popular_rows(exclude) if s.popular > 0 else empty,
        )


def fuse(parts: tuple[np.ndarray, ...], settings: SimilarSettings, k: int) -> SimilarBooks:
    """Weighted reciprocal-rank fusion of the sources' lists (``SOURCES`` order), top ``k``. Works on
    the listed (query, book) pairs alone: no pass over the catalog, whatever its size."""
    weights = settings.weights()
    n_q = parts[0].shape[0]
    listed = [(s, cols) for s, cols in enumerate(parts) if weights[s] > 0 and cols.size]
    n_cols = int(max((cols.max() for _, cols in listed), default=-1)) + 1
    keys, ranks = [], []
    for _, cols in listed:
        valid = cols >= 0
        query = np.nonzero(valid)[0]
        keys.append(query * n_cols + cols[valid])
        ranks.append((np.cumsum(valid, axis=1) - 1)[valid])  # 0 = the source's best for the query
    pairs, inverse = np.unique(np.concatenate([np.zeros(0, np.int64), *keys]), return_inverse=True)
    score = np.zeros(len(pairs), np.float32)
    bits = np.zeros(len(pairs), np.int64)
    at = 0
    for (s, _), rank in zip(listed, ranks, strict=True):
        own = inverse[at : at + len(rank)]
        at += len(rank)
        # float32, added in source order: the documented sum, bit for bit on every path.
        score[own] += weights[s] / (settings.offset + 1.0 + rank.astype(np.float32))
        bits[own] += 1 << s
    query, col = (pairs // n_cols, pairs % n_cols) if n_cols else (pairs, pairs)
    order, rank = rank_entries(query, col, score)
    top = order[rank < k]
    at_q, at_rank = query[top], rank[rank < k]
    rows = np.full((n_q, k), -1, np.int64)
    value = np.zeros((n_q, k), np.float32)
    flags = np.zeros((n_q, k, len(SOURCES)), bool)
    rows[at_q, at_rank] = col[top]
    value[at_q, at_rank] = score[top]
    flags[at_q, at_rank] = (bits[top, None] >> np.arange(len(SOURCES))) & 1
    return SimilarBooks(rows, value, flags)


def author_index(catalog: Catalog, per_author: int = 50) -> AuthorIndex:
    """The catalog's author index (as the ranking stage builds it: codes and training reads)."""
    author, publisher = (code.numpy() for code in catalog.group_code_columns())
    reads = np.bincount(catalog.rated_books, minlength=len(catalog.books))
    return AuthorIndex(author, publisher, reads, per_author=per_author)


def group_codes_of(catalog: Catalog, name: str, values: list) -> torch.Tensor:
    """Catalog codes (``"author"`` / ``"publisher"``) of names, -1 where no catalog book has it."""
    vocab = catalog.groups[name][1]
    return torch.tensor([vocab.get(group_key(v), -1) for v in values], dtype=torch.long)


def new_book_vectors(
    towers: torch.nn.Module, catalog: Catalog, feats: torch.Tensor, authors: list, publishers: list
) -> torch.Tensor:
    """Unit tower vectors [Q, dim] (CPU) of books outside the catalog from their feature vectors
    (``Catalog.new_book_features``), with the author and publisher codes of the catalog's names, as a
    catalog book nobody read is embedded."""
    device = towers.temperature.device
    rows = torch.full((len(authors),), -1, dtype=torch.long)
    parts = (feats, rows, group_codes_of(catalog, "author", authors), group_codes_of(catalog, "publisher", publishers))
    with torch.inference_mode():
        return towers.embed_books(*(x.to(device) for x in parts)).float().cpu()
