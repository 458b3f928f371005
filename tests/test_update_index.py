"""A catalog update of a model with a book index (``python -m train update``, ``model/book_index.py``):
the version's index is rebuilt over the new vectors, listed in its manifest, serves the new books,
and never returns a withdrawn book; nor does the "similar books" action.

Works on a copy of the session's tiny run given an index that the HNSW search makes exact (efSearch
above the catalog's size, ``tests/test_book_index.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from model import layout
from model.artifacts import ModelFolder
from model.recommend import Recommender
from model.similar import SimilarIndex
from tests.test_book_index import EXACT
from tests.test_manifest import model_copy
from tests.test_update import update_for
from tests.update_inputs import NEW_BOOKS
from train.retrieval.step import save_book_index
from train.update.build import build_version


@pytest.fixture(scope="module")
def indexed_update(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("update-index")
    run = model_copy(tiny_run, root / "run")
    save_book_index(run, ModelFolder(run).book_vectors(), EXACT)
    ModelFolder(run).write_manifest()
    folder, info = update_for(run, root / "input")
    record = build_version(run, folder, root / "v2")
    return {**info, "record": record, "out": root / "v2"}


def towers_fp32(rec: Recommender, *, index: bool, withdrawn: bool = True) -> Recommender:
    """The towers' own lists of ``rec`` (no ranking stage) in fp32, where the index's order and the
    exhaustive one are both exact, with or without its index and its withdrawn mask."""
    settings = dataclasses.replace(rec.settings, precision="fp32", blend=0.0)
    vectors = rec.book_vectors.float()
    found = rec.index if index else None
    mask = rec.withdrawn if withdrawn else None
    return Recommender(rec.towers, vectors, rec.scorer, settings, None, found, withdrawn=mask)


def lists(loaded, rec: Recommender, k: int) -> np.ndarray:
    catalog = loaded.catalog
    history = [catalog.rated_by(u) for u in range(len(catalog.users))]
    return rec.recommend(catalog.user_feats, history, k, exclude=history).rows.numpy()


def test_the_version_has_an_index_of_the_new_vectors_in_its_manifest(indexed_update: dict) -> None:
    folder = ModelFolder(indexed_update["out"])
    folder.verify(serving=True)
    manifest = folder.read_manifest()
    assert manifest["stages"]["index"] == "hnsw"
    assert set(layout.INDEX_FILES) <= set(manifest["files"])
    index = folder.book_index()
    vectors = folder.book_vectors()
    assert index is not None and index.n_books == len(vectors) == len(folder.load_catalog().books)
    assert index.settings.ef_search == EXACT.ef_search  # the source's settings
    # the index holds the version's vectors: each book's nearest neighbour is itself
    _, found = index.search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(len(vectors)))
    assert indexed_update["record"]["book_index"]["rebuilt_from_source"]


def test_new_books_come_through_the_index_and_withdrawn_books_never(indexed_update: dict) -> None:
    loaded = ModelFolder(indexed_update["out"]).load()
    rec = loaded.recommender
    assert rec.index is not None and rec.ranking is not None
    n_books, n_old = rec.n_books, rec.n_books - len(NEW_BOOKS)
    withdrawn = loaded.catalog.book_index[indexed_update["withdrawn"]]
    k = n_books - 1  # below the book count: the index path (``_top_n_indexed``)
    through_index = lists(loaded, towers_fp32(rec, index=True), k)
    assert np.isin([n_old, n_old + 1], through_index).all()
    assert not np.isin(withdrawn, through_index)
    np.testing.assert_array_equal(through_index, lists(loaded, towers_fp32(rec, index=False), k))
    # the withdrawn book comes back where nothing blocks it, so the mask is what keeps it out
    assert np.isin(withdrawn, lists(loaded, towers_fp32(rec, index=True, withdrawn=False), k))
    # and the whole served path, ranking stage and bf16 included
    served = lists(loaded, rec, k)
    assert not np.isin(withdrawn, served) and np.isin([n_old, n_old + 1], served).all()


def test_similar_never_offers_a_withdrawn_book(indexed_update: dict) -> None:
    loaded = ModelFolder(indexed_update["out"]).load()
    withdrawn = loaded.catalog.book_index[indexed_update["withdrawn"]]
    rows = np.arange(len(loaded.catalog.books))
    index = loaded.similar_index()
    answer = index.of_books(rows, len(rows) - 1)
    assert not np.isin(withdrawn, answer.rows)
    assert np.isin(rows[rows != withdrawn], answer.rows).all()  # every other book still answers
    open_index = SimilarIndex(index.vectors, None, index.authors, index.settings)
    assert np.isin(withdrawn, open_index.of_books(rows, 10).rows)  # without the mask it would come back


def test_new_books_alone_grow_the_source_index_instead_of_rebuilding_it(indexed_update: dict, tmp_path: Path) -> None:
    """No rating, no changed book: every old vector stays as it was, so the version's index is the
    source's with the new books added, and still serves the exhaustive lists."""
    run = Path(indexed_update["record"]["source"]["path"])
    books = [["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"]]
    books += [[isbn, f"Only New {i}", "Zed Newauthor", "2004", "New House Press"] for i, isbn in enumerate(NEW_BOOKS)]
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "Books.csv").write_text("\n".join(",".join(row) for row in books) + "\n")
    record = build_version(run, tmp_path / "input", tmp_path / "v2")
    assert record["book_index"]["added_to_source"] and not record["book_index"]["rebuilt_from_source"]
    folder = ModelFolder(tmp_path / "v2")
    vectors = folder.book_vectors()
    np.testing.assert_array_equal(vectors[: -len(NEW_BOOKS)], ModelFolder(run).book_vectors())
    _, found = folder.book_index().search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(len(vectors)))
    loaded = folder.load()
    rec = loaded.recommender
    k = rec.n_books - 1
    through_index = lists(loaded, towers_fp32(rec, index=True), k)
    assert np.isin(np.arange(rec.n_books - len(NEW_BOOKS), rec.n_books), through_index).all()
    np.testing.assert_array_equal(through_index, lists(loaded, towers_fp32(rec, index=False), k))
