"""Deterministic, seeded splits: warm train/val/test plus cold-book and cold-user tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from train.config import SplitConfig


def assign_splits(ratings: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Return ``ratings`` sorted by (user_id, isbn) with a ``split`` column.

    Implicit ratings (0) go to ``implicit``. Of the explicit ones, all ratings of a seeded
    ``cold_book_frac`` of books go to ``cold_book`` and of a seeded ``cold_user_frac`` of users to
    ``cold_user`` (``cold_both`` where both apply); the rest is shuffled into train/val/test.
    The result depends only on the rows and the seed, not on their input order.
    """
    rng = np.random.default_rng(cfg.seed)
    out = ratings.sort_values(["user_id", "isbn"], kind="stable").reset_index(drop=True)
    explicit = out["rating"].to_numpy() > 0

    cold_books = _choose(np.unique(out.loc[explicit, "isbn"].to_numpy(str)), cfg.cold_book_frac, rng)
    cold_users = _choose(np.unique(out.loc[explicit, "user_id"].to_numpy()), cfg.cold_user_frac, rng)
    is_cold_book = out["isbn"].isin(cold_books).to_numpy() & explicit
    is_cold_user = out["user_id"].isin(cold_users).to_numpy() & explicit

    split = np.full(len(out), "implicit", dtype=object)
    split[is_cold_book & is_cold_user] = "cold_both"
    split[is_cold_book & ~is_cold_user] = "cold_book"
    split[is_cold_user & ~is_cold_book] = "cold_user"

    warm = np.flatnonzero(explicit & ~is_cold_book & ~is_cold_user)
    warm = warm[rng.permutation(len(warm))]
    n_test = round(cfg.test_frac * len(warm))
    n_val = round(cfg.val_frac * len(warm))
    split[warm[:n_test]] = "test"
    split[warm[n_test : n_test + n_val]] = "val"
    split[warm[n_test + n_val :]] = "train"
    out["split"] = split.astype(str)
    return out


def assign_folds(n_rows: int, folds: int, seed: int) -> np.ndarray:
    """Seeded fold id in [0, folds) per training row, balanced."""
    rng = np.random.default_rng(seed + 1)
    return (rng.permutation(n_rows) % folds).astype(np.int64)


def _choose(values: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    if frac <= 0 or len(values) == 0:
        return values[:0]
    n = min(len(values), math.ceil(frac * len(values)))
    return rng.choice(values, size=n, replace=False)
