"""Features: no leakage from held-out ratings, out-of-fold training rows, one code path for all."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model import layout
from model.catalog import Catalog, embedding_column, write_catalog
from model.encoder import load_saved_encoder
from model.features import FeatureSpec
from model.text import book_text, book_texts, group_key, user_text, user_texts
from train.data.tables import load_tables
from train.features.embed import EmbeddingCache
from train.rating.dataset import build_training_data


@pytest.fixture(scope="module")
def catalog(tiny_run) -> Catalog:
    return Catalog.load(tiny_run)


@pytest.fixture(scope="module")
def ratings(tiny_run) -> pd.DataFrame:
    return load_tables(tiny_run)[2]


def test_catalog_history_is_the_training_split_only(catalog, ratings):
    train = ratings[ratings["split"] == "train"][["user_id", "isbn", "rating"]].reset_index(drop=True)
    history = catalog.history[["user_id", "isbn", "rating"]]
    explicit = history[history["rating"] > 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(explicit, train, check_dtype=False)
    # implicit reads join the history, except those of cold-test users and books
    implicit = history[history["rating"] == 0].merge(ratings, on=["user_id", "isbn"])
    assert len(implicit) > 0 and (implicit["split"] == "implicit").all()
    cold = ratings[ratings["split"].isin(["cold_book", "cold_user", "cold_both"])]
    cold_users = cold.loc[cold["split"] != "cold_book", "user_id"].unique()
    cold_books = cold.loc[cold["split"] != "cold_user", "isbn"].unique()
    assert not implicit["user_id"].isin(cold_users).any() and not implicit["isbn"].isin(cold_books).any()


def test_held_out_ratings_do_not_change_any_feature(catalog, ratings):
    base = build_training_data(catalog, ratings, folds=3, seed=0)
    shuffled = ratings.copy()
    held_out = shuffled["split"] != "train"
    assert held_out.sum() > 100
    shuffled.loc[held_out, "rating"] = (11 - shuffled.loc[held_out, "rating"]).clip(1, 10).astype(np.int8)
    other = build_training_data(catalog, shuffled, folds=3, seed=0)
    assert torch.equal(base.user_table, other.user_table)
    assert torch.equal(base.book_table, other.book_table)
    # ...while the held-out targets did change, so the test could see a leak
    assert not torch.equal(base.splits["test"].rating, other.splits["test"].rating)


def test_a_training_row_never_sees_its_own_rating(catalog, ratings):
    base = build_training_data(catalog, ratings, folds=3, seed=0)
    train_rows = np.flatnonzero((ratings["split"] == "train").to_numpy())
    changed = ratings.copy()
    target = train_rows[5]
    changed.loc[target, "rating"] = np.int8(1 if ratings.loc[target, "rating"] > 5 else 10)
    other = build_training_data(catalog, changed, folds=3, seed=0)
    rows = base.splits["train"]
    assert torch.equal(base.user_table[rows.user_row[5]], other.user_table[rows.user_row[5]])
    assert torch.equal(base.book_table[rows.book_row[5]], other.book_table[rows.book_row[5]])
    # the other folds do see it: the user's features changed somewhere in the fold tables
    assert not torch.equal(base.user_table, other.user_table)


def test_serving_text_embeddings_equal_the_catalog(tiny_run, catalog):
    encoder = load_saved_encoder(tiny_run / "encoder")
    books = catalog.books.head(20)
    texts = book_texts(books)
    np.testing.assert_allclose(encoder.embed(texts, batch_size=7), catalog.book_emb[:20].numpy(), atol=1e-5)
    users = catalog.users.head(20)
    texts = user_texts(users)
    np.testing.assert_allclose(encoder.embed(texts, batch_size=3), catalog.user_emb[:20].numpy(), atol=1e-5)


def test_a_new_user_with_a_known_users_history_gets_the_same_features(catalog):
    history = catalog.history
    user_id = int(history["user_id"].value_counts().index[0])
    row = catalog.user_index[user_id]
    mine = history[(history["user_id"] == user_id) & (history["rating"] > 0)]  # a request rates 1-10
    feats = catalog.new_user_features(
        catalog.user_emb[row : row + 1],
        torch.zeros(len(mine), dtype=torch.long),
        mine["isbn"].tolist(),
        torch.tensor(mine["rating"].to_numpy(np.float32)),
    )
    torch.testing.assert_close(feats[0], catalog.user_feats[row], atol=1e-5, rtol=1e-5)


def test_a_new_book_is_featurised_like_a_catalog_book_without_history(catalog, ratings):
    cold = ratings.loc[ratings["split"] == "cold_book", "isbn"].unique()
    assert len(cold) > 0
    rows = catalog.book_rows(list(cold[:5]))
    books = catalog.books.iloc[rows.numpy()]
    feats = catalog.new_book_features(catalog.book_emb[rows], books["author"].tolist(), books["publisher"].tolist())
    torch.testing.assert_close(feats, catalog.book_feats[rows])
    # and an author known to the catalog brings its evidence along
    assert (feats[:, -6] > 0).any()


def test_text_functions_handle_missing_parts():
    assert book_text("Dune", None, 1965.0, float("nan")) == "Dune by unknown, 1965, unknown"
    assert user_text("paris", None, "france", pd.NA) == "reader from paris, france, age unknown"
    assert user_text(None, "", None, 34) == "reader from unknown, age 34"
    assert group_key("  J. R. R. Tolkien ") == group_key("j r r tolkien") == "j r r tolkien"
    assert group_key(None) is None and group_key("...") is None


def test_text_embeddings_are_stored_once_in_the_features(tiny_run):
    """The catalog's tables carry no embedding column: the text embeddings are the first columns
    of the saved feature vectors, and the catalog's embeddings are views of those."""
    for name in (layout.BOOKS_FILE, layout.USERS_FILE):
        assert "embedding" not in pq.ParquetFile(tiny_run / layout.catalog_path(name)).schema_arrow.names
    catalog = Catalog.load(tiny_run)
    dim = catalog.spec.emb_dim
    for emb, feats in ((catalog.book_emb, catalog.book_feats), (catalog.user_emb, catalog.user_feats)):
        assert emb.data_ptr() == feats.data_ptr() and torch.equal(emb, feats[:, :dim])


def test_embedding_cache_shards_are_stored_plain(tmp_path):
    """Float vectors are written without dictionary or compression: those save nothing on them and
    make every read several times slower."""
    EmbeddingCache(tmp_path)._write(["a", "b"], np.ones((2, 8), np.float32))
    (shard,) = tmp_path.glob("*.parquet")
    group = pq.ParquetFile(shard).metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    vectors = chunks["embedding.list.element"]
    assert vectors.compression == "UNCOMPRESSED" and not vectors.has_dictionary_page, vectors
    assert chunks["key"].compression == "SNAPPY"
    assert EmbeddingCache(tmp_path)._store["b"].tolist() == [1.0] * 8


def test_a_history_row_outside_the_catalog_is_named(tiny_run):
    folder = tiny_run / layout.CATALOG_DIR
    names = (layout.BOOKS_FILE, layout.USERS_FILE, layout.HISTORY_FILE)
    books, users, history = (pq.read_table(folder / name) for name in names)
    stray = history.slice(0, 1).set_column(1, history.schema.field("isbn"), pa.array(["0000000000"], pa.string()))
    spec, saved = FeatureSpec.load(folder / layout.SPEC_FILE), Catalog.load(tiny_run)
    with pytest.raises(ValueError, match="names book '0000000000', which is not in the catalog"):
        features = (saved.book_feats, saved.user_feats)
        Catalog.from_tables(spec, books, users, pa.concat_tables([history, stray]), features=features)


def test_saved_features_are_the_computed_ones_and_mapped(tiny_run, tmp_path):
    """A folder's feature files hold what the training history gives (a folder without them, as
    written before they existed, computes the same); they are mapped, not read; a file that does
    not fit the catalog is refused by name."""
    saved = Catalog.load(tiny_run)
    folder = tiny_run / layout.CATALOG_DIR
    names = (layout.BOOKS_FILE, layout.USERS_FILE, layout.HISTORY_FILE)
    books, users, history = (pq.read_table(folder / name) for name in names)
    books = books.append_column("embedding", embedding_column(saved.book_emb.numpy()))
    users = users.append_column("embedding", embedding_column(saved.user_emb.numpy()))
    computed = Catalog.from_tables(saved.spec, books, users, history)  # as a folder from before the feature files
    for got, expected in (
        (saved.book_feats, computed.book_feats),
        (saved.user_feats, computed.user_feats),
        (saved.book_emb, computed.book_emb),
        (saved.user_emb, computed.user_emb),
    ):
        assert torch.equal(got, expected)
    assert isinstance(np.load(folder / layout.BOOK_FEATURES_FILE, mmap_mode="c"), np.memmap)
    for name in ("rated_books", "rated_bounds", "rated_values"):
        np.testing.assert_array_equal(getattr(saved, name), getattr(computed, name))

    copy = tmp_path / "run"
    shutil.copytree(folder, copy / layout.CATALOG_DIR)
    np.save(copy / layout.catalog_path(layout.USER_FEATURES_FILE), computed.user_feats[:-1].numpy())
    with pytest.raises(ValueError, match=r"user features are torch.float32 \(\d+, \d+\); its \d+ users"):
        Catalog.load(copy)


def test_a_rewritten_catalog_leaves_a_loaded_one_as_it_was(tiny_run, tmp_path):
    """Writing a catalog over a folder whose catalog a process holds (mapped) replaces the files: the
    held arrays keep their values, never the new file's pages (or a truncated file's SIGBUS)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run / layout.CATALOG_DIR, run / layout.CATALOG_DIR)
    held = Catalog.load(run)
    expected = held.book_feats.clone(), held.user_feats.clone()
    books = held.books.iloc[:-1]  # one book fewer: the new files are shorter than the held mapping
    history = held.history[held.history["isbn"].isin(books["isbn"])]
    write_catalog(run, books, held.book_emb.numpy()[:-1] + 1, held.users, held.user_emb.numpy() + 1, history, held.spec)
    assert torch.equal(held.book_feats, expected[0]) and torch.equal(held.user_feats, expected[1])
    assert len(Catalog.load(run).books) == len(held.books) - 1
