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
own answer. Everything runs on a block of query books at once: one matmul for the vectors, sparse row
gathers for the graph and the authors, one sparse sum for the fusion. A withdrawn book (a catalog
update's, ``Catalog.withdrawn``) is offered by no source, so it is never an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model.candidates import AuthorIndex, ItemGraph, RankedRows, sparse_lookup
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


class SimilarIndex:
    """The sources over one catalog: book vectors [B, dim] (unit, catalog order), the item graph
    (None: a model without a ranking stage), the author index, and the withdrawn books (a bool per
    catalog row; None: none) that no source offers."""

    def __init__(
        self,
        book_vectors: torch.Tensor,
        graph: ItemGraph | None,
        authors: AuthorIndex,
        settings: SimilarSettings | None = None,
        withdrawn: np.ndarray | None = None,
    ):
        if graph is not None and graph.n_books != book_vectors.shape[0]:
            raise ValueError(f"an item graph of {graph.n_books} books for {book_vectors.shape[0]} book vectors")
        if len(authors.author) != book_vectors.shape[0]:
            raise ValueError(f"an author index of {len(authors.author)} books for {book_vectors.shape[0]} vectors")
        self.vectors = book_vectors.float().contiguous()
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
        return self._fuse(self.vectors[torch.from_numpy(rows)], rows, self.authors.author[rows], rows, k)

    def of_new_books(self, vectors: torch.Tensor, author_codes: np.ndarray, k: int) -> SimilarBooks:
        """Top-``k`` similar catalog books of books outside the catalog: their tower vectors [Q, dim]
        and author codes [Q] (-1: an author with no catalog book). No graph row: nobody read them."""
        none = np.full(len(author_codes), -1, np.int64)
        return self._fuse(vectors.float(), none, np.asarray(author_codes, np.int64), none, k)

    # ------------------------------------------------------------------------------------ sources
    def towers_rows(self, vectors: torch.Tensor, exclude: np.ndarray) -> RankedRows:
        """The ``depth`` nearest book vectors per query (cosine), the query's own row left out."""
        n_q, depth = vectors.shape[0], min(self.settings.depth, self.n_books)
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
        return _ranked(cols, self.n_books)

    def popular_rows(self, exclude: np.ndarray) -> RankedRows:
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
        cols = np.take_along_axis(cols, order, axis=1)[:, : self.settings.depth]
        return _ranked(cols, self.n_books)

    def graph_rows(self, rows: np.ndarray) -> RankedRows:
        """The item graph's rows of the queries (empty for new books), cut to ``depth``."""
        if self.graph is None:
            return RankedRows.of(sp.csr_matrix((len(rows), self.n_books), dtype=np.float32))
        picked = self.graph[np.maximum(rows, 0)].multiply((rows >= 0)[:, None]).tocsr()
        return RankedRows.of(self._open(picked)).head(self.settings.depth)

    def author_rows(self, author_codes: np.ndarray, exclude: np.ndarray) -> RankedRows:
        """The most read books of each query's author, the query itself left out, cut to ``depth``."""
        a = self.authors
        known = author_codes >= 0
        picked = a.author_books[np.maximum(author_codes, 0)].multiply(known[:, None]).tocsr()
        if (exclude >= 0).any():
            own = sp.csr_matrix(
                (np.ones(int((exclude >= 0).sum()), np.float32), (np.flatnonzero(exclude >= 0), exclude[exclude >= 0])),
                shape=picked.shape,
            )
            picked = (picked - picked.multiply(own)).tocsr()
        return RankedRows.of(self._open(picked)).head(self.settings.depth)

    def _open(self, picked: sp.csr_matrix) -> sp.csr_matrix:
        """``picked`` [Q, B] without the withdrawn books' columns (``RankedRows.of`` drops the zeros)."""
        if self.withdrawn is None:
            return picked
        return picked.multiply((~self.withdrawn)[None, :].astype(np.float32)).tocsr()

    # ------------------------------------------------------------------------------------- fusion
    def _fuse(
        self, vectors: torch.Tensor, rows: np.ndarray, author_codes: np.ndarray, exclude: np.ndarray, k: int
    ) -> SimilarBooks:
        return fuse(self.sources(vectors, rows, author_codes, exclude), self.settings, k)

    def sources(
        self, vectors: torch.Tensor, rows: np.ndarray, author_codes: np.ndarray, exclude: np.ndarray
    ) -> tuple[RankedRows, ...]:
        """Each source's ranked rows for a block of queries, in ``SOURCES`` order (a source of weight
        0 is left empty)."""
        s = self.settings
        empty = RankedRows.of(sp.csr_matrix((len(rows), self.n_books), dtype=np.float32))
        return (
            self.towers_rows(vectors, exclude) if s.towers > 0 else empty,
            self.graph_rows(rows) if s.graph > 0 else empty,
            self.author_rows(author_codes, exclude) if s.author > 0 else empty,
            self.popular_rows(exclude) if s.popular > 0 else empty,
        )


def fuse(parts: tuple[RankedRows, ...], settings: SimilarSettings, k: int) -> SimilarBooks:
    """Weighted reciprocal-rank fusion of the sources' ranked rows (``SOURCES`` order), top ``k``."""
    weights = settings.weights()
    n_q, n_books = parts[0].matrix.shape
    score = sp.csr_matrix((n_q, n_books), dtype=np.float32)
    member = sp.csr_matrix((n_q, n_books), dtype=np.float32)
    for s, part in enumerate(parts):
        if weights[s] <= 0:
            continue
        m = part.matrix
        contribution = weights[s] / (settings.offset + 1.0 + part.rank.astype(np.float32))
        score = score + sp.csr_matrix((contribution.astype(np.float32), m.indices, m.indptr), shape=m.shape)
        member = member + sp.csr_matrix((np.full(m.nnz, 2.0**s, np.float32), m.indices, m.indptr), shape=m.shape)
    ranked = RankedRows.of(score.tocsr())
    cols = ranked.top(k)
    q = np.repeat(np.arange(n_q), k)
    flat = cols.reshape(-1)
    value, _ = sparse_lookup(ranked.matrix, q, flat)
    member = member.tocsr()
    bits, _ = sparse_lookup(member, q, flat)
    flags = (bits.astype(np.int64)[:, None] >> np.arange(len(SOURCES))) & 1
    return SimilarBooks(cols, value.reshape(n_q, k), flags.astype(bool).reshape(n_q, k, len(SOURCES)))


def _ranked(cols: np.ndarray, n_books: int) -> RankedRows:
    """RankedRows of [Q, n] columns listed best first (-1 padding), ranked by their position."""
    n_q, n = cols.shape
    keep = cols >= 0
    q = np.repeat(np.arange(n_q), n)[keep.reshape(-1)]
    score = np.tile(np.arange(n, 0, -1, dtype=np.float32), n_q)[keep.reshape(-1)]
    m = sp.csr_matrix((score, (q, cols[keep])), shape=(n_q, n_books))
    return RankedRows.of(m)


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
