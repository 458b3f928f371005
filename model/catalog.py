"""The catalog of known books and users with their feature vectors, loaded from a run folder.

Training evaluates with it, the TorchServe handler answers with it and the Beam job scores with
it, so a known user or book has one feature vector everywhere. Rating-derived features come from
the training split only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from model import layout, schemas
from model.features import (
    FeatureSpec,
    book_feature_table,
    book_features,
    book_history,
    group_totals,
    user_features,
)
from model.text import group_key


def embedding_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A [N, D] float32 matrix as an Arrow fixed-size-list column (zero-copy back to numpy)."""
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` as Parquet, its ``embedding`` column (if any) plain: float vectors gain
    nothing from dictionary or Snappy encoding (0.7% smaller on a full-size catalog's books) and
    decode several times slower with them (those books: 2-4 s against 0.3 s)."""
    plain = "embedding"
    names = table.column_names
    pq.write_table(
        table,
        path,
        use_dictionary=[n for n in names if n != plain],
        compression={n: "none" if n == plain else "snappy" for n in names},
    )


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a sibling file renamed over ``path``: the arrays of a model folder are mapped
    (copy-on-write), and a mapping reads the file's current pages, so writing the old file in place
    would change, or truncate under, the arrays of every process that maps it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as fh:
        np.save(fh, array)
    os.replace(partial, path)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Inverse of ``embedding_column``: a read-only view of Arrow's buffer where the column is one
    float32 chunk without nulls (the catalog's), a copy otherwise."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def write_catalog(
    folder: Path,
    books: pd.DataFrame,
    book_emb: np.ndarray,
    users: pd.DataFrame,
    user_emb: np.ndarray,
    history: pd.DataFrame,
    spec: FeatureSpec,
) -> Catalog:
    """Write the catalog into the model folder ``folder``: the books' and users' metadata, the
    training history, the feature spec, and every book's and user's feature vector, whose first
    ``spec.emb_dim`` columns are the text embeddings (stored once, there). Returns the catalog
    ``Catalog.load`` reads back."""
    folder = Path(folder) / layout.CATALOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    book_table = pa.Table.from_pandas(books[schemas.BOOKS.names], schema=schemas.BOOKS, preserve_index=False)
    user_table = pa.Table.from_pandas(users[schemas.USERS.names], schema=schemas.USERS, preserve_index=False)
    hist = pa.Table.from_pandas(history[schemas.RATINGS.names], schema=schemas.RATINGS, preserve_index=False)
    catalog = Catalog.from_tables(
        spec,
        book_table.append_column("embedding", embedding_column(book_emb)),
        user_table.append_column("embedding", embedding_column(user_emb)),
        hist,
    )
    pq.write_table(book_table, folder / layout.BOOKS_FILE)
    pq.write_table(user_table, folder / layout.USERS_FILE)
    pq.write_table(hist, folder / layout.HISTORY_FILE)
    spec.save(folder / layout.SPEC_FILE)
    for name, feats in zip(layout.FEATURE_FILES, (catalog.book_feats, catalog.user_feats), strict=True):
        save_array(folder / name, feats.numpy())
    return catalog


def group_codes(values: pd.Series) -> tuple[torch.Tensor, dict[str, int]]:
    """Code per row of the normalised author/publisher name (-1 when missing) and the vocabulary,
    its codes in the order the keys first appear."""
    # Normalised once per distinct name, not per book: a large catalog repeats its names. The
    # names come in the order they first appear, so their keys' first appearances keep that order.
    rows, names = pd.factorize(values)  # missing -> -1
    vocab: dict[str, int] = {}
    name_codes = np.full(len(names) + 1, -1, np.int64)  # the last entry: a missing name
    for n, name in enumerate(names):
        key = group_key(name)
        if key is not None:
            name_codes[n] = vocab.setdefault(key, len(vocab))
    return torch.from_numpy(name_codes[rows]), vocab


@dataclass
class Catalog:
    """Known books and users, their text embeddings and their full-training-history features."""

    spec: FeatureSpec
    books: pd.DataFrame  # isbn, title, author, year, publisher (row order = feature row order)
    book_emb: torch.Tensor
    book_feats: torch.Tensor
    users: pd.DataFrame  # user_id, city, region, country, age
    user_emb: torch.Tensor
    user_feats: torch.Tensor
    history: pd.DataFrame  # training ratings and implicit reads (rating 0): user_id, isbn, rating
    book_index: dict[str, int]
    user_index: dict[int, int]
    # author / publisher: code per catalog book (-1 unknown), key -> code, per-code rating count and sum
    groups: dict[str, tuple[torch.Tensor, dict[str, int], torch.Tensor, torch.Tensor]]
    # books each user read in training (rated or implicit): catalog rows grouped by user row, and bounds
    rated_books: np.ndarray
    rated_bounds: np.ndarray
    # catalog rows of books withdrawn by a catalog update: known, never recommended
    withdrawn: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # the rating of each ``rated_books`` entry (0: implicit)
    rated_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @classmethod
    def load(cls, run_dir: Path) -> Catalog:
        """Load the catalog of a model folder: its feature vectors mapped from the folder's feature
        files where it has them (copy-on-write: the workers of one archive share the pages), else
        computed from the training history."""
        folder = Path(run_dir) / layout.CATALOG_DIR
        features = None
        if all((folder / name).is_file() for name in layout.FEATURE_FILES):
            features = tuple(torch.from_numpy(np.load(folder / name, mmap_mode="c")) for name in layout.FEATURE_FILES)
        # ParquetFile, not pq.read_table: the same table, without importing pyarrow.dataset (1–2 s
        # of a worker's start on 2 loaded cores). A folder written before the feature files holds the
        # text embeddings in an ``embedding`` column of the tables.
        catalog = cls.from_tables(
            FeatureSpec.load(folder / layout.SPEC_FILE),
            pq.ParquetFile(folder / layout.BOOKS_FILE).read(),
            pq.ParquetFile(folder / layout.USERS_FILE).read(),
            pq.ParquetFile(folder / layout.HISTORY_FILE).read(),
            features=features,
        )
        withdrawn = folder / layout.WITHDRAWN_FILE
        if withdrawn.is_file():
            catalog.withdrawn = catalog.book_rows(json.loads(withdrawn.read_text())).numpy().astype(np.int64)
        return catalog

    def withdrawn_mask(self) -> np.ndarray:
        """[B] True at the catalog rows of withdrawn books."""
        mask = np.zeros(len(self.books), bool)
        mask[self.withdrawn] = True
        return mask

    @classmethod
    def from_tables(
        cls,
        spec: FeatureSpec,
        book_table: pa.Table,
        user_table: pa.Table,
        history: pa.Table,
        *,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Catalog:
        """The catalog of books and users with an ``embedding`` column (their text embeddings) and the
        training history, every feature vector computed from the training history; or, given
        ``features`` (a folder's saved book and user feature vectors), those, with the text
        embeddings their first columns (an ``embedding`` column is ignored then)."""
        books = book_table.drop_columns([c for c in ["embedding"] if c in book_table.column_names]).to_pandas()
        users = user_table.drop_columns([c for c in ["embedding"] if c in user_table.column_names]).to_pandas()
        if features is None:
            # One copy out of Arrow's read-only buffer (the tables are dropped after loading).
            book_emb = torch.tensor(embedding_matrix(book_table["embedding"]))
            user_emb = torch.tensor(embedding_matrix(user_table["embedding"]))
        else:
            _check_features(features, len(books), len(users), spec)
            book_emb, user_emb = (feats[:, : spec.emb_dim] for feats in features)
        all_b = _rows_in(history["isbn"], book_table["isbn"], "book")
        all_u = _rows_in(history["user_id"], user_table["user_id"], "user")
        history = history.to_pandas()
        book_index = {isbn: i for i, isbn in enumerate(books["isbn"].tolist())}
        user_index = {int(u): i for i, u in enumerate(users["user_id"].tolist())}
        rating = history["rating"].to_numpy(np.float32)
        # Implicit reads (rating 0) say what a reader read, not how they liked it: they join the
        # reading history (retrieval, rated-book exclusion) but no rating statistic.
        explicit = rating > 0
        b, u, r = (torch.from_numpy(x[explicit]) for x in (all_b, all_u, rating))
        codes = {name: group_codes(books[name]) for name in ("author", "publisher")}
        count, total = book_history(b, r, len(books))
        groups = {}
        for name, (code, vocab) in codes.items():
            groups[name] = (code, vocab, *group_totals(code, count, total, len(vocab)))
        if features is None:
            book_feats = book_feature_table(book_emb, codes["author"][0], codes["publisher"][0], b, r, spec)
            features = (book_feats, user_features(user_emb, u, book_emb[b], r, spec))
        return cls(
            spec=spec,
            books=books,
            book_emb=book_emb,
            book_feats=features[0],
            users=users,
            user_emb=user_emb,
            user_feats=features[1],
            history=history,
            book_index=book_index,
            user_index=user_index,
            groups=groups,
            **_rated_index(all_u, all_b, len(users), rating),
        )

    def book_rows(self, isbns: list[str]) -> torch.Tensor:
        """Feature rows of known ISBNs (KeyError names the first unknown one)."""
        return torch.tensor([self.book_index[i] for i in isbns], dtype=torch.long)

    def user_rows(self, user_ids: list[int]) -> torch.Tensor:
        """Feature rows of known user ids (KeyError names the first unknown one)."""
        return torch.tensor([self.user_index[int(u)] for u in user_ids], dtype=torch.long)

    def new_book_features(self, text_emb: torch.Tensor, authors: list, publishers: list) -> torch.Tensor:
        """Feature vectors of books outside the catalog: no history of their own, but the
        ratings of the catalog books by the same author and publisher."""
        zeros = torch.zeros(text_emb.shape[0])
        stats = []
        for name, values in (("author", authors), ("publisher", publishers)):
            _, vocab, g_count, g_total = self.groups[name]
            code = torch.tensor([vocab.get(group_key(v), -1) for v in values], dtype=torch.long)
            known = code >= 0
            stats.append(torch.where(known, g_count[code.clamp_min(0)], zeros))
            stats.append(torch.where(known, g_total[code.clamp_min(0)], zeros))
        return book_features(text_emb, zeros, zeros, *stats, self.spec)

    def new_user_features(
        self,
        text_emb: torch.Tensor,
        hist_user: torch.Tensor,
        hist_isbns: list[str],
        hist_rating: torch.Tensor,
    ) -> torch.Tensor:
        """Feature vectors of users outside the catalog, from their text and a few known-ISBN ratings."""
        return user_features(
            text_emb,
            hist_user,
            self.book_emb[self.book_rows(hist_isbns)],
            hist_rating,
            self.spec,
        )

    def known_user_features(
        self, user_rows: list[int], hist_user: torch.Tensor, hist_isbns: list[str], hist_rating: torch.Tensor
    ) -> torch.Tensor:
        """Feature vectors of known users (catalog rows ``user_rows``) with ratings made since the
        catalog was built (flat, ``hist_user`` indexing ``user_rows``): their catalog ratings and these
        together, as a catalog update that joined these ratings would compute them (a book rated
        again counts with its new rating)."""
        extra_books = self.book_rows(hist_isbns).numpy()
        extra_user, extra_rating = hist_user.numpy(), hist_rating.numpy().astype(np.float32)
        users, books, values = [extra_user], [extra_books], [extra_rating]
        for n, row in enumerate(user_rows):
            span = slice(self.rated_bounds[row], self.rated_bounds[row + 1])
            old_books, old_values = self.rated_books[span], self.rated_values[span]
            keep = (old_values > 0) & ~np.isin(old_books, extra_books[extra_user == n])
            users.append(np.full(int(keep.sum()), n, np.int64))
            books.append(old_books[keep])
            values.append(old_values[keep])
        flat_books = torch.from_numpy(np.concatenate(books).astype(np.int64))
        return user_features(
            self.user_emb[torch.tensor(user_rows, dtype=torch.long)],
            torch.from_numpy(np.concatenate(users).astype(np.int64)),
            self.book_emb[flat_books],
            torch.from_numpy(np.concatenate(values).astype(np.float32)),
            self.spec,
        )

    def rated_by(self, user_row: int) -> np.ndarray:
        """Catalog rows of the books a known user read in training, rated or implicit (training order)."""
        return self.rated_books[self.rated_bounds[user_row] : self.rated_bounds[user_row + 1]]

    def reads_of(self, user_ids: list[int]) -> list[np.ndarray]:
        """``rated_by`` of each user id; empty for an id outside the catalog."""
        rows = (self.user_index.get(int(u)) for u in user_ids)
        return [self.rated_by(r) if r is not None else _NO_ROWS for r in rows]

    def group_code_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(author code, publisher code) per catalog book, -1 where unknown."""
        return self.groups["author"][0], self.groups["publisher"][0]

    def implicit_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(user rows, book rows) of the implicit reads (rating 0) in the training history."""
        implicit = self.history["rating"].to_numpy() == 0
        users = self.history["user_id"][implicit].map(self.user_index).to_numpy(np.int64)
        books = self.history["isbn"][implicit].map(self.book_index).to_numpy(np.int64)
        return users, books


_NO_ROWS = np.zeros(0, np.int64)


def _check_features(features: tuple[torch.Tensor, torch.Tensor], n_books: int, n_users: int, spec: FeatureSpec) -> None:
    """Saved feature vectors must be one float32 row per catalog book / user of the spec's widths."""
    shapes = (("book", n_books, spec.book_dim), ("user", n_users, spec.user_dim))
    for (what, rows, width), feats in zip(shapes, features, strict=True):
        if feats.dtype != torch.float32 or tuple(feats.shape) != (rows, width):
            raise ValueError(
                f"the catalog's {what} features are {feats.dtype} {tuple(feats.shape)}; "
                f"its {rows} {what}s and feature spec need float32 {(rows, width)}"
            )


def _rows_in(values: pa.ChunkedArray, keys: pa.ChunkedArray, what: str) -> np.ndarray:
    """Row in ``keys`` (unique) of each of ``values``, int64; ``ValueError`` naming the first value
    outside them. Arrow's hash lookup: a full-size history's 969k ISBNs in 0.2 s, 1.5 s through a
    pandas ``map`` of a dict, at every worker start."""
    rows = pc.index_in(values, value_set=keys)
    if rows.null_count:
        missing = values.filter(pc.is_null(rows))[0].as_py()
        raise ValueError(f"the training history names {what} {missing!r}, which is not in the catalog")
    return rows.to_numpy().astype(np.int64)


def _rated_index(
    user_rows: np.ndarray, book_rows: np.ndarray, n_users: int, rating: np.ndarray
) -> dict[str, np.ndarray]:
    """Book rows (and their ratings) grouped by user row (stable, so training order is kept) with
    per-user bounds."""
    order = np.argsort(user_rows, kind="stable")
    bounds = np.searchsorted(user_rows[order], np.arange(n_users + 1))
    return {"rated_books": book_rows[order], "rated_bounds": bounds, "rated_values": rating[order]}
