"""Training tensors: feature tables with out-of-fold histories, and the rows of every split.

Rating-derived features of a training row come from the user's and book's *other* training
folds, so a row's own rating never feeds its features; val/test/cold rows use the full training
history (exactly what ``Catalog`` computes for serving).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model.catalog import Catalog
from model.features import book_feature_table, user_features
from train.config import Config
from train.data.split import assign_folds
from train.data.tables import catalog_ratings, load_tables

EVAL_SPLITS = ("val", "test", "cold_book", "cold_user")


@dataclass
class SplitRows:
    """Aligned rows of one split: indices into the feature tables and the true ratings."""

    user_row: torch.Tensor
    book_row: torch.Tensor
    rating: torch.Tensor
    user_id: np.ndarray
    isbn: np.ndarray

    def __len__(self) -> int:
        return int(self.rating.shape[0])


@dataclass
class TrainingData:
    """Feature tables (fold-specific rows first, full-history rows last) and split rows."""

    user_table: torch.Tensor
    book_table: torch.Tensor
    splits: dict[str, SplitRows]


def build_training_data(catalog: Catalog, ratings: pd.DataFrame, folds: int, seed: int) -> TrainingData:
    """Feature tables for ``folds`` out-of-fold views plus the full view, and every split's rows."""
    n_users, n_books = len(catalog.users), len(catalog.books)
    train = ratings[ratings["split"] == "train"]
    u = torch.tensor(train["user_id"].map(catalog.user_index).to_numpy(np.int64))
    b = torch.tensor(train["isbn"].map(catalog.book_index).to_numpy(np.int64))
    r = torch.tensor(train["rating"].to_numpy(np.float32))
    fold = torch.tensor(assign_folds(len(train), folds, seed))

    user_parts, book_parts = [], []
    for k in range(folds):
        keep = fold != k
        user_parts.append(
            user_features(
                catalog.user_emb,
                u[keep],
                catalog.book_emb[b[keep]],
                r[keep],
                catalog.spec,
            )
        )
        book_parts.append(
            book_feature_table(
                catalog.book_emb,
                catalog.groups["author"][0],
                catalog.groups["publisher"][0],
                b[keep],
                r[keep],
                catalog.spec,
            )
        )
    user_table = torch.cat([*user_parts, catalog.user_feats])
    book_table = torch.cat([*book_parts, catalog.book_feats])

    splits = {
        "train": SplitRows(
            fold * n_users + u,
            fold * n_books + b,
            r,
            train["user_id"].to_numpy(),
            train["isbn"].to_numpy(),
        )
    }
    for name in EVAL_SPLITS:
        part = ratings[ratings["split"] == name]
        splits[name] = SplitRows(
            user_row=folds * n_users + torch.tensor(part["user_id"].map(catalog.user_index).to_numpy(np.int64)),
            book_row=folds * n_books + torch.tensor(part["isbn"].map(catalog.book_index).to_numpy(np.int64)),
            rating=torch.tensor(part["rating"].to_numpy(np.float32)),
            user_id=part["user_id"].to_numpy(),
            isbn=part["isbn"].to_numpy(),
        )
    return TrainingData(user_table, book_table, splits)


def load_training_data(
    cfg: Config, run_dir: Path, catalog: Catalog | None = None
) -> tuple[Catalog, pd.DataFrame, TrainingData]:
    """The run's catalog (loaded unless given), its split ratings and the training tensors built
    from them: what every step after ``features`` starts from."""
    catalog = catalog if catalog is not None else Catalog.load(run_dir)
    ratings = catalog_ratings(load_tables(run_dir)[2], cfg.split)
    return catalog, ratings, build_training_data(catalog, ratings, cfg.split.folds, cfg.split.seed)
