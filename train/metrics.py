"""Rating-prediction metrics: plain functions, array-likes in, float out.

Modelled on recommenders-team/recommenders ``evaluation/python_evaluation.py``
but operating on aligned numpy arrays instead of two DataFrames, so callers
never have to merge predictions back onto the ground truth.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["evaluate_predictions", "mae", "ndcg_at_k", "rmse"]


def _pair(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"length mismatch: y_true has {t.size}, y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("empty input")
    return t, p


def rmse(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Root mean squared error."""
    t, p = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((t - p) ** 2)))


def mae(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean absolute error."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def _ranks_within_groups(codes_sorted: np.ndarray, n_groups: int) -> np.ndarray:
    """0-based position of each row inside its (contiguous) group."""
    counts = np.bincount(codes_sorted, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.arange(codes_sorted.size) - starts[codes_sorted]


def _dcg_per_group(codes: np.ndarray, gains: np.ndarray, order: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    codes_sorted = codes[order]
    ranks = _ranks_within_groups(codes_sorted, n_groups)
    keep = ranks < k
    disc = 1.0 / np.log2(ranks[keep] + 2.0)
    return np.bincount(codes_sorted[keep], weights=gains[order][keep] * disc, minlength=n_groups)


def ndcg_at_k(
    user_ids: npt.ArrayLike,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    k: int = 10,
    min_items: int = 2,
) -> float:
    """Mean per-user NDCG@k of ranking each user's *rated* items by ``y_pred``.

    This measures how well predicted scores order the items a user actually
    rated (an explicit-feedback ranking metric), not top-k retrieval over the
    whole catalogue.

    - Users with fewer than ``min_items`` rows are skipped: with one item every
      ordering is perfect, so they would only inflate the mean.
    - Gain is the raw rating (linear ``rel``), not ``2**rel - 1``: on a 1..10
      scale the exponential gain lets a single 10 dominate (1023 vs 511 for a
      9) and turns the metric into "did you put the top item first".
    - Ties in ``y_pred`` are broken by input position (earlier row ranks
      higher), so the result is deterministic and a constant predictor scores
      whatever the input order happens to give, not an optimistic value.
    - Users whose ideal DCG is 0 (all gains 0) are undefined and skipped.

    Returns NaN when no user qualifies.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    t, p = _pair(y_true, y_pred)
    codes, uniques = pd.factorize(np.asarray(user_ids).ravel())
    if codes.size != t.size:
        raise ValueError(f"length mismatch: user_ids has {codes.size}, y_true has {t.size}")
    n_users = len(uniques)

    eligible = np.bincount(codes, minlength=n_users) >= min_items
    rows = eligible[codes]
    if not rows.any():
        return float("nan")
    codes, t, p = codes[rows], t[rows], p[rows]
    pos = np.arange(codes.size)

    # lexsort: last key is primary -> by user, then score desc, then position.
    pred_order = np.lexsort((pos, -p, codes))
    ideal_order = np.lexsort((pos, -t, codes))
    dcg = _dcg_per_group(codes, t, pred_order, n_users, k)
    idcg = _dcg_per_group(codes, t, ideal_order, n_users, k)

    valid = eligible & (idcg > 0)
    if not valid.any():
        return float("nan")
    return float(np.mean(dcg[valid] / idcg[valid]))


def evaluate_predictions(
    user_ids: npt.ArrayLike,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    k: int = 10,
) -> dict[str, float | int]:
    """RMSE, MAE, NDCG@k (key ``ndcg@{k}``) and row count ``n``."""
    return {
        "rmse": rmse(y_true, y_pred),
        "mae": mae(y_true, y_pred),
        f"ndcg@{k}": ndcg_at_k(user_ids, y_true, y_pred, k=k),
        "n": int(np.asarray(y_true).size),
    }
