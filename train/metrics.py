"""Rating-prediction and top-K metrics: plain functions, array-likes in, float out.

Modelled on recommenders-team/recommenders ``evaluation/python_evaluation.py``
but operating on aligned numpy arrays instead of two DataFrames, so callers
never have to merge predictions back onto the ground truth.

Top-K functions take ``recommended``, an int array [U, K] of item indices per
user, best first, with -1 as padding where a user had fewer than K candidates,
and ``relevant``, a sequence of U int arrays (each user's held-out items).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "catalog_coverage",
    "evaluate_predictions",
    "mae",
    "mean_popularity",
    "ndcg_at_k",
    "ndcg_at_k_binary",
    "recall_at_k",
    "rmse",
    "top1_share",
    "topk_report",
]


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


# ------------------------------------------------------------------ top-K lists


def _recommended(recommended: npt.ArrayLike, k: int | None = None) -> np.ndarray:
    """``recommended`` as a 2-D int64 array, cut to its first ``k`` columns; rejects bad shapes and k."""
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D [users, K], got shape {rec.shape}")
    if rec.shape[0] == 0:
        raise ValueError("empty input: recommended has no users")
    if rec.size and not np.issubdtype(rec.dtype, np.integer):
        raise ValueError(f"recommended must hold integer item indices, got dtype {rec.dtype}")
    if k is None:
        return rec.astype(np.int64, copy=False)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > rec.shape[1]:
        raise ValueError(f"k={k} exceeds the {rec.shape[1]} columns of recommended")
    return rec[:, :k].astype(np.int64, copy=False)


def _hits(rec: np.ndarray, relevant: Sequence[npt.ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Per position, whether the item is relevant to its user (bool [U, k]); and |relevant| per user.

    Duplicate relevant items of a user count once. Padding (-1) never hits.
    """
    if len(relevant) != rec.shape[0]:
        raise ValueError(f"length mismatch: recommended has {rec.shape[0]} users, relevant has {len(relevant)}")
    parts = [np.asarray(r, dtype=np.int64).ravel() for r in relevant]
    lens = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    items = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if (items < 0).any():
        raise ValueError("relevant holds negative item indices")
    n = int(max(items.max(initial=-1), rec.max(initial=-1))) + 1
    users = np.repeat(np.arange(len(parts), dtype=np.int64), lens)
    rel_keys = np.unique(users * n + items)
    n_rel = np.bincount(rel_keys // max(n, 1), minlength=len(parts)) if n else np.zeros(len(parts), np.int64)
    rec_keys = np.arange(rec.shape[0], dtype=np.int64)[:, None] * n + rec
    hit = np.isin(rec_keys, rel_keys) & (rec >= 0)
    return hit, n_rel


def recall_at_k(recommended: npt.ArrayLike, relevant: Sequence[npt.ArrayLike], k: int) -> float:
    """Mean over users with at least one relevant item of |top-k ∩ relevant| / |relevant|.

    This is the recommenders-library definition (``recall_at_k`` in ``python_evaluation.py``): the
    denominator is |relevant|, not min(|relevant|, k), so a user with more than k held-out items
    cannot reach 1. Users with no relevant item are skipped; NaN when no user has one.
    """
    rec = _recommended(recommended, k)
    hit, n_rel = _hits(rec, relevant)
    ok = n_rel > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(hit.sum(axis=1)[ok] / n_rel[ok]))


def ndcg_at_k_binary(recommended: npt.ArrayLike, relevant: Sequence[npt.ArrayLike], k: int) -> float:
    """Mean NDCG@k with binary gains (1 for a relevant item, 0 otherwise).

    DCG = sum of 1/log2(rank+2) over hits in the top k (0-based rank); the ideal DCG puts
    min(|relevant|, k) hits first. Users with no relevant item are skipped; NaN when none has one.
    """
    rec = _recommended(recommended, k)
    hit, n_rel = _hits(rec, relevant)
    ok = n_rel > 0
    if not ok.any():
        return float("nan")
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = hit.astype(np.float64) @ disc
    idcg = np.concatenate(([0.0], np.cumsum(disc)))[np.minimum(n_rel, k)]
    return float(np.mean(dcg[ok] / idcg[ok]))


def catalog_coverage(recommended: npt.ArrayLike, k: int, n_items: int) -> float:
    """Distinct items across all users' top-k lists / ``n_items`` (padding ignored)."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    rec = _recommended(recommended, k)
    return float(np.unique(rec[rec >= 0]).size / n_items)


def top1_share(recommended: npt.ArrayLike) -> float:
    """Share of users whose top-1 item is the most common top-1 item.

    Users with no recommendation at all (top-1 is padding) are left out; NaN when none is left.
    """
    rec = _recommended(recommended, 1)
    first = rec[:, 0]
    first = first[first >= 0]
    if first.size == 0:
        return float("nan")
    return float(np.unique(first, return_counts=True)[1].max() / first.size)


def mean_popularity(recommended: npt.ArrayLike, k: int, popularity: npt.ArrayLike) -> float:
    """Mean of ``popularity[item]`` over every recommended item in the top-k (padding ignored).

    NaN when there is no recommended item at all.
    """
    rec = _recommended(recommended, k)
    pop = np.asarray(popularity, dtype=np.float64).ravel()
    items = rec[rec >= 0]
    if items.size == 0:
        return float("nan")
    if items.max() >= pop.size:
        raise ValueError(f"recommended item {int(items.max())} is outside popularity (length {pop.size})")
    return float(pop[items].mean())


def topk_report(
    recommended: npt.ArrayLike,
    relevant: Sequence[npt.ArrayLike],
    liked: Sequence[npt.ArrayLike],
    popularity: npt.ArrayLike,
    n_items: int,
    ks: Sequence[int] = (10, 100),
) -> dict[str, float | int]:
    """Every top-K figure of one model on one protocol.

    ``relevant`` are each user's held-out items, ``liked`` the subset rated >= 8 (users without a
    liked item are skipped for the ``liked_*`` figures). Recall is reported at every k in ``ks``;
    NDCG, coverage and mean popularity at the smallest. ``users`` counts users with a relevant item,
    ``liked_users`` those with a liked one.
    """
    if not ks:
        raise ValueError("ks is empty")
    k0 = min(ks)
    rec = _recommended(recommended, max(ks))
    if len(liked) != rec.shape[0]:
        raise ValueError(f"length mismatch: recommended has {rec.shape[0]} users, liked has {len(liked)}")
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(rec, relevant, k)
    out[f"ndcg@{k0}"] = ndcg_at_k_binary(rec, relevant, k0)
    for k in ks:
        out[f"liked_recall@{k}"] = recall_at_k(rec, liked, k)
    out[f"liked_ndcg@{k0}"] = ndcg_at_k_binary(rec, liked, k0)
    out[f"coverage@{k0}"] = catalog_coverage(rec, k0, n_items)
    out["top1_share"] = top1_share(rec)
    out[f"mean_popularity@{k0}"] = mean_popularity(rec, k0, popularity)
    out["users"] = int(sum(np.asarray(r).size > 0 for r in relevant))
    out["liked_users"] = int(sum(np.asarray(r).size > 0 for r in liked))
    return out
