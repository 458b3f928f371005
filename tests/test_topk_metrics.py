"""Top-K metrics of train.metrics, and model.topk's top-k with exclusions, on hand-made lists with
answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.topk import top_k_excluding
from train.metrics import (
    catalog_coverage,
    mean_popularity,
    ndcg_at_k_binary,
    recall_at_k,
    top1_share,
    topk_report,
)


def _d(rank: int) -> float:
    """Discount of 0-based rank."""
    return 1.0 / math.log2(rank + 2)


# Three users, lists of 4, best first; user 2 had only two candidates (padding -1).
REC = np.array(
    [
        [5, 1, 7, 2],
        [3, 4, 0, 9],
        [5, 6, -1, -1],
    ]
)
# User 0: relevant {1, 2, 8} -> hits at ranks 1 and 3. User 1: nothing relevant (skipped).
# User 2: relevant {6} -> hit at rank 1.
REL = [np.array([1, 2, 8]), np.array([], dtype=int), np.array([6])]


def test_recall_hand_computed() -> None:
    # k=2: user 0 finds item 1 of 3 -> 1/3; user 2 finds item 6 -> 1; user 1 skipped.
    assert recall_at_k(REC, REL, 2) == pytest.approx((1 / 3 + 1) / 2)
    # k=4: user 0 finds 1 and 2 of 3 -> 2/3 (denominator |relevant|, not min(|relevant|, k)).
    assert recall_at_k(REC, REL, 4) == pytest.approx((2 / 3 + 1) / 2)
    # k=1: nobody hits.
    assert recall_at_k(REC, REL, 1) == 0.0


def test_recall_denominator_is_relevant_count_not_k() -> None:
    rec = np.array([[0, 1]])
    rel = [np.arange(5)]  # five relevant, two slots: a perfect list still reaches only 2/5
    assert recall_at_k(rec, rel, 2) == pytest.approx(0.4)


def test_duplicate_relevant_items_count_once() -> None:
    assert recall_at_k(np.array([[3, 0]]), [np.array([3, 3])], 2) == 1.0


def test_ndcg_binary_hand_computed() -> None:
    # User 0 at k=4: hits at ranks 1 and 3, ideal puts min(3, 4)=3 hits at ranks 0..2.
    u0 = (_d(1) + _d(3)) / (_d(0) + _d(1) + _d(2))
    # User 2: hit at rank 1 of one relevant.
    u2 = _d(1) / _d(0)
    assert ndcg_at_k_binary(REC, REL, 4) == pytest.approx((u0 + u2) / 2)
    # k=2: user 0 hits rank 1, ideal 2 hits (min(3, 2)).
    assert ndcg_at_k_binary(REC, REL, 2) == pytest.approx((_d(1) / (_d(0) + _d(1)) + u2) / 2)


def test_ndcg_perfect_list_is_one() -> None:
    assert ndcg_at_k_binary(np.array([[4, 2, 9]]), [np.array([2, 4])], 3) == pytest.approx(1.0)


def test_no_user_with_relevant_items_gives_nan() -> None:
    empty = [np.array([], dtype=int)] * 3
    assert math.isnan(recall_at_k(REC, empty, 2))
    assert math.isnan(ndcg_at_k_binary(REC, empty, 2))


def test_coverage_top1_popularity() -> None:
    # Top-2 items: {5, 1, 3, 4, 6}; padding is not an item.
    assert catalog_coverage(REC, 2, n_items=10) == pytest.approx(0.5)
    assert catalog_coverage(REC, 4, n_items=20) == pytest.approx(9 / 20)  # {0..7, 9}
    # Top-1 items 5, 3, 5: item 5 is the most common, for 2 of 3 users.
    assert top1_share(REC) == pytest.approx(2 / 3)
    pop = np.arange(10, dtype=float) * 10  # popularity of item i = 10 i
    # Top-2 items 5,1,3,4,5,6 -> 50,10,30,40,50,60 -> mean 40; the padding in row 2 is ignored at k=4.
    assert mean_popularity(REC, 2, pop) == pytest.approx(40.0)
    assert mean_popularity(REC, 4, pop) == pytest.approx(np.mean([50, 10, 70, 20, 30, 40, 0, 90, 50, 60]))


def test_top1_share_skips_users_without_recommendations() -> None:
    rec = np.array([[2, 1], [-1, -1], [3, 2]])
    assert top1_share(rec) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [lambda r: recall_at_k(r, REL[: len(r)], 0), lambda r: catalog_coverage(r, -1, 5)])
def test_k_below_one_rejected(fn) -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        fn(REC)


def test_bad_input_rejected() -> None:
    with pytest.raises(ValueError, match="empty input"):
        recall_at_k(np.zeros((0, 3), dtype=int), [], 1)
    with pytest.raises(ValueError, match="length mismatch"):
        recall_at_k(REC, REL[:2], 2)
    with pytest.raises(ValueError, match="exceeds"):
        recall_at_k(REC, REL, 5)
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(REC.astype(float), REL, 2)
    with pytest.raises(ValueError, match="empty input"):
        top_k_excluding(np.zeros((0, 4)), [], 2)
    with pytest.raises(ValueError, match="NaN"):
        top_k_excluding(np.array([[0.1, np.nan]]), [[]], 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k_excluding(np.ones((1, 3)), [[]], 0)


# ----------------------------------------------------------------- top_k_excluding

SCORES = np.array(
    [
        [0.1, 0.9, 0.5, 0.7, 0.3],
        [0.4, 0.2, 0.8, 0.6, 0.0],
    ]
)


def top(scores, exclude, k: int) -> np.ndarray:
    """The columns of :func:`top_k_excluding`, as the evaluation reads them."""
    return top_k_excluding(scores, exclude, k)[1].numpy()


def test_top_k_orders_best_first() -> None:
    values, columns = top_k_excluding(SCORES, None, 3)
    np.testing.assert_array_equal(columns, [[1, 3, 2], [2, 3, 0]])
    assert columns.dtype == torch.int64 and values.dtype == torch.float32
    np.testing.assert_allclose(values, [[0.9, 0.7, 0.5], [0.8, 0.6, 0.4]])


def test_top_k_excludes_from_csr_and_lists_alike() -> None:
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=np.float32))
    want = [[2, 4, 0], [3, 0, 1]]
    np.testing.assert_array_equal(top(SCORES, exclude, 3), want)
    np.testing.assert_array_equal(top(SCORES, [np.array([1, 3]), np.array([2])], 3), want)
    # Float64 scores are converted, so the caller's stay as they were; float32 ones are overwritten
    # at the excluded entries, shared rather than copied.
    assert SCORES[0, 1] == 0.9
    shared = SCORES.astype(np.float32)
    np.testing.assert_array_equal(top(shared, exclude, 3), want)
    assert np.isneginf(shared[exclude.toarray() > 0]).all() and np.isfinite(shared[exclude.toarray() == 0]).all()
    with pytest.raises(ValueError, match="exclude has 1 rows"):
        top(SCORES, [[]], 3)
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        top(SCORES, [[5], []], 3)


def test_top_k_pads_when_too_few_items_remain() -> None:
    # User 0 may get only items 0 and 4; k larger than the catalog pads too.
    values, columns = top_k_excluding(SCORES, [np.array([1, 2, 3]), np.array([], dtype=int)], 7)
    np.testing.assert_array_equal(columns[0], [4, 0, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(columns[1], [2, 3, 0, 1, 4, -1, -1])
    assert torch.isneginf(values[columns < 0]).all() and torch.isfinite(values[columns >= 0]).all()


def test_top_k_breaks_ties_by_lower_index() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 2.0, 0.5]])
    np.testing.assert_array_equal(top(scores, [[]], 2), [[1, 2]])
    np.testing.assert_array_equal(top(scores, [[2]], 3), [[1, 3, 4]])
    np.testing.assert_array_equal(top(np.zeros((2, 4)), [[], [0]], 2), [[0, 1], [1, 2]])
    np.testing.assert_array_equal(top(np.array([[0.0, -0.0, 0.0]]), None, 3), [[0, 1, 2]])  # the zeros tie


def test_top_k_accepts_torch_and_tensor_exclusions() -> None:
    scores = torch.tensor(SCORES, dtype=torch.float32)
    values, columns = top_k_excluding(scores, [torch.tensor([], dtype=torch.long), torch.tensor([2])], 2)
    np.testing.assert_array_equal(columns, [[1, 3], [3, 0]])
    torch.testing.assert_close(values, scores.gather(1, columns))


def test_top_k_matches_full_sort_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 200)).astype(np.float32)
    exclude = sp.random(50, 200, density=0.1, format="csr", random_state=1)
    masked = np.where(exclude.toarray() != 0, -np.inf, scores)
    np.testing.assert_array_equal(top(scores, exclude, 20), np.argsort(-masked, axis=1, kind="stable")[:, :20])


# ------------------------------------------------------------------------ report


def test_topk_report_keys_and_values() -> None:
    liked = [np.array([2]), np.array([], dtype=int), np.array([], dtype=int)]  # only user 0 liked one
    pop = np.ones(10)
    rep = topk_report(REC, REL, liked, pop, n_items=10, ks=(2, 4))
    assert rep["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert rep["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert rep["liked_recall@2"] == 0.0
    assert rep["liked_recall@4"] == 1.0  # item 2 at rank 3
    assert rep["liked_ndcg@2"] == 0.0
    assert rep["coverage@2"] == pytest.approx(0.5)
    assert rep["top1_share"] == pytest.approx(2 / 3)
    assert rep["mean_popularity@2"] == 1.0
    assert rep["users"] == 2 and rep["liked_users"] == 1
    assert set(rep) >= {"ndcg@2", "recall@2", "recall@4"}


def test_topk_report_default_keys() -> None:
    rng = np.random.default_rng(0)
    rec = np.argsort(rng.random((4, 300)), axis=1)[:, :100]
    rel = [rng.choice(300, 3, replace=False) for _ in range(4)]
    rep = topk_report(rec, rel, rel, np.ones(300), 300)
    assert {
        "recall@10",
        "recall@100",
        "ndcg@10",
        "liked_recall@10",
        "liked_recall@100",
        "liked_ndcg@10",
        "coverage@10",
        "top1_share",
        "mean_popularity@10",
        "users",
    } <= set(rep)
    assert rep["users"] == 4
