"""Tests for train.metrics and train.evaluation.rating_baselines (synthetic data only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.evaluation.rating_baselines import (
    RATING_MAX,
    RATING_MIN,
    BiasBaseline,
    GlobalMean,
    RatingPredictor,
    SurpriseSVD,
    tune,
)
from train.metrics import evaluate_predictions, mae, ndcg_at_k, rmse

# --------------------------------------------------------------------- metrics


def test_rmse_mae_hand_computed() -> None:
    y = [1.0, 2.0, 3.0, 4.0]
    p = [2.0, 2.0, 1.0, 4.0]  # errors 1, 0, -2, 0
    assert rmse(y, p) == pytest.approx(math.sqrt(5 / 4), abs=1e-12)
    assert mae(y, p) == pytest.approx(3 / 4, abs=1e-12)
    assert rmse(y, y) == 0.0


@pytest.mark.parametrize("fn", [rmse, mae])
def test_rmse_mae_reject_bad_input(fn) -> None:
    with pytest.raises(ValueError):
        fn([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        fn([], [])


def _d(rank: int) -> float:
    """Discount of 0-based rank."""
    return 1.0 / math.log2(rank + 2)


def test_ndcg_perfect_and_wrong_ranking() -> None:
    users = [1, 1, 1]
    y = [3.0, 2.0, 1.0]
    assert ndcg_at_k(users, y, [0.9, 0.5, 0.1]) == pytest.approx(1.0)
    # Fully reversed: DCG = 1*d0 + 2*d1 + 3*d2, IDCG = 3*d0 + 2*d1 + 1*d2.
    idcg = 3 * _d(0) + 2 * _d(1) + 1 * _d(2)
    expected = (1 * _d(0) + 2 * _d(1) + 3 * _d(2)) / idcg
    got = ndcg_at_k(users, y, [0.1, 0.5, 0.9])
    assert got == pytest.approx(expected, abs=1e-12)
    assert got == pytest.approx(0.7899980, abs=1e-6)
    assert got < 1.0


def test_ndcg_skips_small_users_and_averages() -> None:
    # User 7 ranks perfectly (1.0); user 8 swaps its pair; user 9 has one item
    # and must be ignored (it would score 1.0 and pull the mean up).
    users = np.array([7, 8, 7, 9, 8])
    y = np.array([5.0, 2.0, 1.0, 10.0, 4.0])
    p = np.array([9.0, 3.0, 1.0, 1.0, 2.0])
    u8 = (2 * _d(0) + 4 * _d(1)) / (4 * _d(0) + 2 * _d(1))
    assert ndcg_at_k(users, y, p) == pytest.approx((1.0 + u8) / 2, abs=1e-12)
    with_singletons = ndcg_at_k(users, y, p, min_items=1)
    assert with_singletons == pytest.approx((1.0 + u8 + 1.0) / 3, abs=1e-12)
    assert math.isnan(ndcg_at_k([1, 2], [3.0, 4.0], [1.0, 1.0]))


def test_ndcg_cutoff_and_ties_break_by_position() -> None:
    # k=1: only the top-ranked item counts; gain 1 vs ideal 3.
    assert ndcg_at_k([1, 1, 1], [1.0, 3.0, 2.0], [9.0, 0.0, 5.0], k=1) == pytest.approx(1 / 3)
    # All tied: order is input order, so [1, 3] scores (1*d0 + 3*d1)/(3*d0 + 1*d1).
    expected = (1 * _d(0) + 3 * _d(1)) / (3 * _d(0) + 1 * _d(1))
    assert ndcg_at_k([1, 1], [1.0, 3.0], [5.0, 5.0]) == pytest.approx(expected, abs=1e-12)
    assert ndcg_at_k([1, 1], [3.0, 1.0], [5.0, 5.0]) == pytest.approx(1.0)


def test_ndcg_string_user_ids_and_bad_k() -> None:
    assert ndcg_at_k(["a", "a"], [1.0, 2.0], [2.0, 1.0]) < 1.0
    with pytest.raises(ValueError):
        ndcg_at_k([1, 1], [1.0, 2.0], [1.0, 2.0], k=0)
    with pytest.raises(ValueError):
        ndcg_at_k([1], [1.0, 2.0], [1.0, 2.0])


def test_evaluate_predictions_keys() -> None:
    out = evaluate_predictions([1, 1], [4.0, 2.0], [3.0, 2.0])
    assert out == {
        "rmse": pytest.approx(math.sqrt(0.5)),
        "mae": pytest.approx(0.5),
        "ndcg@10": pytest.approx(1.0),
        "n": 2,
    }


# ------------------------------------------------------------------- baselines


def _synthetic(seed: int = 0, n_users: int = 60, n_items: int = 80, density: float = 0.5):
    """Ratings = 6 + b_u + b_i + noise on a dense-ish random subset of pairs."""
    rng = np.random.default_rng(seed)
    bu = rng.normal(0, 1.0, n_users)
    bi = rng.normal(0, 1.0, n_items)
    uu, ii = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    mask = rng.random(uu.shape) < density
    u, i = uu[mask], ii[mask]
    r = 6.0 + bu[u] + bi[i] + rng.normal(0, 0.1, u.size)
    users = (1000 + u).astype(np.int64)
    items = np.array([f"isbn{k:05d}" for k in i], dtype=object)
    return users, items, r, bu, bi


def test_global_mean() -> None:
    m = GlobalMean().fit(np.array([1, 2, 3]), np.array(["a", "b", "c"], dtype=object), [2, 4, 9])
    assert isinstance(m, RatingPredictor)
    np.testing.assert_array_equal(m.predict(np.array([1, 99]), np.array(["a", "zz"], dtype=object)), [5.0, 5.0])
    with pytest.raises(RuntimeError):
        GlobalMean().predict(np.array([1]), np.array(["a"], dtype=object))


def test_bias_baseline_recovers_planted_biases() -> None:
    # 200 users x 80 items at 50% density: sampling error of each bias ~0.01.
    users, items, r, bu, bi = _synthetic(n_users=200)
    m = BiasBaseline(reg_user=0.01, reg_item=0.01, n_epochs=30).fit(users, items, r)
    # Biases are identified only up to a shared constant; compare centred values.
    u_idx = m.user_index_.get_indexer(1000 + np.arange(bu.size))
    i_idx = m.item_index_.get_indexer([f"isbn{k:05d}" for k in range(bi.size)])
    est_bu, est_bi = m.bu_[u_idx], m.bi_[i_idx]
    np.testing.assert_allclose(est_bu - est_bu.mean(), bu - bu.mean(), atol=0.05)
    np.testing.assert_allclose(est_bi - est_bi.mean(), bi - bi.mean(), atol=0.05)
    assert rmse(r, m.predict(users, items)) < 0.11  # noise sd is 0.1


def test_bias_baseline_unknowns_get_zero_bias_and_clip() -> None:
    users = np.array([1, 1, 2, 2], dtype=np.int64)
    items = np.array(["a", "b", "a", "b"], dtype=object)
    r = np.array([10.0, 10.0, 10.0, 1.0])
    m = BiasBaseline(reg_user=0.0, reg_item=0.0, n_epochs=1).fit(users, items, r)
    # mu = 7.75. One ALS epoch with reg 0: b_a = 2.25, b_b = -2.25, then
    # b_1 = ((2.25 - 2.25) + (2.25 + 2.25)) / 2 = 2.25,
    # b_2 = ((2.25 - 2.25) + (-6.75 + 2.25)) / 2 = -2.25.
    pred = m.predict(
        np.array([1, 1, 99, 99, 1], dtype=np.int64),
        np.array(["a", "zz", "a", "zz", "b"], dtype=object),
    )
    np.testing.assert_allclose(pred, [10.0, 10.0, 10.0, 7.75, 7.75])
    # 7.75 + 2.25 + 2.25 = 12.25 is clipped to 10 above.
    low = m.predict(np.array([2], dtype=np.int64), np.array(["b"], dtype=object))
    np.testing.assert_allclose(low, [7.75 - 2.25 - 2.25])


def test_bias_baseline_matches_surprise_baseline_only() -> None:
    import pandas as pd
    from surprise import BaselineOnly, Dataset, Reader

    users, items, r, _, _ = _synthetic(seed=1, density=0.2)
    r = np.clip(np.round(r), 1, 10)
    m = BiasBaseline(reg_user=4.0, reg_item=7.0, n_epochs=5).fit(users, items, r)
    df = pd.DataFrame({"u": users, "i": items, "r": r})
    ts = Dataset.load_from_df(df, Reader(rating_scale=(1, 10))).build_full_trainset()
    opts = {"method": "als", "reg_u": 4.0, "reg_i": 7.0, "n_epochs": 5}
    ref = BaselineOnly(bsl_options=opts, verbose=False).fit(ts)
    qu = np.concatenate([users[:40], [5]])
    qi = np.concatenate([items[:40], ["unknown"]]).astype(object)
    want = [ref.predict(a, b).est for a, b in zip(qu.tolist(), qi.tolist(), strict=True)]
    np.testing.assert_allclose(m.predict(qu, qi), want, atol=1e-9)


@pytest.fixture(scope="module")
def svd_fit() -> tuple[SurpriseSVD, np.ndarray, np.ndarray, np.ndarray]:
    users, items, r, _, _ = _synthetic(seed=2, n_users=50, n_items=60, density=0.3)
    r = np.clip(np.round(r), 1, 10)
    m = SurpriseSVD(n_factors=8, n_epochs=15, lr_all=0.01, reg_all=0.02).fit(users, items, r)
    return m, users, items, r


def test_svd_vectorised_predict_matches_surprise(svd_fit) -> None:
    m, users, items, _ = svd_fit
    qu = np.concatenate([users[:200], [7, 7, users[0], 123456]]).astype(np.int64)
    qi = np.concatenate([items[:200], [items[0], "nope", "nope", "nope2"]]).astype(object)
    vec = m.predict(qu, qi)
    ref = np.array([m.algo_.predict(a, b).est for a, b in zip(qu.tolist(), qi.tolist(), strict=True)])
    np.testing.assert_allclose(vec, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(m.predict_loop(qu, qi), ref, atol=0, rtol=0)
    # Longer than one 4096-row chunk of the vectorised dot product, and shuffled.
    order = np.random.default_rng(0).permutation(25 * qu.size) % qu.size
    np.testing.assert_allclose(m.predict(qu[order], qi[order]), ref[order], atol=1e-6, rtol=0)
    # Unknown user + unknown item falls back to the global mean exactly.
    assert vec[-1] == pytest.approx(m.algo_.trainset.global_mean, abs=1e-12)
    # Known user, unknown item: mu + b_u only.
    u0 = m.algo_.trainset.to_inner_uid(int(users[0]))
    assert vec[-2] == pytest.approx(m.algo_.trainset.global_mean + m.algo_.bu[u0], abs=1e-12)


def test_svd_predict_clips_to_scale() -> None:
    # Extreme ratings with no regularisation push raw estimates past the scale;
    # Surprise clips, and so must the vectorised path.
    users = np.repeat(np.arange(4, dtype=np.int64), 3)
    items = np.tile(np.array(["a", "b", "c"], dtype=object), 4)
    r = np.array([10, 10, 10, 10, 10, 10, 1, 1, 1, 1, 1, 10], dtype=float)
    m = SurpriseSVD(n_factors=2, n_epochs=200, lr_all=0.05, reg_all=0.0).fit(users, items, r)
    algo = m.algo_
    raw = np.array(
        [
            algo.estimate(algo.trainset.to_inner_uid(u), algo.trainset.to_inner_iid(i))
            for u, i in zip(users.tolist(), items.tolist(), strict=True)
        ]
    )
    assert raw.max() > RATING_MAX or raw.min() < RATING_MIN  # the case is really exercised
    pred = m.predict(users, items)
    assert pred.min() >= RATING_MIN and pred.max() <= RATING_MAX
    np.testing.assert_allclose(pred, np.clip(raw, RATING_MIN, RATING_MAX), atol=1e-9)
    np.testing.assert_allclose(pred, m.predict_loop(users, items), atol=1e-9)


def test_tune_picks_lowest_validation_rmse() -> None:
    users, items, r, _, _ = _synthetic(seed=3)
    n = users.size
    cut = int(0.8 * n)
    train = (users[:cut], items[:cut], r[:cut])
    val = (users[cut:], items[cut:], r[cut:])
    grid = [{"reg_user": 500.0, "reg_item": 500.0}, {"reg_user": 0.5, "reg_item": 0.5}]
    params, score = tune(lambda p: BiasBaseline(**p), grid, train, val)
    assert params == grid[1]
    want = rmse(val[2], BiasBaseline(**grid[1]).fit(*train).predict(val[0], val[1]))
    assert score == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        tune(lambda p: BiasBaseline(**p), [], train, val)
