"""The ranking stage: the item graph, the author source, merged candidates and the learned ranker."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model import layout
from model.artifacts import ModelFolder
from model.candidates import AuthorIndex, ItemGraph, RankedRows, history_matrix
from model.ranker import FEATURES, merge
from train.config import ConfigError, load_config
from train.ranking.graph import rp3beta_graph


def test_ranked_rows_top_and_lookup() -> None:
    m = sp.csr_matrix(np.array([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.0]], np.float32))
    ranked = RankedRows.of(m)
    assert ranked.top(2).tolist() == [[1, 3], [-1, -1], [0, 3]]
    score, rank = ranked.lookup(np.array([0, 0, 1, 2, 2]), np.array([2, 0, 3, 3, -1]))
    assert score.tolist() == [1.0, 0.0, 0.0, 4.0, 0.0]
    assert rank.tolist() == [2, -1, -1, 1, -1]


def test_ranked_rows_head_and_stack() -> None:
    m = sp.csr_matrix(np.array([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.0]], np.float32))
    ranked = RankedRows.of(m)
    assert ranked.head(None) is ranked
    head = ranked.head(2)
    assert head.matrix.toarray().tolist() == [[0, 3, 0, 2], [0, 0, 0, 0], [5, 0, 0, 4]]
    assert head.rank.tolist() == [0, 1, 0, 1]
    assert head.top(3).tolist() == [[1, 3, -1], [-1, -1, -1], [0, 3, -1]]
    both = RankedRows.stack([head, RankedRows.of(m[:1])], 4)
    assert both.matrix.shape == (4, 4) and both.rank.tolist() == [0, 1, 0, 1, 0, 2, 1]
    assert both.top(3).tolist() == [*head.top(3).tolist(), [1, 3, 2]]
    assert RankedRows.stack([], 4).matrix.shape == (0, 4)


def test_rp3beta_graph_matches_the_dense_formula() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((30, 12)) < 0.3).astype(np.float32)
    x[0, :] = 1.0  # one heavy reader
    alpha, beta = 0.8, 0.4
    du, di = x.sum(1), x.sum(0)
    p_ui = np.where(du[:, None] > 0, x / np.maximum(du, 1)[:, None], 0) ** alpha
    p_iu = np.where(di[:, None] > 0, x.T / np.maximum(di, 1)[:, None], 0) ** alpha
    w = (p_iu @ p_ui) * np.where(di > 0, np.maximum(di, 1) ** -beta, 0)[None, :]
    np.fill_diagonal(w, 0)
    # Small blocks, so several of them are built and stacked.
    graph = rp3beta_graph(sp.csr_matrix(x), alpha, beta, neighbours=12, max_entries=40)
    np.testing.assert_allclose(graph.weights.toarray(), w, rtol=1e-5, atol=1e-7)
    kept = rp3beta_graph(sp.csr_matrix(x), alpha, beta, neighbours=3).weights.toarray()
    assert ((kept > 0).sum(1) <= 3).all()
    for i in range(12):  # the kept ones are each row's largest
        assert kept[i][kept[i] > 0].min(initial=np.inf) >= np.sort(w[i])[-3] - 1e-7


def test_history_times_graph_sums_neighbour_rows(tmp_path: Path) -> None:
    w = sp.csr_matrix(np.array([[0, 1, 0], [2, 0, 3], [0, 4, 0]], np.float32))
    graph = ItemGraph(w)
    graph.save(tmp_path / "g.npz")
    loaded = ItemGraph.load(tmp_path / "g.npz")
    scores = loaded.scores(history_matrix([np.array([0, 2, 2]), np.array([], np.int64)], 3)).toarray()
    assert scores.tolist() == [[0, 5, 0], [0, 0, 0]]


def test_author_source_orders_the_readers_authors_by_popularity() -> None:
    authors = AuthorIndex(
        author=np.array([0, 0, 0, 1, -1]),
        publisher=np.array([0, 1, 1, -1, 0]),
        popularity=np.array([5, 1, 9, 3, 100]),
        per_author=2,
    )
    counts, pubs = authors.counts(history_matrix([np.array([1]), np.array([3, 4])], 5))
    assert counts.toarray().tolist() == [[1, 0], [0, 1]]
    assert pubs.toarray().tolist() == [[0, 1], [1, 0]]
    top = RankedRows.of(authors.scores(counts)).top(3)
    # Author 0's two most read books (per_author = 2), most read first; book 4 has no author.
    assert top.tolist() == [[2, 0, -1], [3, -1, -1]]


def test_merge_is_the_union_per_row() -> None:
    a = torch.tensor([[3, 1, -1], [0, 2, 4]])
    b = torch.tensor([[1, 5], [-1, -1]])
    merged = merge(a, b)
    assert [sorted(r[r >= 0].tolist()) for r in merged] == [[1, 3, 5], [0, 2, 4]]
    assert merged.shape[1] == 3


def test_ranking_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"ranking\.stop_frac"):
        load_config(None, ["ranking.stop_frac=0.6", "ranking.report_frac=0.5"])
    with pytest.raises(ConfigError, match=r"ranking\.graph_neighbours"):
        load_config(None, ["ranking.graph_neighbours=0"])
    with pytest.raises(ConfigError, match=r"ranking\.prune_amount"):
        load_config(None, ["ranking.prune_amount=1.0"])
    with pytest.raises(ConfigError, match=r"ranking\.popularity_penalties"):
        load_config(None, ["ranking.popularity_penalties=[0.1, -0.1]"])


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return ModelFolder(tiny_run).load()


def test_the_run_ships_a_ranking_stage(tiny_run: Path, loaded, tiny_store: Path) -> None:
    meta = json.loads((tiny_run / layout.RANKING_REPORT).read_text())
    assert {"towers", "ranker", "recall_by_source", "enabled"} <= set(meta)
    assert ModelFolder(tiny_run).has_ranking()
    assert ModelFolder(tiny_run).ranking_settings().enabled == meta["enabled"]
    if meta["enabled"]:
        assert loaded.recommender.ranking is not None
    with zipfile.ZipFile(tiny_store / "bookrec.mar") as zf:
        shipped = set(zf.namelist())
    assert {*layout.RANKING_FILES, layout.RETRIEVAL_SETTINGS} <= shipped
    assert not {layout.RANKING_REPORT, layout.RETRIEVAL_REPORT} & shipped  # reports stay in the run folder
    # The shipped file is the variant compression chose: its widths, its int8 weights, its penalty.
    compression = meta["compression"]
    choice = compression["shipped"]["from"]
    assert set(compression["variants"]) == {"fp32", "pruned", "int8"}
    assert compression["variants"]["pruned"]["shape"][1] < compression["variants"]["fp32"]["shape"][1]
    state = torch.jit.load(str(tiny_run / layout.RANKER_FILE)).state_dict()
    first = state["net.0.weight_q"] if choice == "int8" else state["net.0.weight"]
    assert first.shape[0] == compression["variants"][choice]["shape"][1]
    assert (first.dtype == torch.int8) == (choice == "int8")
    assert float(state["penalty"]) == pytest.approx(compression["shipped"]["penalty"])
    assert compression["shipped"]["penalty"] in {0.0, *load_config(None).ranking.popularity_penalties}


def _ranked(tiny_run: Path):
    """The tiny run's recommender with the ranking stage on, whatever validation chose."""
    folder = ModelFolder(tiny_run)
    loaded = folder.load()
    rec = loaded.recommender
    if rec.ranking is None:
        rec.ranking = folder.ranking_stage(loaded.catalog)
    return loaded, rec


def test_ranked_lists_are_the_rankers_order_and_block_invariant(tiny_run: Path) -> None:
    loaded, rec = _ranked(tiny_run)
    catalog = loaded.catalog
    users = np.arange(12)
    feats = catalog.user_feats[torch.from_numpy(users)]
    history = [catalog.rated_by(int(u)) for u in users]
    together = rec.recommend(feats, history, 10, history)
    for i in range(len(users)):
        alone = rec.recommend(feats[i : i + 1], history[i : i + 1], 10, history[i : i + 1])
        assert alone.rows[0].tolist() == together.rows[i].tolist()
        torch.testing.assert_close(alone.relevance[0], together.relevance[i])
        assert not set(together.rows[i].tolist()) & set(history[i].tolist())  # read books left out
    cands = rec.merged_candidates(feats, history, history)
    assert cands.features.shape[-1] == len(FEATURES)
    # relevance is the shipped ranker's score of the pair; score the rating MLP's prediction.
    scored = rec.ranking.score(cands.features).masked_fill(cands.rows < 0, -np.inf)
    best = scored.max(1).values
    torch.testing.assert_close(together.relevance[:, 0], best)
    rating = rec.scorer.rate_rows(rec.scorer.project_users(feats), together.rows.clamp_min(0))
    torch.testing.assert_close(together.rating, rating)


def test_graph_candidates_of_a_new_reader_come_from_their_rated_books(tiny_run: Path) -> None:
    _, rec = _ranked(tiny_run)
    graph = rec.ranking.graph.weights
    book = int(np.argmax(np.diff(graph.indptr)))  # the book with the most neighbours
    neighbours = set(graph.indices[graph.indptr[book] : graph.indptr[book + 1]].tolist())
    scores = rec.ranking.sources([np.array([book])], [np.array([book])])
    found = scores.graph.top(rec.ranking.settings.graph_candidates)[0]
    assert set(found[found >= 0].tolist()) <= neighbours and book not in found
    assert len(found[found >= 0]) == min(len(neighbours - {book}), rec.ranking.settings.graph_candidates)


def test_a_subset_book_set_recommends_inside_it(tiny_run: Path) -> None:
    loaded, rec = _ranked(tiny_run)
    rows = np.arange(0, rec.n_books, 3)
    sub = rec.subset(rows)
    catalog = loaded.catalog
    history = [catalog.rated_by(u) for u in range(5)]
    recs = sub.recommend(catalog.user_feats[:5], history, 5)
    assert 0 <= recs.rows.min() and recs.rows.max() < len(rows)
    # The graph source offers the books of the set the whole catalog's graph scores for the reader.
    n = sub.ranking.settings.graph_candidates
    mine = sub.ranking.sources(history, None).graph.top(n)
    whole = rec.ranking.sources(history, None).graph.matrix
    inside = set(rows.tolist())
    for i in range(5):
        scored = set(whole.indices[whole.indptr[i] : whole.indptr[i + 1]].tolist()) & inside
        offered = set(mine[i][mine[i] >= 0].tolist())
        assert offered <= scored
        assert len(offered) == min(len(scored), n)


def test_disabled_ranking_keeps_the_towers_path(tiny_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    settings = json.loads((copy / layout.RANKING_SETTINGS).read_text())
    (copy / layout.RANKING_SETTINGS).write_text(json.dumps({**settings, "enabled": False}))
    rec = ModelFolder(copy).load().recommender
    assert rec.ranking is None
    catalog = ModelFolder(copy).load_catalog()
    history = [catalog.rated_by(u) for u in range(4)]
    recs = rec.recommend(catalog.user_feats[:4], history, 5, history)
    # The towers' top-N reranked by the blend chosen on validation, as before the ranking stage.
    n = max(5, rec.settings.candidates) if rec.settings.blend else 5
    towers = rec.rerank(rec.candidates(catalog.user_feats[:4], history, history, n), 5)
    assert recs.rows.tolist() == towers.rows.tolist()
    torch.testing.assert_close(recs.relevance, towers.relevance)


def test_the_graph_grid_refits_per_setting_and_tables_it(tiny_run: Path, tmp_path: Path) -> None:
    from train.ranking.grid import main

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    main(
        [
            "--config",
            str(copy / "config.yaml"),
            "--run-dir",
            str(copy),
            "--alpha",
            "0.5",
            "1",
            "--beta",
            "0",
            "--neighbours",
            "2",
            "--set",
            "ranking.latency_repeats=2",
        ]
    )
    rows = json.loads((copy / "ranking_grid.json").read_text())
    assert [(r["alpha"], r["neighbours"]) for r in rows] == [(0.5, 2), (1.0, 2)]
    # Two neighbours per book: the graph holds at most 2 edges per book.
    n_books = len(ModelFolder(copy).load_catalog().books)
    for r in rows:
        assert 0 < r["graph_edges"] <= 2 * n_books
        assert 0 <= r["stop_recall@10"] <= 1
    meta = json.loads((copy / layout.RANKING_REPORT).read_text())
    assert meta["graph_edges"] == rows[-1]["graph_edges"]
