"""The top-K evaluation protocols and the evaluation step's top-K table on the tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.catalog import Catalog
from train.dataset import load_tables
from train.evaluation.protocols import cold_book_task, cold_user_task, sample_task, warm_task
from train.evaluation.topk import MODEL_NAME, RATING_ONLY_NAME


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
    cold_book = evaluation["topk"]["results"]["cold-book"]
    assert cold_book["random"]["recall@10"] > 0
    markdown = (tiny_run / "evaluation.md").read_text()
    assert "Top-K recommendation" in markdown and "cold-book" in markdown
    assert (tiny_run / "topk.png").stat().st_size > 1000


def test_baseline_reports_are_cached_per_split(loaded, tmp_path: Path) -> None:
    from train.evaluation.topk import BaselineCache, _csr

    catalog, ratings = loaded
    train = _csr([catalog.rated_by(u) for u in range(len(catalog.users))], len(catalog.books))
    tasks = (warm_task(catalog, ratings, "test"),)
    first = BaselineCache(tmp_path, train, tasks, 40_000, 0)
    fresh = first.results(progress=False)
    assert (tmp_path / f"{first.key}.json").is_file()
    again = BaselineCache(tmp_path, train, tasks, 40_000, 0)
    cached = again.results(progress=False)
    assert again.key == first.key
    assert {n: rep for n, (rep, _) in cached.items()} == {n: rep for n, (rep, _) in fresh.items()}
    other = BaselineCache(tmp_path, train, (warm_task(catalog, ratings, "val"),), 40_000, 0)
    assert other.key != first.key  # another protocol is another entry


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
