"""Protocols for catalog updates (``python -m train update``): does an update give a served model
what training would have given it? Both use the evaluate step's own protocols and recommender.

- **held-out books**: a run trained with ``split.hold_out_cold_books`` never saw the cold-test books
  (not in its catalog, its features' statistics, its retrieval's negatives). An update adds them,
  their rows of the books file and nothing else. Their cold-book and new-author recall@10
  (``cold_book_results``: the same readers rank the same cold books) is set beside the figures of a
  run of the same config that had them, unrated, in its catalog from the start.
- **fresh reads**: the warm-test readers who also have validation reads. Their test recall@10 from
  the version as trained (the validation reads unknown to it), and from a version updated with those
  reads as new ratings (history, history features and item graph follow; the networks do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.artifacts import LoadedModel
from train.data.sample import BOOKS_HEADER, RATINGS_HEADER, write_kaggle
from train.data.tables import cold_test_books
from train.evaluation.protocols import clean, restrict_task, warm_task
from train.evaluation.topk import cold_book_results, model_top_k, training_matrix
from train.metrics import recall_at_k

K = 10


def write_books_update(books: pd.DataFrame, ratings: pd.DataFrame, folder: Path) -> int:
    """``folder/Books.csv`` (Kaggle layout) with the cold-test books of ``ratings`` from ``books``
    (the data step's tables); returns how many."""
    held = books[books["isbn"].isin(cold_test_books(ratings))]
    rows = [
        [isbn, title, _text(author), "" if pd.isna(year) else str(int(year)), _text(publisher)]
        for isbn, title, author, year, publisher in held[["isbn", "title", "author", "year", "publisher"]].itertuples(
            index=False
        )
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_kaggle(folder / "Books.csv", BOOKS_HEADER, rows)
    return len(rows)


def write_reads_update(ratings: pd.DataFrame, split: str, folder: Path) -> int:
    """``folder/Ratings.csv`` (Kaggle layout) with the ratings of ``split``; returns how many."""
    part = ratings[ratings["split"] == split]
    folder.mkdir(parents=True, exist_ok=True)
    rows = part[["user_id", "isbn", "rating"]].astype(str).values.tolist()
    write_kaggle(folder / "Ratings.csv", RATINGS_HEADER, rows)
    return len(part)


def cold_books(loaded: LoadedModel, ratings: pd.DataFrame, seed: int) -> dict[str, dict]:
    """The evaluate step's cold-book and new-author tables for ``loaded``."""
    catalog = loaded.catalog
    return cold_book_results(loaded.recommender, catalog, ratings, training_matrix(catalog), seed)


def fresh_readers(ratings: pd.DataFrame) -> np.ndarray:
    """User ids with both warm-test and validation ratings."""
    by_split = ratings.groupby("split")["user_id"].unique()
    return np.intersect1d(by_split.get("test", []), by_split.get("val", []))


def warm_recall(loaded: LoadedModel, ratings: pd.DataFrame, user_ids: np.ndarray) -> dict[str, Any]:
    """Warm-test recall@10 of ``user_ids`` with ``loaded``'s recommender, each reader's history as
    its catalog holds it (read books excluded, as in the warm protocol)."""
    catalog = loaded.catalog
    task = warm_task(catalog, ratings, "test")
    ids = catalog.users["user_id"].to_numpy()[task.users]
    task = restrict_task(task, np.flatnonzero(np.isin(ids, user_ids)))
    top = model_top_k(loaded.recommender, task, K)
    return {
        f"recall@{K}": recall_at_k(top, clean(task.relevant), K),
        "users": len(task),
        "mean_history": float(np.mean([len(h) for h in task.history])) if len(task) else 0.0,
    }


def _text(value: Any) -> str:
    return "" if pd.isna(value) else str(value)
