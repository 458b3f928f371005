"""Similar books and the reasons of recommendations, on the ``tiny_run`` fixture's real model:
the engine's ``similar`` answers for catalog and new books, the refusal of an unknown ISBN, the
fusion's sources, the "because you read" books of a recommendation, and the evaluation protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from handlers.engine import BookrecEngine
from model import layout
from model.artifacts import ModelFolder
from model.ranker import SOURCES
from model.similar import SOURCES as SIMILAR_SOURCES
from model.similar import SimilarIndex, SimilarSettings, fuse, new_book_vectors
from model.text import book_text
from tests.conftest import NEW_BOOK


@pytest.fixture(scope="module")
def engine(tiny_run: Path) -> BookrecEngine:
    return BookrecEngine(tiny_run)


def _most_read(engine: BookrecEngine) -> str:
    counts = np.bincount(engine.catalog.rated_books, minlength=len(engine.catalog.books))
    return engine._isbn[int(counts.argmax())]


def test_similar_catalog_book_comes_from_its_graph_row_vectors_and_author(engine: BookrecEngine) -> None:
    isbn = _most_read(engine)
    row = engine.catalog.book_index[isbn]
    ((status, body),) = engine.run([{"action": "similar", "book": isbn.lower(), "k": 8}])
    assert status == 200 and body["action"] == "similar"
    assert body["book"]["isbn"] == isbn and body["book"]["known"] is True
    items = body["similar"]
    assert len(items) == 8 and [i["rank"] for i in items] == list(range(1, 9))
    assert isbn not in [i["isbn"] for i in items]  # never its own answer
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    graph = engine.similar.graph
    neighbours = set(graph[row].indices[graph[row].data > 0].tolist())
    code = engine.similar.authors.author[row]
    for item in items:
        assert item["sources"] and set(item["sources"]) <= set(SIMILAR_SOURCES)
        other = engine.catalog.book_index[item["isbn"]]
        if "graph" in item["sources"]:
            assert other in neighbours, item
        if "author" in item["sources"]:
            assert engine.similar.authors.author[other] == code >= 0, item
    # the most read book has co-readers: its graph row is used
    assert any("graph" in i["sources"] for i in items)


def test_similar_scores_are_the_documented_rank_fusion(engine: BookrecEngine) -> None:
    """score = sum over listing sources of weight / (offset + rank in that source), rank from 1."""
    rows = np.array([engine.catalog.book_index[_most_read(engine)]])
    index = engine.similar
    found = index.of_books(rows, 5)
    vectors = index.vectors[rows].float()
    parts = index.sources(vectors, rows, index.authors.author[rows], rows)
    s = index.settings
    for n, col in enumerate(found.rows[0].tolist()):
        expected = 0.0
        for weight, part, listed in zip(s.weights(), parts, found.sources[0, n], strict=True):
            at = np.flatnonzero(part[0] == col)
            assert listed == (len(at) == 1)
            if len(at):
                expected += weight / (s.offset + 1 + at[0])
        assert found.score[0, n] == pytest.approx(expected, rel=1e-5)


def test_fusion_ranks_ties_by_row_and_pads_short_lists() -> None:
    """Equal fused scores go to the lower catalog row; a query with fewer listed books than k is
    padded with row -1, score 0 and no source; a book listed by two sources sums both."""
    settings = SimilarSettings(towers=1.0, graph=1.0, author=0.0, popular=0.0, offset=0.0)
    towers = np.array([[5, 3, -1], [7, -1, -1]])
    graph = np.array([[3, 9, -1], [-1, -1, -1]])
    found = fuse((towers, graph, np.full((2, 0), -1), np.full((2, 0), -1)), settings, 4)
    # query 0: 3 = 1/2 + 1/1, 5 = 1/1, 9 = 1/2; query 1: 7 alone, then padding
    assert found.rows.tolist() == [[3, 5, 9, -1], [7, -1, -1, -1]]
    assert found.score[0].tolist() == pytest.approx([1.5, 1.0, 0.5, 0.0])
    assert found.sources[0, 0, :2].tolist() == [True, True] and not found.sources[1, 1:].any()
    tied = fuse((np.array([[8], [2]]), np.array([[4], [-1]]), np.full((2, 0), -1), np.full((2, 0), -1)), settings, 2)
    assert tied.rows.tolist() == [[4, 8], [2, -1]]  # 4 and 8 both score 1/1: the lower row first


def test_similar_towers_source_is_the_recommenders_search(engine: BookrecEngine) -> None:
    """The catalog's similar books take their nearest vectors from the recommender's own search (its
    index where it has one) rather than a second pass over every book; the lists equal an exact
    pass over the same vectors, the query itself left out."""
    index = engine.similar
    assert index.nearest is not None and index.vectors is engine.recommender.book_vectors
    rows = np.arange(min(40, index.n_books))
    vectors = index.vectors[rows].float()
    shipped = index.towers_rows(vectors, rows)
    exact = SimilarIndex(index.vectors.float(), None, index.authors, index.settings).towers_rows(vectors, rows)
    assert (shipped[:, :10] == exact[:, :10]).all()
    assert not (shipped == rows[:, None]).any()


def test_similar_new_book_is_answered_from_its_text(engine: BookrecEngine, tiny_run: Path) -> None:
    """A book outside the catalog, given as a rate request gives one: its vector from its text, and
    the books of its author, which the catalog knows."""
    books = engine.catalog.books
    twin = books[books["isbn"] == NEW_BOOK].iloc[0]  # a catalog book nobody read: the same metadata
    new = {"title": twin["title"], "author": twin["author"], "year": int(twin["year"]), "publisher": twin["publisher"]}
    ((status, body),) = engine.run([{"action": "similar", "book": new, "k": 10}])
    assert status == 200 and body["book"] == {
        "isbn": None,
        "title": new["title"],
        "author": new["author"],
        "known": False,
    }
    items = body["similar"]
    assert len(items) == 10
    assert all("graph" not in i["sources"] for i in items)  # nobody read it
    code = engine.similar.authors.author[engine.catalog.book_index[NEW_BOOK]]
    by_author = [i for i in items if "author" in i["sources"]]
    assert by_author and all(
        engine.similar.authors.author[engine.catalog.book_index[i["isbn"]]] == code for i in by_author
    )
    # The catalog twin is embedded the same way (no id, same text, author and publisher), so it is
    # the nearest book vector of the new book.
    emb = torch.from_numpy(engine.encoder.embed([book_text(*new.values())]))
    feats = engine.catalog.new_book_features(emb, [new["author"]], [new["publisher"]])
    vector = new_book_vectors(engine.recommender.towers, engine.catalog, feats, [new["author"]], [new["publisher"]])
    nearest = engine.similar.towers_rows(vector, np.array([-1]))[0, 0]
    assert nearest == engine.catalog.book_index[NEW_BOOK]


def test_unknown_isbn_is_refused_naming_it(engine: BookrecEngine) -> None:
    ((status, body),) = engine.run([{"action": "similar", "book": " 12345x ", "k": 5}])
    assert status == 404
    assert body["error"]["field"] == "book" and "12345X" in body["error"]["message"]


def test_recommendations_name_their_sources_and_the_books_behind_them(engine: BookrecEngine) -> None:
    catalog = engine.catalog
    users = catalog.users["user_id"].tolist()[:60]
    answers = engine.run([{"action": "recommend", "user": {"user_id": u}, "k": 10} for u in users])
    seen = {"graph": 0, "author": 0}
    for user, (status, body) in zip(users, answers, strict=True):
        assert status == 200
        history = set(catalog.rated_by(catalog.user_index[user]).tolist())
        for item in body["recommendations"]:
            assert item["sources"] and set(item["sources"]) <= set(SOURCES)
            book = catalog.book_index[item["isbn"]]
            because = item["because"]
            assert set(because) <= {"graph", "author"}
            if "graph" in item["sources"]:
                seen["graph"] += 1
                read = catalog.book_index[because["graph"]]
                assert read in history  # really read by this reader
                # the largest contribution: the history book with the largest graph weight to it
                weights = engine.similar.graph[:, book].toarray().ravel()
                assert weights[read] == max(weights[list(history)]) > 0
            else:
                assert "graph" not in because
            if "author" in item["sources"]:
                seen["author"] += 1
                code = engine.similar.authors.author[book]
                assert because["author"]
                for isbn in because["author"]:
                    assert catalog.book_index[isbn] in history
                    assert engine.similar.authors.author[catalog.book_index[isbn]] == code
            else:
                assert "author" not in because
    assert seen["graph"] and seen["author"]


def test_new_readers_reasons_come_from_the_ratings_they_sent(engine: BookrecEngine) -> None:
    isbn = _most_read(engine)
    user = {"country": "portugal", "ratings": [{"isbn": isbn, "rating": 9}]}
    ((status, body),) = engine.run([{"action": "recommend", "user": user, "k": 10}])
    assert status == 200
    graph = [i for i in body["recommendations"] if "graph" in i["sources"]]
    assert graph and all(i["because"]["graph"] == isbn for i in graph)


def test_similar_evaluation_protocol_tunes_on_validation(tiny_run: Path) -> None:
    from train.config import load_config
    from train.evaluation.similar import FUSED, evaluate_similar, pairs, similar_markdown
    from train.evaluation.topk import training_matrix

    loaded = ModelFolder(tiny_run).load()
    ratings = pd.read_parquet(tiny_run / layout.DATA_DIR / layout.DATA_RATINGS)
    test = pairs(loaded.catalog, ratings, "test", 0)
    assert len(test) and (test.query != test.held_out).all()
    test_users = ratings[ratings["split"] == "test"]
    isbns = loaded.catalog.books["isbn"].to_numpy()
    for q, h in zip(test.query[:20], test.held_out[:20], strict=True):
        readers = set(test_users.loc[test_users["isbn"] == isbns[q], "user_id"])
        assert readers & set(test_users.loc[test_users["isbn"] == isbns[h], "user_id"])
    cfg = load_config(tiny_run / "config.yaml")
    report = evaluate_similar(
        loaded.similar_index(), training_matrix(loaded.catalog), loaded.catalog, ratings, cfg.eval.topk_tuning, 0
    )
    results = report["results"]
    assert {FUSED, "most read books"} <= set(results)
    assert any(name.startswith("item-kNN item-item") for name in results)
    assert any(name.startswith("RP3β item-item") for name in results)
    assert all(0 <= r["test_recall@10"] <= 1 for r in results.values())
    best = max(report["fusion_grid"], key=lambda r: r["val_recall@10"])
    assert results[FUSED]["val_recall@10"] == best["val_recall@10"]
    assert SimilarSettings(**results[FUSED]["params"])
    assert "| similar: fused" in similar_markdown(report)
