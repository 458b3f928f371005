"""The retrieval towers and the recommender: training, history sampling, new books."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import layout
from model.artifacts import IncompleteModelFolder, ModelFolder
from model.catalog import Catalog
from model.checkpoint import load_scripted
from model.layout import RETRIEVAL_REPORT, RETRIEVAL_SETTINGS
from model.recommend import Recommender, RetrievalSettings
from tests.conftest import NEW_BOOK
from train.config import RetrievalConfig
from train.data.tables import load_tables
from train.rating.dataset import build_training_data
from train.retrieval.step import (
    Interactions,
    catalog_book_vectors,
    fit_retrieval,
    new_retrieval_model,
    sample_history,
    training_interactions,
)


def _interactions(lengths: list[int]) -> Interactions:
    users = np.repeat(np.arange(len(lengths)), lengths)
    books = np.arange(len(users)) + 100  # every interaction its own book, so positions are visible
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return Interactions(indptr, books, users, np.zeros_like(users), np.zeros_like(users))


def test_sample_history_leaves_out_the_target_and_takes_all_when_they_fit() -> None:
    inter = _interactions([1, 3, 50])
    rng = np.random.default_rng(0)
    pairs = np.array([0, 1, 2, 3, 4, 30])  # user 0 alone, every pair of user 1, one of user 2
    rows, offsets = sample_history(inter, pairs, max_items=8, rng=rng)
    bags = np.split(rows.numpy(), offsets.numpy()[1:])
    assert len(bags[0]) == 0  # a single read has no other history
    assert sorted(bags[1]) == [102, 103] and sorted(bags[2]) == [101, 103] and sorted(bags[3]) == [101, 102]
    assert len(bags[4]) == 8 and 100 + 4 not in bags[4] and all(104 <= b < 154 for b in bags[4])
    assert len(bags[5]) == 8 and 100 + 30 not in bags[5]


def test_training_interactions_include_implicit_reads(tiny_run: Path) -> None:
    catalog = Catalog.load(tiny_run)
    _, _, ratings = load_tables(tiny_run)
    data = build_training_data(catalog, ratings, 3, 42)
    inter = training_interactions(catalog, data)
    implicit_users, _ = catalog.implicit_rows()
    assert len(implicit_users) > 0  # the sample has implicit zeros
    assert len(inter.book) == len(data.splits["train"]) + len(implicit_users)
    assert np.all(np.diff(inter.user) >= 0)
    assert np.array_equal(inter.indptr, np.searchsorted(inter.user, np.arange(len(catalog.users) + 1)))


def test_retrieval_training_lowers_the_loss(tiny_run: Path) -> None:
    catalog = Catalog.load(tiny_run)
    _, _, ratings = load_tables(tiny_run)
    data = build_training_data(catalog, ratings, 3, 42)
    cfg = RetrievalConfig(dim=16, hidden=32, batch_size=256, epochs=4, patience=4, val_users=200)
    model = new_retrieval_model(catalog, cfg)
    result = fit_retrieval(model, catalog, data, cfg, progress=False)
    losses = [row["loss"] for row in result.epochs]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.05, losses
    assert model.id_known.sum() > 0 and not model.training


def test_shipped_book_vectors_are_the_towers_of_the_catalog(tiny_run: Path) -> None:
    catalog = Catalog.load(tiny_run)
    towers = load_scripted(tiny_run / "retrieval_scripted.pt")
    shipped = np.load(tiny_run / "book_vectors.npy")
    assert shipped.shape[0] == len(catalog.books)
    assert np.allclose(shipped, catalog_book_vectors(towers, catalog).numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(shipped, axis=1), 1.0, atol=1e-5)
    settings = json.loads((tiny_run / RETRIEVAL_SETTINGS).read_text())
    assert set(settings) == {"candidates", "blend", "precision"}
    assert settings["blend"] in RetrievalConfig().blend_grid and settings["candidates"] == RetrievalConfig().candidates
    report = json.loads((tiny_run / RETRIEVAL_REPORT).read_text())
    assert report["blend"] == settings["blend"] and report["epochs"] and "candidates" not in report


def test_a_folder_without_the_settings_files_names_them(tiny_run: Path, tmp_path: Path) -> None:
    """A run folder from before the settings had files of their own (settings inside the reports)."""
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old)
    for report, settings in ((RETRIEVAL_REPORT, RETRIEVAL_SETTINGS), (layout.RANKING_REPORT, layout.RANKING_SETTINGS)):
        merged = {**json.loads((old / settings).read_text()), **json.loads((old / report).read_text())}
        (old / report).write_text(json.dumps(merged))
        (old / settings).unlink()
    with pytest.raises(IncompleteModelFolder, match=f"missing {RETRIEVAL_SETTINGS}, {layout.RANKING_SETTINGS}$"):
        ModelFolder(old).check()


def test_an_unrated_book_is_in_the_catalog_and_reaches_a_top_k(tiny_run: Path) -> None:
    """A book of the books file that nobody rated (a new edition of a well-read book) is in the
    catalog with a vector from its text and metadata alone; among the new arrivals (the books nobody
    read in training, as the batch job's ``--books`` filter or the cold-book protocol rank them) it
    reaches readers' top-3."""
    catalog = Catalog.load(tiny_run)
    _, _, ratings = load_tables(tiny_run)
    assert NEW_BOOK not in set(ratings["isbn"])
    row = catalog.book_index[NEW_BOOK]
    recommender = ModelFolder(tiny_run).load().recommender
    assert not bool(recommender.towers.id_known[row])  # no id embedding: content alone
    assert torch.isfinite(recommender.book_vectors[row]).all()

    unread = np.flatnonzero(~recommender.towers.id_known.numpy())
    assert row in unread and len(unread) > 3
    arrivals = recommender.subset(unread)
    users = np.arange(len(catalog.users))
    history = [catalog.rated_by(int(u)) for u in users]
    recs = arrivals.recommend(catalog.user_feats, history, 3)
    position = int(np.flatnonzero(unread == row)[0])
    reached = int((recs.rows == position).any(dim=1).sum())
    assert reached >= len(users) // 10, f"the new edition is in only {reached} of {len(users)} top-3 lists"


def test_rerank_orders_by_retrieval_plus_blend_times_rating(tiny_run: Path) -> None:
    catalog = Catalog.load(tiny_run)
    base = ModelFolder(tiny_run).load().recommender
    scorer = base.scorer
    users = np.arange(20)
    history = [catalog.rated_by(int(u)) for u in users]
    cands = base.candidates(catalog.user_feats[users], history, history)
    for blend in (0.0, 1.0):
        recs = base.rerank(cands, 10, blend)
        expected = cands.retrieval + blend * cands.rating
        assert torch.all(recs.relevance[:, :-1] >= recs.relevance[:, 1:])
        top = torch.topk(expected, 10, dim=1).values
        assert torch.allclose(recs.relevance, top, atol=1e-5)
    # retrieval order alone: blend 0 keeps the candidates' own order
    assert torch.equal(base.rerank(cands, 10, 0.0).rows, cands.rows[:, :10])
    with pytest.raises(ValueError, match="book vectors"):
        Recommender(base.towers, base.book_vectors[:3], scorer, RetrievalSettings())


def test_candidates_in_book_slices_equal_one_pass(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrieval top-n scored in slices of the book set (bounded memory on large catalogs) is
    the top-n of one pass over every book, read books excluded in every slice."""
    import model.recommend as recommend

    catalog = Catalog.load(tiny_run)
    recommender = ModelFolder(tiny_run).load().recommender
    users = np.arange(20)
    history = [catalog.rated_by(int(u)) for u in users]
    one = recommender.candidates(catalog.user_feats[users], history, history, n=15)
    monkeypatch.setattr(recommend, "LOGIT_BLOCK", 20 * 15)  # slices of 15 books
    sliced = recommender.candidates(catalog.user_feats[users], history, history, n=15)
    assert torch.allclose(sliced.retrieval, one.retrieval, atol=1e-5)
    assert torch.equal(sliced.rows, one.rows)
    for rows, read in zip(sliced.rows.numpy(), history, strict=True):
        assert not set(rows) & set(read)
    # the reference: every logit at once, read books at -inf
    logits = recommender.user_vectors(catalog.user_feats[users], history) @ recommender.book_vectors.float().t()
    for n, read in enumerate(history):
        logits[n, torch.from_numpy(read)] = -float("inf")
    assert torch.allclose(sliced.retrieval, torch.topk(logits / recommender.temperature, 15, dim=1).values, atol=1e-4)


def test_bf16_retrieval_keeps_the_fp32_lists(tiny_run: Path) -> None:
    """The bf16 pass with its fp32 rescore returns the fp32 top-k of the same (rounded) vectors, and
    almost exactly the full-precision lists; unknown precisions are refused."""
    import dataclasses

    base = ModelFolder(tiny_run).load().recommender
    catalog = ModelFolder(tiny_run).load_catalog()
    vectors = ModelFolder(tiny_run).book_vectors()

    def variant(precision: str, vecs: torch.Tensor) -> Recommender:
        settings = dataclasses.replace(base.settings, precision=precision)
        return Recommender(base.towers, vecs, base.scorer, settings)

    low, exact = variant("bf16", vectors), variant("fp32", vectors)
    rounded = variant("fp32", vectors.bfloat16().float())
    assert low.book_vectors.dtype == torch.bfloat16 and exact.book_vectors.dtype == torch.float32
    users = np.arange(len(catalog.users))
    history = [catalog.rated_by(int(u)) for u in users]
    got = low.recommend(catalog.user_feats, history, 10, history)
    same = rounded.recommend(catalog.user_feats, history, 10, history)
    assert torch.equal(got.rows, same.rows)
    assert torch.allclose(got.relevance, same.relevance, atol=1e-4)
    full = exact.recommend(catalog.user_feats, history, 10, history).rows
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.rows.tolist(), full.tolist(), strict=True)])
    assert overlap >= 0.95, overlap
    with pytest.raises(ValueError, match="precision"):
        variant("fp8", vectors)
