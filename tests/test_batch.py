"""The Beam batch job end to end on the ``tiny_run`` fixture: real pipelines, real Parquet output.

Most jobs run on the in-process FnApiRunner (``--direct_running_mode=in_memory``) to keep the suite
fast; one runs the default multi-process DirectRunner and one the DaskRunner on a loopback cluster.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.shared import Shared

from batch import io, model_cache, schemas
from batch.__main__ import main
from batch.context import JobSpec, worker_name
from batch.pipeline import run
from batch.plan import plan_job
from batch.transforms import ScoreShards, UserBlocks, plan_blocks
from model import layout
from model.artifacts import ModelFolder
from model.catalog import Catalog, write_catalog
from model.scoring import Scorer
from train.config import load_config

pytestmark = pytest.mark.beam

IN_MEMORY = "--direct_running_mode=in_memory"


def batch(model: Path | str, output: Path, *flags: str) -> dict:
    """Run the job in-process and return its ``_SUCCESS`` summary."""
    return run(plan_job(["--model", str(model), "--output", str(output), "--no-progress", IN_MEMORY, *flags]))


def read(output: Path) -> pd.DataFrame:
    return pq.read_table(output).to_pandas()


def parts(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.name.startswith("part-"))


@pytest.fixture(scope="module")
def catalog(tiny_run: Path) -> Catalog:
    return Catalog.load(tiny_run)


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> torch.nn.Module:
    return torch.jit.load(str(tiny_run / "model_scripted.pt"))


@pytest.fixture(scope="module")
def all_pairs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("batch") / "all"
    return out, batch(tiny_run, out, "--num-shards", "3")


# ---------------------------------------------------------------------------------------- all pairs
def test_all_pairs_is_every_user_times_every_book(all_pairs, catalog: Catalog) -> None:
    out, summary = all_pairs
    n_users, n_books = len(catalog.users), len(catalog.books)
    table = pq.read_table(out)
    assert table.schema.equals(schemas.ALL_PAIRS)
    assert table.num_rows == n_users * n_books == summary["rows"]
    frame = table.to_pandas()
    assert not frame.duplicated(["user_id", "isbn"]).any()
    assert set(frame["user_id"]) == set(catalog.users["user_id"])
    assert set(frame["isbn"]) == set(catalog.books["isbn"])
    assert frame["score"].between(1.0, 10.0).all()


def test_output_layout_shards_and_marker(all_pairs) -> None:
    out, summary = all_pairs
    assert parts(out) == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    marker = json.loads((out / io.SUCCESS).read_text())
    assert marker == {k: v for k, v in summary.items() if k in marker}
    assert marker["shards"] == 3 and marker["mode"] == "all" and marker["dead_letters"] == 0
    assert pq.read_table(out / io.DEAD_LETTERS).num_rows == 0
    # No temp folders left next to the output.
    assert [p.name for p in out.parent.iterdir()] == ["all"]
    # Each file holds whole users, rows grouped by user.
    seen: set[int] = set()
    for name in parts(out):
        users = set(pq.read_table(out / name)["user_id"].to_pylist())
        assert users and not users & seen
        seen |= users


def test_scores_equal_evaluation_handler_and_scorer(all_pairs, tiny_run: Path, catalog: Catalog, model) -> None:
    """Parity: the evaluation code path (build_training_data + predict), the TorchServe handler's
    engine and Scorer.rate give the batch job's numbers for the same pairs, to 1e-5."""
    from handlers.engine import BookrecEngine
    from train.data.tables import load_tables
    from train.rating.dataset import build_training_data
    from train.rating.fit import predict

    out, _ = all_pairs
    scores = read(out).set_index(["user_id", "isbn"])["score"]

    cfg = load_config(tiny_run / "config.yaml")
    _, _, ratings = load_tables(tiny_run)
    data = build_training_data(catalog, ratings, cfg.split.folds, cfg.split.seed)
    rows = data.splits["test"]
    assert len(rows) > 50
    expected = predict(model, data.user_table, data.book_table, rows)
    got = scores.loc[list(zip(rows.user_id.tolist(), rows.isbn.tolist(), strict=True))].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

    engine = BookrecEngine(tiny_run)
    users = catalog.users["user_id"].tolist()[:12]
    isbns = catalog.books["isbn"].tolist()[:40]
    answers = engine.run([{"action": "rate", "user": {"user_id": u}, "books": isbns} for u in users])
    for u, (status, body) in zip(users, answers, strict=True):
        assert status == 200
        served = np.array([p["rating"] for p in body["predictions"]])
        np.testing.assert_allclose(scores.loc[[(u, i) for i in isbns]].to_numpy(), served, rtol=0, atol=1e-5)

    rated = Scorer(model, catalog.book_feats).rate(
        catalog.user_feats[catalog.user_rows(users)].repeat_interleave(len(isbns), 0),
        catalog.book_feats[catalog.book_rows(isbns)].repeat(len(users), 1),
    )
    batch_scores = scores.loc[[(u, i) for u in users for i in isbns]].to_numpy()
    np.testing.assert_allclose(batch_scores, rated.numpy(), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- top-k
def test_top_k_matches_full_ranking_and_handler(all_pairs, tiny_run: Path, tmp_path: Path) -> None:
    from handlers.engine import BookrecEngine

    out, _ = all_pairs
    full = read(out)
    summary = batch(tiny_run, tmp_path / "top", "--mode", "topk", "--k", "5", "--exclude-rated")
    top = pq.read_table(tmp_path / "top")
    assert top.schema.equals(schemas.TOP_K)
    frame = top.to_pandas()
    n_users = full["user_id"].nunique()
    assert len(frame) == summary["rows"] == 5 * n_users
    assert all(ranks == [1, 2, 3, 4, 5] for ranks in frame.groupby("user_id")["rank"].apply(list))
    assert all((np.diff(s.to_numpy()) <= 0).all() for _, s in frame.groupby("user_id")["relevance"])
    assert frame["score"].between(1, 10).all()

    engine = BookrecEngine(tiny_run)
    for user in frame["user_id"].unique()[:10].tolist():
        ((status, body),) = engine.run([{"action": "recommend", "user": {"user_id": user}, "k": 5}])
        assert status == 200 and body["exclude_rated"] is True
        mine = frame[frame["user_id"] == user]
        np.testing.assert_allclose(mine["score"], [r["score"] for r in body["recommendations"]], atol=1e-5)
        np.testing.assert_allclose(mine["relevance"], [r["relevance"] for r in body["recommendations"]], atol=1e-5)
        assert mine["isbn"].tolist() == [r["isbn"] for r in body["recommendations"]]


def test_top_k_is_the_evaluations_two_stage_path(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    """Batch --mode topk, the handler's recommend and the evaluation's top-K are one code path:
    the same books in the same order with the same relevance and predicted rating, to 1e-5."""
    from handlers.engine import BookrecEngine
    from model.artifacts import ModelFolder
    from train.evaluation.protocols import RankingTask
    from train.evaluation.topk import model_top_k

    batch(tiny_run, tmp_path / "top", "--mode", "topk", "--k", "10", "--exclude-rated")
    frame = read(tmp_path / "top").sort_values(["user_id", "rank"])
    users = catalog.users["user_id"].to_numpy()
    rows = np.arange(len(users))
    history = [catalog.rated_by(int(r)) for r in rows]
    task = RankingTask("all", rows, catalog.user_feats, history, history, history, history)
    recommender = ModelFolder(tiny_run).load().recommender
    evaluation = model_top_k(recommender, task, k=10)
    recs = recommender.recommend(catalog.user_feats, history, 10, history)
    assert np.array_equal(recs.rows.numpy(), evaluation)
    isbns = catalog.books["isbn"].to_numpy()
    by_user = {u: g for u, g in frame.groupby("user_id")}
    for n, user in enumerate(users.tolist()):
        got = by_user[user]
        assert got["isbn"].tolist() == isbns[evaluation[n]].tolist()
        np.testing.assert_allclose(got["relevance"], recs.relevance[n].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["score"], recs.rating[n].numpy(), rtol=0, atol=1e-5)

    engine = BookrecEngine(tiny_run)
    bodies = [{"action": "recommend", "user": {"user_id": int(u)}, "k": 10} for u in users[:40]]
    for n, (status, body) in enumerate(engine.run(bodies)):
        assert status == 200
        answer = body["recommendations"]
        assert [r["isbn"] for r in answer] == isbns[evaluation[n]].tolist()
        np.testing.assert_allclose([r["relevance"] for r in answer], recs.relevance[n].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose([r["score"] for r in answer], recs.rating[n].numpy(), rtol=0, atol=1e-5)


def test_top_k_rows_carry_the_handlers_reasons(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    """The top-k output names each book's sources and the history books behind them, as the
    handler's answer does; a graph reason's book is in the reader's history."""
    from handlers.engine import BookrecEngine

    batch(tiny_run, tmp_path / "top", "--mode", "topk", "--k", "5", "--exclude-rated")
    frame = read(tmp_path / "top")
    assert {"sources", "because_graph", "because_author"} <= set(frame.columns)
    assert frame["sources"].map(len).gt(0).all()
    with_graph = frame[frame["because_graph"].notna()]
    assert len(with_graph) and with_graph["sources"].map(lambda s: "graph" in s).all()
    assert frame["because_author"].map(len).gt(0).any()
    engine = BookrecEngine(tiny_run)
    users = frame["user_id"].unique()[:20].tolist()
    answers = engine.run([{"action": "recommend", "user": {"user_id": u}, "k": 5} for u in users])
    for user, (_, body) in zip(users, answers, strict=True):
        mine = frame[frame["user_id"] == user].sort_values("rank")
        history = set(catalog.books["isbn"].to_numpy()[catalog.rated_by(catalog.user_index[user])])
        for (_, row), item in zip(mine.iterrows(), body["recommendations"], strict=True):
            assert list(row["sources"]) == item["sources"]
            assert (row["because_graph"] if isinstance(row["because_graph"], str) else None) == item["because"].get(
                "graph"
            )
            assert list(row["because_author"]) == item["because"].get("author", [])
            assert set(row["because_author"]) <= history
            if isinstance(row["because_graph"], str):
                assert row["because_graph"] in history


def test_similar_mode_writes_every_books_top_k_as_the_handler(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    from handlers.engine import BookrecEngine

    summary = batch(tiny_run, tmp_path / "sim", "--mode", "similar", "--k", "4", "--num-shards", "2")
    table = pq.read_table(tmp_path / "sim")
    assert table.schema.equals(schemas.SIMILAR)
    frame = table.to_pandas()
    assert set(frame["isbn"]) == set(catalog.books["isbn"]) and summary["mode"] == "similar"
    assert len(frame) == summary["rows"] <= 4 * len(catalog.books)
    assert (frame["isbn"] != frame["similar_isbn"]).all()
    assert not frame.duplicated(["isbn", "similar_isbn"]).any()
    assert all(r == list(range(1, len(r) + 1)) for r in frame.groupby("isbn")["rank"].apply(list))
    engine = BookrecEngine(tiny_run)
    isbns = catalog.books["isbn"].tolist()[:25]
    answers = engine.run([{"action": "similar", "book": i, "k": 4} for i in isbns])
    for isbn, (status, body) in zip(isbns, answers, strict=True):
        assert status == 200
        mine = frame[frame["isbn"] == isbn].sort_values("rank")
        assert mine["similar_isbn"].tolist() == [i["isbn"] for i in body["similar"]]
        np.testing.assert_allclose(mine["score"], [i["score"] for i in body["similar"]], rtol=1e-6)
        assert [list(s) for s in mine["sources"]] == [i["sources"] for i in body["similar"]]

    # --books picks the queries; an unknown one is a dead letter, the answers still span the catalog
    (tmp_path / "books.txt").write_text(f"{isbns[0].lower()}\nnot-a-book\n")
    part = batch(tiny_run, tmp_path / "part", "--mode", "similar", "--books", str(tmp_path / "books.txt"))
    got = read(tmp_path / "part")
    assert set(got["isbn"]) == {isbns[0]} and part["dead_letter_books"] == 1
    first = got.sort_values("rank")["similar_isbn"].tolist()[:4]
    assert first == frame[frame["isbn"] == isbns[0]].sort_values("rank")["similar_isbn"].tolist()


def test_exclude_rated_drops_training_pairs(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    summary = batch(tiny_run, tmp_path / "ex", "--exclude-rated")
    frame = read(tmp_path / "ex")
    history = catalog.history[["user_id", "isbn"]].drop_duplicates()
    assert len(history) > 0
    assert len(frame) == summary["rows"] == len(catalog.users) * len(catalog.books) - len(history)
    overlap = frame.merge(history, on=["user_id", "isbn"])
    assert overlap.empty

    top = batch(tiny_run, tmp_path / "top", "--mode", "topk", "--k", "3", "--exclude-rated")
    assert top["rows"] == 3 * len(catalog.users)
    assert read(tmp_path / "top").merge(history, on=["user_id", "isbn"]).empty

    # with a --books filter, only the rated books inside the set are dropped
    subset = history["isbn"].value_counts().index[:5].tolist() + catalog.books["isbn"].tail(5).tolist()
    (tmp_path / "books.txt").write_text("\n".join(dict.fromkeys(subset)))
    part = batch(tiny_run, tmp_path / "part", "--books", str(tmp_path / "books.txt"), "--exclude-rated")
    inside = history[history["isbn"].isin(subset)]
    assert part["rows"] == len(catalog.users) * len(set(subset)) - len(inside)
    assert read(tmp_path / "part").merge(history, on=["user_id", "isbn"]).empty


# ------------------------------------------------------------------------------ rerun and filtering
def test_rerun_replaces_output_whole(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    users = tmp_path / "users.txt"
    ids = pq.read_table(tiny_run / "catalog" / "users.parquet")["user_id"].to_pylist()
    users.write_text("user_id\n" + "\n".join(map(str, ids[:20])) + "\n")
    first = batch(tiny_run, out, "--users", str(users), "--num-shards", "4")
    assert parts(out) == [f"part-0000{i}-of-00004.parquet" for i in range(4)]
    second = batch(tiny_run, out, "--users", str(users), "--num-shards", "2", "--mode", "topk", "--k", "2")
    assert parts(out) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert second["run_id"] != first["run_id"]
    assert json.loads((out / io.SUCCESS).read_text())["run_id"] == second["run_id"]
    assert pq.read_table(out).schema.equals(schemas.TOP_K) and pq.read_table(out).num_rows == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores", "users.txt"]


def _shifted_copy(tiny_run: Path, dest: Path, shift: float) -> Path:
    """A copy of the model, with its global mean moved by ``shift`` (other scores)."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("data"))
    shift_model(dest, shift)
    return dest


def shift_model(folder: Path, shift: float) -> None:
    """The model retrained in place, as far as the batch job can tell: other weights, a new manifest."""
    model = torch.jit.load(str(folder / layout.MODEL_FILES["scripted"]))
    with torch.no_grad():
        model.global_mean.add_(shift)
    model.save(str(folder / layout.MODEL_FILES["scripted"]))
    ModelFolder(folder).write_manifest()


def test_model_loaded_once_per_process_and_again_when_it_changes(tiny_run: Path, tmp_path: Path) -> None:
    """The in-process DirectRunner: a second job over the same model reuses the process's loaded
    model; another model folder, or the same folder rewritten in place, is loaded again and scores
    with its own weights, never the cached ones."""
    model_cache.clear()
    me, users = worker_name(), ("--max-users", "30")

    def job(model: Path, name: str) -> tuple[dict, pd.Series]:
        summary = batch(model, tmp_path / name, *users)
        return summary["workers"][me], read(tmp_path / name).set_index(["user_id", "isbn"])["score"].sort_index()

    first, scores = job(tiny_run, "a")
    assert (first["contexts"], first["model_loads"]) == (1, 1)
    second, again = job(tiny_run, "b")
    assert (second["contexts"], second["model_loads"]) == (1, 0)
    pd.testing.assert_series_equal(again, scores)

    other = _shifted_copy(tiny_run, tmp_path / "other", -1.0)
    moved, lower = job(other, "c")
    assert moved["model_loads"] == 1 and (lower < scores).mean() > 0.9
    back, same = job(tiny_run, "d")
    assert back["model_loads"] == 1
    pd.testing.assert_series_equal(same, scores)

    shift_model(other, 2.0)  # retrained in place: same path, new file
    rewritten, higher = job(other, "e")
    assert rewritten["model_loads"] == 1 and (higher > scores).mean() > 0.9


def test_refuses_to_replace_a_folder_it_did_not_write(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--model", str(tiny_run), "--output", str(out), IN_MEMORY, "--no-progress"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_mar_archive_scores_like_the_run_folder(all_pairs, tiny_run: Path, tmp_path: Path) -> None:
    from serving.archive import build_archive

    mar = build_archive(tiny_run, tmp_path / "store", workers=1)
    users = tmp_path / "users.txt"
    users.write_text("\n".join(map(str, read(all_pairs[0])["user_id"].unique()[:5].tolist())))
    batch(mar, tmp_path / "out", "--users", str(users))
    got = read(tmp_path / "out").set_index(["user_id", "isbn"])["score"]
    expected = read(all_pairs[0]).set_index(["user_id", "isbn"])["score"].loc[got.index]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- dead letters
def _corrupt_copy(tiny_run: Path, dest: Path, user_rows: list[int], book_rows: list[int]) -> Path:
    """A copy of the run whose catalog has NaN / inf text embeddings for some users and books (its
    catalog written again from them and its manifest rewritten: a model that really holds them)."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("data"))
    catalog = Catalog.load(dest)
    book_emb, user_emb = catalog.book_emb.numpy().copy(), catalog.user_emb.numpy().copy()
    user_emb[user_rows, 0] = np.nan
    book_emb[book_rows, 0] = np.inf
    write_catalog(dest, catalog.books, book_emb, catalog.users, user_emb, catalog.history, catalog.spec)
    ModelFolder(dest).write_manifest()
    return dest


def test_bad_rows_go_to_dead_letters_and_the_job_finishes(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    run_dir = _corrupt_copy(tiny_run, tmp_path / "run", user_rows=[3, 10], book_rows=[7])
    user_ids = catalog.users["user_id"].tolist()
    isbns = catalog.books["isbn"].tolist()
    users = tmp_path / "users.txt"
    users.write_text("\n".join(map(str, [*user_ids[:15], 999_999_999, user_ids[0]])))
    books = tmp_path / "books.txt"
    books.write_text("\n".join([*isbns[:30], "NOT-AN-ISBN"]))

    summary = batch(run_dir, tmp_path / "out", "--users", str(users), "--books", str(books))
    dead = pq.read_table(tmp_path / "out" / io.DEAD_LETTERS)
    assert dead.schema.equals(schemas.DEAD_LETTERS)
    reasons = {(r["kind"], r["id"]): r["reason"].split(":")[0] for r in dead.to_pylist()}
    # A broken book embedding also breaks the taste profile of every user who rated that book
    # (implicit reads are in the history too, but not in the taste profile).
    history = catalog.history
    rated_it = (history["isbn"] == isbns[7]) & (history["rating"] > 0)
    raters = set(history.loc[rated_it, "user_id"]) & set(user_ids[:15])
    bad_users = {user_ids[3], user_ids[10], *raters}
    assert reasons == {
        **{("user", str(u)): "non_finite_features" for u in bad_users},
        ("user", "999999999"): "unknown_id",
        ("book", isbns[7]): "non_finite_features",
        ("book", "NOT-AN-ISBN"): "unknown_id",
    }
    assert summary["dead_letters"] == len(bad_users) + 3
    assert summary["metrics"]["bad_users_non_finite_features"] == len(bad_users)
    assert summary["metrics"]["bad_users_unknown_id"] == 1
    assert summary["metrics"]["bad_books_unknown_id"] == 1
    assert summary["metrics"]["bad_books_non_finite_features"] == 1
    frame = read(tmp_path / "out")
    # 15 listed users (one listed twice) minus the bad ones, 30 listed books minus the broken one.
    assert len(frame) == summary["rows"] == (15 - len(bad_users)) * 29
    assert np.isfinite(frame["score"]).all()


def test_external_feature_rows_with_wrong_dimension_nan_or_null(
    all_pairs, tiny_run: Path, catalog: Catalog, tmp_path: Path
) -> None:
    ids = catalog.users["user_id"].tolist()[:6]
    feats = catalog.user_feats[:6].numpy()
    rows = [feats[0].tolist(), feats[1].tolist(), feats[2][:-1].tolist(), None, feats[4].tolist(), feats[5].tolist()]
    rows[4][2] = float("nan")
    rows[5][0] = float("inf")
    path = tmp_path / "user_features.parquet"
    pq.write_table(pa.table({"user_id": ids, "features": pa.array(rows, pa.list_(pa.float32()))}), path)

    summary = batch(tiny_run, tmp_path / "out", "--user-features", str(path))
    dead = {r["id"]: r["reason"].split(":")[0] for r in pq.read_table(tmp_path / "out" / io.DEAD_LETTERS).to_pylist()}
    assert dead == {
        str(ids[2]): "wrong_dimension",
        str(ids[3]): "missing_features",
        str(ids[4]): "non_finite_features",
        str(ids[5]): "non_finite_features",
    }
    assert summary["users_scored"] == 2
    got = read(tmp_path / "out").set_index(["user_id", "isbn"])["score"]
    expected = read(all_pairs[0]).set_index(["user_id", "isbn"])["score"].loc[got.index]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-6)


# ------------------------------------------------------------------------- transforms (TestPipeline)
def test_user_blocks_and_score_shards_transforms(tiny_run: Path, catalog: Catalog, tmp_path: Path) -> None:
    """The composite transforms in a TestPipeline with assert_that, user_score_test style."""
    ids = catalog.users["user_id"].tolist()[:10]
    blocks = plan_blocks([*ids, 123_456_789], num_shards=3, block_users=2)
    spec = JobSpec(model=str(tiny_run), output=str(tmp_path / "o"), temp_dir=str(tmp_path), run_id="t", num_shards=3)
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        grouped = p | "Blocks" >> UserBlocks(blocks)
        sizes = grouped | "Sizes" >> beam.Map(lambda kv: (kv[0], sum(len(b.user_ids) for b in kv[1])))
        assert_that(sizes, equal_to([(0, 4), (1, 4), (2, 3)]), label="CheckBlocks")
        results = grouped | "Score" >> ScoreShards(spec, Shared())
        counts = results | "Counts" >> beam.Map(lambda r: (r.shard, r.users, r.rows, len(r.dead)))
        n_books = len(catalog.books)
        expected = [(0, 4, 4 * n_books, 0), (1, 4, 4 * n_books, 0), (2, 2, 2 * n_books, 1)]
        assert_that(counts, equal_to(expected), label="CheckShards")


# ------------------------------------------------------------------------------------ other runners
def test_default_multiprocess_direct_runner(tiny_run: Path, tmp_path: Path, catalog: Catalog) -> None:
    """The default command line (no runner flags): multi-process DirectRunner, every core, offline."""
    out = tmp_path / "out"
    code = main(["--model", str(tiny_run), "--output", str(out), "--mode", "topk", "--k", "2", "--no-progress"])
    assert code == 0
    summary = json.loads((out / io.SUCCESS).read_text())
    assert summary["runner"] == "DirectRunner"
    assert pq.read_table(out).num_rows == 2 * len(catalog.users)


def test_dask_runner_writes_the_output(tiny_run: Path, tmp_path: Path, catalog: Catalog) -> None:
    """DaskRunner on a loopback LocalCluster: the output really exists and is complete."""
    pytest.importorskip("dask.distributed")
    out = tmp_path / "out"
    summary = run(
        plan_job(
            [
                *("--model", str(tiny_run), "--output", str(out), "--runner=DaskRunner", "--workers", "2"),
                *("--mode", "topk", "--k", "3", "--num-shards", "2", "--no-progress"),
            ]
        )
    )
    assert summary["runner"] == "DaskRunner"
    assert parts(out) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    frame = read(out)
    assert len(frame) == 3 * len(catalog.users) and frame["user_id"].nunique() == len(catalog.users)
