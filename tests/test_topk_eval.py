"""The top-K evaluation protocols and the evaluation step's top-K table on the tiny run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.catalog import Catalog, group_codes
from model.text import group_key
from train.config import TopKTuning
from train.data.tables import load_tables
from train.evaluation.protocols import cold_book_task, cold_user_task, sample_task, warm_task
from train.evaluation.topk import CONTENT_NAME, MODEL_NAME, RATING_ONLY_NAME


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    catalog = Catalog.load(tiny_run)
    _, _, ratings = load_tables(tiny_run)
    return catalog, ratings


def test_warm_task_ranks_test_books_and_excludes_training_reads(loaded) -> None:
    catalog, ratings = loaded
    task = warm_task(catalog, ratings, "test")
    test = ratings[ratings["split"] == "test"]
    assert len(task) == test["user_id"].nunique()
    isbns = catalog.books["isbn"].to_numpy()
    for n in range(0, len(task), 5):
        user = int(catalog.users["user_id"].iat[task.users[n]])
        assert set(isbns[task.relevant[n]]) == set(test.loc[test["user_id"] == user, "isbn"])
        assert np.array_equal(task.exclude[n], catalog.rated_by(int(task.users[n])))
        assert not set(task.relevant[n]) & set(task.exclude[n])  # a test book was never read in training
        liked = test[(test["user_id"] == user) & (test["rating"] >= 8)]
        assert set(isbns[task.liked[n][task.liked[n] >= 0]]) == set(liked["isbn"])


def test_cold_user_task_reveals_at_most_five_and_keeps_one_held_out(loaded) -> None:
    catalog, ratings = loaded
    task = cold_user_task(catalog, ratings, reveal=5, seed=0)
    cold = ratings[ratings["split"] == "cold_user"]
    assert len(task) == cold["user_id"].nunique() > 0
    counts = cold.groupby("user_id").size()
    for n in range(len(task)):
        user = int(catalog.users["user_id"].iat[task.users[n]])
        shown, hidden = task.history[n], task.relevant[n]
        assert len(shown) == min(5, counts[user] - 1) and len(hidden) >= 1
        assert not set(shown) & set(hidden)
        assert np.array_equal(task.exclude[n], shown)
        assert len(catalog.rated_by(int(task.users[n]))) == 0  # nothing of a cold user is in training
    # the features are what a request with those ratings would build, not the catalog's row
    again = cold_user_task(catalog, ratings, reveal=5, seed=0)
    assert np.allclose(task.feats.numpy(), again.feats.numpy())
    none = cold_user_task(catalog, ratings, reveal=0, seed=0)
    assert np.allclose(none.feats.numpy(), catalog.user_feats[none.users].numpy(), atol=1e-6)


def test_cold_book_task_ranks_only_books_nobody_read_in_training(loaded) -> None:
    catalog, ratings = loaded
    task, candidates = cold_book_task(catalog, ratings)
    read_in_training = set(catalog.history["isbn"])
    isbns = catalog.books["isbn"].to_numpy()
    assert len(candidates) > 0 and not set(isbns[candidates]) & read_in_training
    assert all(len(r) and r.max() < len(candidates) and r.min() >= 0 for r in task.relevant)


def test_evaluation_writes_the_top_k_table_with_every_baseline(tiny_run: Path) -> None:
    evaluation = json.loads((tiny_run / "evaluation.json").read_text())
    warm = evaluation["topk"]["results"]["warm"]
    names = set(warm)
    assert {MODEL_NAME, RATING_ONLY_NAME, "most-popular"} <= names
    assert any(n.startswith("item-kNN") for n in names) and any(n.startswith("ALS") for n in names)
    assert any(n.startswith("EASE") for n in names)
    for rep in warm.values():
        assert 0 <= rep["recall@10"] <= rep["recall@100"] <= 1 and 0 <= rep["coverage@10"] <= 1
    assert set(evaluation["topk"]["results"]["cold-user"]) >= {MODEL_NAME, "most-popular"}
    assert any(n.startswith("RP3β") for n in names)
    cold = evaluation["topk"]["results"]["cold-book"]
    assert set(cold) == {MODEL_NAME, CONTENT_NAME, "random"} and cold["random"]["recall@10"] > 0
    assert all(0 <= rep["recall@10"] <= 1 for rep in cold.values())
    # Every author of the sample's cold books has a training book: the protocol is there, empty.
    assert evaluation["topk"]["results"]["new-author"] == {}
    tuning = evaluation["topk"]["tuning"]
    assert set(tuning) == {"item-kNN", "RP3β", "ALS", "EASE"} and all(t["name"] in names for t in tuning.values())
    markdown = (tiny_run / "evaluation.md").read_text()
    assert "Top-K recommendation" in markdown and "**cold-book**" in markdown and "**new-author**" in markdown
    assert "tuned on validation" in markdown and tuning["RP3β"]["name"] in markdown
    assert (tiny_run / "topk.png").stat().st_size > 1000


SMALL_GRID = TopKTuning(
    knn_neighbours=[10, 50],
    knn_shrink=[0.0],
    rp3_alpha=[1.0],
    rp3_beta=[0.0, 0.5],
    rp3_neighbours=[50],
    ease_lambda=[10.0, 100.0],
    als_factors=[8],
    als_regularization=[0.01],
    als_alpha=[1.0],
)


def test_baseline_tuning_and_reports_are_cached_per_split(loaded, tmp_path: Path, monkeypatch) -> None:
    import train.evaluation.topk as topk

    catalog, ratings = loaded
    train = topk.training_matrix(catalog)
    tasks, val = (warm_task(catalog, ratings, "test"),), warm_task(catalog, ratings, "val")
    first = topk.BaselineCache(tmp_path, train, tasks, val, SMALL_GRID, 40_000, 0)
    fresh = first.results(progress=False)
    assert (tmp_path / f"{first.key}.json").is_file()
    assert set(fresh["tuning"]) == {"item-kNN", "RP3β", "ALS", "EASE"}
    for method, choice in fresh["tuning"].items():
        assert choice["name"] in fresh["baselines"]  # the chosen setting is the row of the table
        best = max(row["val_recall@10"] for row in choice["grid"])
        assert round(choice["val_recall"], 5) == best, method
    monkeypatch.setattr(topk, "tune", lambda *a, **k: pytest.fail("a cached split was tuned again"))
    again = topk.BaselineCache(tmp_path, train, tasks, val, SMALL_GRID, 40_000, 0)
    cached = again.results(progress=False)
    assert again.key == first.key
    assert cached["tuning"] == fresh["tuning"]
    assert {n: rep for n, (rep, _) in cached["baselines"].items()} == {
        n: rep for n, (rep, _) in fresh["baselines"].items()
    }
    other_grid = TopKTuning(**{**SMALL_GRID.__dict__, "ease_lambda": [10.0]})
    assert topk.BaselineCache(tmp_path, train, tasks, val, other_grid, 40_000, 0).key != first.key
    other = topk.BaselineCache(tmp_path, train, (warm_task(catalog, ratings, "val"),), val, SMALL_GRID, 40_000, 0)
    assert other.key != first.key  # another protocol is another entry


def with_new_authors(catalog: Catalog, rows: np.ndarray) -> Catalog:
    """``catalog`` with the books at ``rows`` credited to authors nobody else wrote."""
    books = catalog.books.copy()
    books.loc[rows, "author"] = [f"Debut Writer {n}" for n in range(len(rows))]
    code, vocab = group_codes(books["author"])
    groups = {**catalog.groups, "author": (code, vocab, *catalog.groups["author"][2:])}
    return dataclasses.replace(catalog, books=books, groups=groups)


@pytest.fixture(scope="module")
def debuts(loaded):
    """The tiny run's catalog with three of its cold books (each read in cold-book test) by debut authors:
    in the sample every cold book's author also has a training book."""
    catalog, ratings = loaded
    _, cold = cold_book_task(catalog, ratings)
    read = ratings.loc[ratings["split"] == "cold_book", "isbn"].map(catalog.book_index).unique()
    return with_new_authors(catalog, np.intersect1d(cold, read)[:3]), ratings


def test_new_author_protocol_holds_only_cold_books_of_authors_new_to_training(loaded, debuts) -> None:
    catalog, ratings = debuts
    cold, cold_candidates = cold_book_task(catalog, ratings)
    task, candidates = cold_book_task(catalog, ratings, new_authors_only=True)
    trained_authors = {group_key(a) for a in catalog.books["author"].iloc[np.unique(catalog.rated_books)]} - {None}
    authors = [group_key(a) for a in catalog.books["author"].iloc[candidates]]
    assert sorted(authors) == ["debut writer 0", "debut writer 1", "debut writer 2"] and len(task) > 0
    assert not set(authors) & trained_authors and set(candidates) <= set(cold_candidates)
    # every cold book left out has an author with a training book
    dropped = sorted(set(cold_candidates) - set(candidates))
    assert {group_key(a) for a in catalog.books["author"].iloc[dropped]} <= trained_authors
    # relevant: the reader's cold-book reads among these books (positions among the candidates)
    test = ratings[ratings["split"] == "cold_book"]
    isbns = catalog.books["isbn"].to_numpy()
    for n in range(len(task)):
        user = int(catalog.users["user_id"].iat[task.users[n]])
        reads = set(test.loc[test["user_id"] == user, "isbn"]) & set(isbns[candidates])
        assert len(task.relevant[n]) > 0 and set(isbns[candidates[task.relevant[n]]]) == reads
    assert set(task.users) <= set(cold.users)
    # the unchanged sample has none
    assert len(cold_book_task(*loaded, new_authors_only=True)[1]) == 0


def test_cold_book_protocols_compare_the_model_with_same_author_and_random(tiny_run: Path, debuts) -> None:
    from model.artifacts import ModelFolder
    from train.evaluation.topk import cold_book_results, topk_markdown, training_matrix

    catalog, ratings = debuts
    recommender = ModelFolder(tiny_run).load().recommender
    out = cold_book_results(recommender, catalog, ratings, training_matrix(catalog), seed=0)
    for protocol, books in (("cold-book", None), ("new-author", 3)):
        assert set(out[protocol]) == {MODEL_NAME, CONTENT_NAME, "random"}
        assert all(0 <= rep["recall@10"] <= 1 for rep in out[protocol].values())
        if books:
            assert out[protocol][MODEL_NAME]["cold_books"] == books
            assert out[protocol]["random"]["recall@10"] == 1.0  # 3 books: any top-10 holds them all
    markdown = topk_markdown({"results": {"warm": {}, "cold-user": {}, **out}})
    assert "**new-author**" in markdown and "whose author has no book in training" in markdown


def test_sample_task_keeps_each_users_fields_together(loaded) -> None:
    catalog, ratings = loaded
    task = warm_task(catalog, ratings, "test")
    assert sample_task(task, len(task), seed=0) is task
    part = sample_task(task, 5, seed=0)
    assert len(part) == 5 and np.all(np.diff(part.users) > 0)
    for n, user in enumerate(part.users):
        i = int(np.flatnonzero(task.users == user)[0])
        assert np.array_equal(part.history[n], task.history[i]) and np.array_equal(part.relevant[n], task.relevant[i])
        assert np.array_equal(part.exclude[n], task.exclude[i]) and np.array_equal(part.liked[n], task.liked[i])
        assert torch.equal(part.feats[n], task.feats[i])
