"""Top-K baselines of train.evaluation.topk_baselines on small synthetic interaction matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from model.candidates import interaction_matrix
from model.topk import top_k_excluding
from train.evaluation.topk_baselines import (
    ALS,
    EASE,
    BaselineSkipped,
    ItemKNN,
    MostPopular,
    RP3beta,
    SameAuthor,
    TopKBaseline,
    recommend_top_k,
)
from train.ranking.graph import MAX_READS, cap_heavy_users, rp3beta_graph

N_ITEMS = 40


def planted(n_users: int = 300, seed: int = 0) -> sp.csr_matrix:
    """Random sparse reading plus a planted pair: everyone who reads item 0 also reads item 1,
    and nobody else reads item 1. Items 2.. are read at random with popularity falling with the index."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    weights = 1.0 / np.arange(1, N_ITEMS - 1)
    weights /= weights.sum()
    for u in range(n_users):
        picks = rng.choice(np.arange(2, N_ITEMS), size=rng.integers(2, 6), replace=False, p=weights)
        users += [u] * len(picks)
        items += list(picks)
        if u % 4 == 0:  # a quarter of readers read both 0 and 1
            users += [u, u]
            items += [0, 1]
    return interaction_matrix(users, items, n_users, N_ITEMS)


def history_of(items: list[int]) -> sp.csr_matrix:
    return interaction_matrix([0] * len(items), items, 1, N_ITEMS)


ALL = [MostPopular, ItemKNN, RP3beta, ALS, EASE]


def test_interaction_matrix_collapses_duplicates() -> None:
    m = interaction_matrix([0, 0, 1, 0], [2, 2, 1, 3], 2, 4)
    np.testing.assert_array_equal(m.toarray(), [[0, 0, 1, 1], [0, 1, 0, 0]])
    assert m.dtype == np.float32
    with pytest.raises(ValueError, match="item_rows outside"):
        interaction_matrix([0], [4], 2, 4)
    with pytest.raises(ValueError, match="length mismatch"):
        interaction_matrix([0, 1], [1], 2, 4)


@pytest.mark.parametrize("cls", ALL)
def test_shape_dtype_and_empty_history_fold_in(cls) -> None:
    model = cls().fit(planted())
    assert isinstance(model, TopKBaseline) and model.name
    hist = sp.vstack([history_of([0]), sp.csr_matrix((1, N_ITEMS), dtype=np.float32), history_of([3, 5])]).tocsr()
    s = model.score(hist)
    assert s.shape == (3, N_ITEMS) and s.dtype == np.float32
    assert np.isfinite(s).all()  # the empty middle row folds in to finite scores too
    with pytest.raises(ValueError, match="item columns"):
        model.score(sp.csr_matrix((1, N_ITEMS + 1)))


def test_most_popular_ranks_by_count() -> None:
    train = interaction_matrix([0, 1, 2, 0, 1, 0, 3], [2, 2, 2, 0, 0, 3, 2], 4, 5)  # counts 2,0,4,1,0
    s = MostPopular().fit(train).score(train[:2])
    np.testing.assert_array_equal(s[0], [2, 0, 4, 1, 0])
    np.testing.assert_array_equal(recommend_top_k(MostPopular().fit(train), train[:1], train[:1], 3), [[1, 4, -1]])
    np.testing.assert_array_equal(
        recommend_top_k(MostPopular().fit(train), sp.csr_matrix((1, 5)), sp.csr_matrix((1, 5)), 3), [[2, 0, 3]]
    )


@pytest.mark.parametrize("cls", [ItemKNN, RP3beta, EASE, ALS])
def test_planted_co_read_item_comes_first(cls) -> None:
    """A reader of item 0 gets item 1 (read by exactly the readers of item 0) as the top book,
    although item 1 is only moderately popular."""
    model = cls().fit(planted())
    top = recommend_top_k(model, history_of([0]), history_of([0]), 3)
    assert top[0, 0] == 1, (model.name, top)


def test_item_knn_cosine_and_neighbour_prune() -> None:
    # Items 0 and 1 share 2 users of 2 each -> cosine 1; items 0 and 2 share 1 -> 1/sqrt(2*1).
    train = interaction_matrix([0, 0, 1, 1, 0], [0, 1, 0, 1, 2], 2, 3)
    knn = ItemKNN(neighbours=None).fit(train)
    s = knn.sim.toarray()
    assert s[0, 1] == pytest.approx(1.0) and s[0, 2] == pytest.approx(1 / np.sqrt(2))
    assert np.diag(s).tolist() == [0, 0, 0]
    pruned = ItemKNN(neighbours=1).fit(train).sim.toarray()
    # Column 2 (target item 2) keeps only its best neighbour: items 0 and 1 tie at 1/sqrt(2), lower index wins.
    np.testing.assert_allclose(pruned[:, 2], [1 / np.sqrt(2), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(ItemKNN(1).fit(train).score(history_of([0])[:, :3]), [[0, 1, 1 / np.sqrt(2)]], 1e-6)


def test_ease_diagonal_zero_and_matches_dense_formula() -> None:
    train = planted(120)
    model = EASE(lam=10.0).fit(train)
    active = model.active
    assert np.all(np.diag(model.weights) == 0)
    # Reference: the closed form in float64 numpy on the active items.
    xa = train[:, active].toarray().astype(np.float64)
    p = np.linalg.inv(xa.T @ xa + 10.0 * np.eye(active.size))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model.weights, b, atol=2e-5)


def test_ease_ignores_items_nobody_has() -> None:
    train = planted(120)
    train = sp.hstack([train, sp.csr_matrix((train.shape[0], 3), dtype=np.float32)]).tocsr()  # 3 unread items
    model = EASE().fit(train)
    np.testing.assert_array_equal(model.active, np.flatnonzero(train.getnnz(axis=0)))
    assert model.active.max() < N_ITEMS
    s = model.score(sp.hstack([history_of([0, 5]), sp.csr_matrix((1, 3))]).tocsr())
    assert s.shape == (1, N_ITEMS + 3) and np.all(s[:, N_ITEMS:] == 0)


def test_ease_skips_when_too_many_items() -> None:
    with pytest.raises(BaselineSkipped, match="max_items=10"):
        EASE(max_items=10).fit(planted())
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE(max_items=10).score(history_of([0]))


def test_als_is_seeded() -> None:
    a = ALS(factors=8, iterations=5, seed=3).fit(planted()).score(history_of([0, 4]))
    b = ALS(factors=8, iterations=5, seed=3).fit(planted()).score(history_of([0, 4]))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recommend_top_k_blocks_and_excludes() -> None:
    train = planted()
    model = ItemKNN().fit(train)
    whole = recommend_top_k(model, train[:50], train[:50], 5, block=50)
    blocked = recommend_top_k(model, train[:50], train[:50], 5, block=7)
    np.testing.assert_array_equal(whole, blocked)
    for u in range(50):
        assert not set(whole[u][whole[u] >= 0]) & set(train[u].indices)


def test_recommend_top_k_default_block_shrinks_with_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    import train.evaluation.topk_baselines as baselines

    train = planted()
    model = ItemKNN().fit(train)
    whole = recommend_top_k(model, train, train, 5, block=len(train.indptr))
    seen: list[int] = []
    scored = model.score
    monkeypatch.setattr(model, "score", lambda h: (seen.append(h.shape[0]), scored(h))[1])
    monkeypatch.setattr(baselines, "SCORE_BUDGET", 10 * N_ITEMS)  # 10 users' scores per block
    np.testing.assert_array_equal(recommend_top_k(model, train, train, 5), whole)
    assert max(seen) == 10 and sum(seen) == train.shape[0]


def test_item_knn_and_rp3beta_cut_the_readers_above_max_reads_to_a_seeded_sample() -> None:
    train = planted()
    assert cap_heavy_users(train, int(np.diff(train.indptr).max()), seed=0) is train  # nobody above: untouched
    heavy = interaction_matrix([0] * 30 + [1] * 3, [*range(30), 0, 1, 2], 2, N_ITEMS)
    cut = cap_heavy_users(heavy, 10, seed=0)
    assert np.diff(cut.indptr).tolist() == [10, 3]  # the 30-item reader cut to 10, the light one kept
    assert set(cut[0].indices) <= set(range(30)) and cut[1].indices.tolist() == [0, 1, 2]
    assert (cap_heavy_users(heavy, 10, seed=0) != cut).nnz == 0  # seeded
    # Both baselines cut the same readers the same way: each is its fit on the cut matrix.
    train = sp.vstack([planted(), heavy]).tocsr()
    by_hand = sp.vstack([planted(), cut]).tocsr()
    for fit in (
        lambda x, reads: ItemKNN(neighbours=None, max_reads=reads).fit(x).sim,
        lambda x, reads: RP3beta(alpha=0.5, beta=0.0, neighbours=5, max_reads=reads).fit(x).weights,
    ):
        capped = fit(train, 10)
        assert (capped != fit(by_hand, 10**9)).nnz == 0 and capped.nnz > 0
        assert (fit(train, 10**9) != capped).nnz > 0


def test_rp3beta_baseline_is_the_shipped_graph() -> None:
    """One builder and one heavy-reader rule: with the graph's settings and seed the baseline's W is
    the graph, array for array, also with a reader above the default ``MAX_READS``."""
    rng = np.random.default_rng(0)
    n_items = MAX_READS + 50
    users = [0] * n_items + [u for u in range(1, 60) for _ in range(5)]
    items = [*range(n_items), *rng.integers(0, 100, 59 * 5)]
    train = interaction_matrix(users, items, 60, n_items)
    graph = rp3beta_graph(train, 0.5, 0.0, 20).weights
    weights = RP3beta(alpha=0.5, beta=0.0, neighbours=20).fit(train).weights
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(weights, name), getattr(graph, name))
    assert (RP3beta(alpha=0.5, beta=0.0, neighbours=20, max_reads=n_items).fit(train).weights != graph).nnz > 0


def test_rp3beta_matches_the_walk_worked_out_by_hand() -> None:
    # u0 reads items 0 and 1, u1 items 1 and 2, u2 item 1: deg(user) = 2, 2, 1; deg(item) = 1, 3, 1.
    train = interaction_matrix([0, 0, 1, 1, 2], [0, 1, 1, 2, 1], 3, 3)
    w = RP3beta(alpha=1.0, beta=0.5, neighbours=3).fit(train).weights.toarray()
    # W[i, j] = deg(i)^-a * sum_u x_ui x_uj deg(u)^-a * deg(j)^-b
    expected = [
        [0, 1 * 0.5 * 3**-0.5, 0],  # 0 -> 1 through u0
        [1 / 3 * 0.5, 0, 1 / 3 * 0.5],  # 1 -> 0 through u0, 1 -> 2 through u1 (u2 reads only 1)
        [0, 1 * 0.5 * 3**-0.5, 0],  # 2 -> 1 through u1
    ]
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    soft = RP3beta(alpha=0.5, beta=0.0, neighbours=3).fit(train).weights.toarray()
    assert soft[0, 1] == pytest.approx(0.5**0.5) and soft[1, 0] == pytest.approx((1 / 3) ** 0.5 * 0.5**0.5)
    # One neighbour per item: item 1's tie between 0 and 2 keeps the lower index.
    one = RP3beta(alpha=1.0, beta=0.5, neighbours=1).fit(train)
    np.testing.assert_allclose(one.weights.toarray()[1], [1 / 6, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(one.score(interaction_matrix([0], [1], 1, 3)), [[1 / 6, 0, 0]], rtol=1e-6)
    # Built a block of items at a time, the same matrix.
    blocked = RP3beta(alpha=1.0, beta=0.5, neighbours=3, max_entries=2).fit(train).weights.toarray()
    np.testing.assert_array_equal(blocked, w)


def test_ease_grid_shares_the_gram_and_equals_separate_fits() -> None:
    train = planted(120)
    for lam, model in zip([5.0, 50.0], EASE.grid(train, [5.0, 50.0]), strict=True):
        assert model.lam == lam and model.name == f"EASE (λ {lam:g})"
        np.testing.assert_allclose(model.weights, EASE(lam).fit(train).weights, atol=1e-6)


def test_same_author_ranks_the_readers_author_first_then_popularity() -> None:
    # Items 0-5; authors: 0 -> A, 1 -> B, 2 -> A, 3 -> C, 4 unknown, 5 -> B. Training reads: item 3 x3, item 1 x1.
    authors = np.array([0, 1, 0, 2, -1, 1])
    train = interaction_matrix([0, 1, 2, 3], [3, 3, 3, 1], 4, 6)
    model = SameAuthor(authors, seed=0).fit(train)
    reader_of_0 = interaction_matrix([0], [0], 1, 6)  # read a book by A
    top = top_k_excluding(model.score(reader_of_0), reader_of_0, 5)[1][0].numpy()
    assert top[0] == 2  # the other book by A, although nobody read it in training
    assert list(top[1:3]) == [3, 1]  # then by training popularity
    # Scored on candidates only (a cold-book protocol): same author, then a seeded order of the unread.
    candidates = np.array([4, 5, 2])
    scores = model.score(reader_of_0, candidates)
    assert scores.shape == (1, 3) and int(np.argmax(scores[0])) == 2
    np.testing.assert_array_equal(SameAuthor(authors, seed=0).fit(train).score(reader_of_0, candidates), scores)
    # An unknown author matches nobody, also a reader of an unknown-author book.
    reader_of_4 = interaction_matrix([0], [4], 1, 6)
    assert model.score(reader_of_4).max() < 6


def test_knn_and_rp3beta_grids_equal_separate_fits() -> None:
    train = planted()
    knn = [{"shrink": sh, "neighbours": n} for sh in (0.0, 10.0) for n in (3, 50)]
    for setting, model in zip(knn, ItemKNN.grid(train, knn), strict=True):
        expected = ItemKNN(**setting).fit(train).sim.toarray()
        np.testing.assert_array_equal(model.sim.toarray(), expected)
        assert (model.neighbours, model.shrink) == (setting["neighbours"], setting["shrink"])
    rp3 = [{"alpha": a, "beta": b, "neighbours": n} for a in (0.5, 1.0) for b in (0.0, 0.5) for n in (3, 50)]
    for setting, model in zip(rp3, RP3beta.grid(train, rp3, max_entries=16), strict=True):
        expected = RP3beta(**setting).fit(train).weights.toarray()
        np.testing.assert_allclose(model.weights.toarray(), expected, rtol=1e-6)
        assert model.name == RP3beta(**setting).name
