"""The book index (``model/book_index.py``): built by the retrieval step at or above its threshold,
recorded in the manifest, shipped in the ``.mar``, and giving the exhaustive search's lists where its
recall must be exact (a catalog smaller than efSearch). Read books never come back, also when a
reader read more of the candidates than the index's margin holds.

Every case works on copies of the session's tiny run (200 books, below the default threshold, so
the run itself has no index and searches exhaustively).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batch.model_source import ModelError, resolve
from handlers.engine import BookrecEngine
from model import layout
from model.artifacts import CorruptModelFolder, ModelFolder, ModelFolderError
from model.book_index import BookIndex, IndexSettings
from model.recommend import Recommender
from serving import archive
from tests.conftest import REPO
from tests.test_manifest import DAMAGE, damage, model_copy
from train.config import IndexConfig
from train.retrieval.step import save_book_index

# efSearch above the tiny catalog's 200 books: the HNSW search visits every book, so it is exact.
EXACT = IndexConfig(threshold=1, ef_search=512, margin=16)


@pytest.fixture(scope="module")
def indexed_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with the retrieval step's index (threshold 1) and a fresh manifest."""
    run = model_copy(tiny_run, tmp_path_factory.mktemp("indexed") / "run")
    index, _ = save_book_index(run, ModelFolder(run).book_vectors(), EXACT)
    assert index is not None and index.n_books == len(ModelFolder(run).book_vectors())
    ModelFolder(run).write_manifest()
    return run


def readers(folder: ModelFolder) -> tuple[torch.Tensor, list[np.ndarray]]:
    catalog = folder.load_catalog()
    return catalog.user_feats, [catalog.rated_by(u) for u in range(len(catalog.users))]


def in_fp32(folder: ModelFolder, *, index: bool) -> Recommender:
    """The recommender in fp32, with its index or without it (exhaustive). In bf16 the exhaustive
    search orders by the bf16-rounded vectors and the index proposes by the stored fp32 ones: the
    tiny model's logits are so close that the two orders differ by dozens of places there, so lists
    are compared in fp32, where both are the exact order."""
    rec = folder.load().recommender
    settings = dataclasses.replace(rec.settings, precision="fp32")
    found = rec.index if index else None
    return Recommender(rec.towers, folder.book_vectors(), rec.scorer, settings, rec.ranking, found)


def test_config_defaults_are_the_index_settings_defaults() -> None:
    settings = IndexSettings()
    assert {f: getattr(IndexConfig(), f) for f in IndexConfig.model_fields} == {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "kind"
    }


def test_below_the_threshold_no_index_and_the_exhaustive_path(tiny_run: Path, tmp_path: Path) -> None:
    """The tiny run (200 books, default threshold) has no index; a step rerun below the threshold
    removes the index an earlier run left."""
    folder = ModelFolder(tiny_run)
    assert len(folder.book_vectors()) < IndexSettings.threshold
    assert not folder.has_index() and folder.read_manifest()["stages"]["index"] is None
    assert folder.load().recommender.index is None

    run = model_copy(tiny_run, tmp_path / "run")
    vectors = ModelFolder(run).book_vectors()
    assert save_book_index(run, vectors, EXACT)[0] is not None and ModelFolder(run).has_index()
    index, _ = save_book_index(run, vectors, IndexConfig(threshold=len(vectors) + 1))
    assert index is None and not any((run / name).exists() for name in layout.INDEX_FILES)


def test_the_retrieval_step_builds_the_index_at_the_threshold(tiny_run: Path, tmp_path: Path) -> None:
    """``python -m train retrieval`` on a copy of the tiny run with the threshold at its catalog size:
    the index is written, recorded in the refreshed manifest and the step's report, and verifies."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    n_books = len(ModelFolder(run).book_vectors())
    overrides = [f"run_dir={run}", f"retrieval.index.threshold={n_books}", "retrieval.index.ef_search=512"]
    cmd = [sys.executable, "-m", "train", "retrieval", "--config", str(tiny_run.parent / "tiny.yaml"), "--quiet"]
    proc = subprocess.run(
        [*cmd, *(x for o in overrides for x in ("--set", o))], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = ModelFolder(run)
    assert folder.has_index() and folder.read_manifest()["stages"]["index"] == "hnsw"
    folder.verify(serving=True)
    assert folder.read_json(layout.RETRIEVAL_REPORT)["index"]["kind"] == "hnsw"
    index = folder.book_index()
    assert (index.n_books, index.settings.threshold, index.settings.ef_search) == (n_books, n_books, 512)


def test_the_index_lists_equal_the_exhaustive_lists(indexed_run: Path) -> None:
    """Towers' candidates (several n) and the ranked top-k, read books excluded, are the same books
    in the same order with the index and without it."""
    folder = ModelFolder(indexed_run)
    rec, exhaustive = in_fp32(folder, index=True), in_fp32(folder, index=False)
    assert rec.index is not None and rec.index.settings.ef_search >= rec.n_books
    feats, history = readers(folder)
    for n in (10, 50, rec.settings.candidates):
        a = rec.candidates(feats, history, history, n)
        b = exhaustive.candidates(feats, history, history, n)
        assert torch.equal(a.rows, b.rows), f"n={n}"
        torch.testing.assert_close(a.retrieval, b.retrieval)
    assert torch.equal(
        rec.recommend(feats, history, 10, history).rows, exhaustive.recommend(feats, history, 10, history).rows
    )


def test_similar_books_through_the_index_equal_the_exhaustive_ones(indexed_run: Path) -> None:
    """The ``similar`` action's towers source searches the recommender's index: every catalog book's
    similar books (the book itself never among them) equal an exact pass over the same vectors."""
    folder = ModelFolder(indexed_run)
    rec, exhaustive = in_fp32(folder, index=True), in_fp32(folder, index=False)
    rows = np.arange(rec.n_books)
    own = [np.array([r]) for r in rows]
    vectors = rec.book_vectors[torch.from_numpy(rows)]
    assert rec.index is not None
    searched = []
    search = rec.index.search

    def counted(queries, *rest):  # the real search, counted: the lists must come from the index
        searched.append(len(queries))
        return search(queries, *rest)

    rec.index.search = counted
    through_index = rec.nearest_books(vectors, own, 20)
    assert searched == [rec.n_books] and not (through_index == rows[:, None]).any()
    np.testing.assert_array_equal(through_index, exhaustive.nearest_books(vectors, own, 20))


def test_read_books_never_come_back_even_past_the_margin(indexed_run: Path) -> None:
    """Readers who read the towers' whole top 60 (more than the margin of 16 holds) get the
    exhaustive search for their block: none of their read books, and the exhaustive lists."""
    folder = ModelFolder(indexed_run)
    rec, exhaustive = in_fp32(folder, index=True), in_fp32(folder, index=False)
    feats, history = readers(folder)
    top60 = exhaustive.candidates(feats, history, None, 60).rows.numpy()
    # Half the readers read their top 60 as well; the others keep their own history only.
    read = [np.union1d(h, top60[i]) if i % 2 else np.asarray(h) for i, h in enumerate(history)]
    got = rec.candidates(feats, history, read, 30)
    for rows, excluded in zip(got.rows.numpy(), read, strict=True):
        assert not np.isin(rows, excluded).any()
    assert torch.equal(got.rows, exhaustive.candidates(feats, history, read, 30).rows)


def test_the_manifest_records_the_index_and_refuses_a_damaged_one(indexed_run: Path, tmp_path: Path) -> None:
    record = ModelFolder(indexed_run).read_manifest()
    assert record["stages"]["index"] == "hnsw"
    assert set(layout.INDEX_FILES) <= set(record["files"])
    ModelFolder(indexed_run).verify(serving=True)
    for name in layout.INDEX_FILES:
        for how in DAMAGE:
            run = model_copy(indexed_run, tmp_path / f"{how}-{name}")
            damage(run / name, how)
            with pytest.raises(ModelFolderError, match=name):  # missing: incomplete; else corrupt
                ModelFolder(run).verify()
            with pytest.raises(ModelError, match=name):
                resolve(str(run))


def test_an_index_the_model_was_not_made_with_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    """An index dropped into a folder after its manifest was written is not loaded silently."""
    run = model_copy(tiny_run, tmp_path / "run")
    save_book_index(run, ModelFolder(run).book_vectors(), EXACT)
    with pytest.raises(CorruptModelFolder, match=f"{layout.BOOK_INDEX}: not in {layout.MANIFEST_FILE}"):
        ModelFolder(run).verify()


def test_the_index_ships_in_the_mar_and_the_batch_job_and_engine_load_it(indexed_run: Path, tmp_path: Path) -> None:
    mar = archive.build_archive(indexed_run, tmp_path / "store", workers=1)
    folder = ModelFolder(resolve(str(mar)))  # the batch job's model source: unpacked and verified
    assert folder.has_index() and folder.read_manifest()["stages"]["index"] == "hnsw"
    loaded = folder.load()
    assert loaded.recommender.index is not None
    feats, history = readers(folder)
    expected = ModelFolder(indexed_run).load().recommender.recommend(feats, history, 10, history)
    assert torch.equal(loaded.recommender.recommend(feats, history, 10, history).rows, expected.rows)

    unpacked = tmp_path / "unpacked"  # as TorchServe unpacks it for the handler
    shutil.unpack_archive(mar, unpacked, format="zip")
    engine = BookrecEngine(unpacked)
    assert engine.model.recommender.index is not None
    got = engine.model.recommender.recommend(feats, history, 10, history)
    assert torch.equal(got.rows, expected.rows)


def test_set_threads_sets_torch_and_faiss_alike(indexed_run: Path) -> None:
    """One call sets both OpenMP pools (torch's and faiss's own libgomp) of the calling thread, and a
    search in a new thread runs faiss on as many threads as torch has there; both keep working in
    one process."""
    script = f"""
import threading, faiss, numpy as np, torch
from model.book_index import BookIndex, set_threads
set_threads(1)
assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
index = BookIndex.load({str(indexed_run / layout.BOOK_INDEX)!r}, {str(indexed_run / layout.BOOK_INDEX_SETTINGS)!r})
users = torch.nn.functional.normalize(torch.randn(64, index.dim), dim=1)
seen = []
def other():
    torch.set_num_threads(2)
    index.search(users, 10)
    seen.append((torch.get_num_threads(), faiss.omp_get_max_threads()))
    torch.mm(users, users.t())
thread = threading.Thread(target=other)
thread.start(); thread.join()
assert seen == [(2, 2)], seen
print("ok", torch.get_num_threads(), faiss.omp_get_max_threads())
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "1", "1"]


def test_an_index_of_another_book_set_is_refused(indexed_run: Path) -> None:
    folder = ModelFolder(indexed_run)
    rec = folder.load().recommender
    other = BookIndex.build(rec.book_vectors.float()[:50].numpy(), IndexSettings())
    with pytest.raises(ValueError, match="a book index of 50"):
        Recommender(rec.towers, rec.book_vectors, rec.scorer, rec.settings, rec.ranking, other)


@pytest.mark.beam
def test_the_batch_job_top_k_through_the_index_is_the_recommenders(indexed_run: Path, tmp_path: Path) -> None:
    """Beam's --mode topk on the indexed model (its DoFns set the threads of both pools) writes the
    lists the recommender gives with the index."""
    from batch.context import JobSpec, ScoringContext
    from tests.test_batch import batch, read

    spec = JobSpec(str(indexed_run), str(tmp_path / "out"), str(tmp_path), "index", "topk", 10, True)
    assert ScoringContext.load(spec).model.recommender.index is not None  # the job's own recommender
    batch(indexed_run, tmp_path / "top", "--mode", "topk", "--k", "10", "--exclude-rated")
    frame = read(tmp_path / "top").sort_values(["user_id", "rank"])
    folder = ModelFolder(indexed_run)
    catalog = folder.load_catalog()
    rec = folder.load().recommender
    assert rec.index is not None
    feats, history = readers(folder)
    expected = rec.recommend(feats, history, 10, history).rows.numpy()
    isbns = catalog.books["isbn"].to_numpy()
    by_user = {u: g["isbn"].tolist() for u, g in frame.groupby("user_id")}
    for n, user in enumerate(catalog.users["user_id"].tolist()):
        assert by_user[user] == isbns[expected[n][expected[n] >= 0]].tolist()


def test_a_mapped_index_searches_alike_and_refuses_to_grow(indexed_run: Path) -> None:
    """The serving load maps the index's vectors (read-only; the workers of an archive share the
    pages): its lists are those of the index read into memory, and adding books to it is a clear
    error instead of faiss aborting the process."""
    folder = ModelFolder(indexed_run)
    mapped, read = folder.book_index(), folder.book_index(mapped=False)
    assert mapped is not None and read is not None and mapped.mapped and not read.mapped
    users = torch.randn(32, mapped.dim, generator=torch.Generator().manual_seed(0))
    users = torch.nn.functional.normalize(users, dim=1)
    for got, expected in zip(mapped.search(users, 20), read.search(users, 20), strict=True):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="read-only"):
        mapped.add(users[:2].numpy())
    read.add(users[:2].numpy())
    assert read.n_books == mapped.n_books + 2
    assert folder.load().recommender.index.mapped
