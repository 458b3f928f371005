"""The TorchServe handler without a server: archive contents, API answers, bad input, parity.

The handler is built exactly as TorchServe builds it, from an unpacked archive of the ``tiny_run``
fixture and TorchServe's own ``Context`` / ``RequestProcessor`` classes (no stand-ins).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from handlers.schema import (
    DEFAULT_K,
    INTERNAL_ERROR,
    CatalogBook,
    KnownUser,
    Limits,
    NewBook,
    NewUser,
    RateBody,
    RatedBook,
    RecommendBody,
    Refusal,
    main,
    request_schema,
)
from model import layout
from model.artifacts import IncompleteModelFolder, code_identity
from model.ranges import AGE_MAX, AGE_MIN, RATING_MAX, RATING_MIN, YEAR_MAX, YEAR_MIN
from serving.archive import HANDLER_FILE, WORKER_FILES, CodeChanged, build_archive

from .conftest import TEST_BATCH_DELAY_MS
from .imports import import_edges, module_files

REPO = Path(__file__).resolve().parents[1]


def metrics_cache() -> Any:
    """TorchServe's metrics cache as the worker builds it (its default metrics.yaml)."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(Path(ts.__file__).parent / "configs" / "metrics.yaml")
    cache.initialize_cache()
    cache.model_name = "bookrec"
    return cache


def make_context(model_dir: Path, gpu: int | None = None) -> Any:
    """TorchServe's Context as the worker builds it for this archive."""
    from ts.context import Context

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    return Context(
        "bookrec",
        str(model_dir),
        manifest,
        config["batchSize"],
        gpu,
        "0.12.0",
        metrics=metrics_cache(),
        model_yaml_config=config,
    )


def load_handler(model_dir: Path, gpu: int | None = None) -> tuple[Any, Any]:
    """The handler class from the archive itself (as TorchServe imports it), initialised."""
    if str(model_dir) not in sys.path:
        sys.path.insert(0, str(model_dir))
    import bookrec_handler

    context = make_context(model_dir, gpu)
    handler = bookrec_handler.BookrecHandler()
    handler.initialize(context)
    return handler, context


def call(handler: Any, context: Any, bodies: list[Any], headers: dict | None = None) -> list[tuple[int, Any]]:
    """One TorchServe batch: (status, decoded JSON answer) per body, in order."""
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor(dict(headers or {})) for _ in bodies]
    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}  # as TorchServe's Service.predict
    context.metrics.request_ids = context.request_ids
    out = handler.handle([{"body": b} for b in bodies], context)
    assert len(out) == len(bodies)
    return [(context.get_response_status(i)[0], json.loads(o)) for i, o in enumerate(out)]


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    return load_handler(model_dir)


@pytest.fixture(scope="module")
def samples(loaded: tuple[Any, Any]) -> dict[str, Any]:
    """Known ids of the tiny catalog: a user with training history, ISBNs, a user without."""
    engine = loaded[0].engine
    history = engine.catalog.history
    user = int(history["user_id"].value_counts().index[0])
    isbns = engine.catalog.books["isbn"].tolist()
    return {"user": user, "isbns": isbns, "rated": sorted(set(history.loc[history.user_id == user, "isbn"]))}


# ------------------------------------------------------------------------------------- archive
def test_archive_holds_everything_the_worker_needs(tiny_store: Path, model_dir: Path, tiny_run: Path) -> None:
    names = set(zipfile.ZipFile(tiny_store / "bookrec.mar").namelist())
    for name in (
        "model_scripted.pt",
        "bookrec_handler.py",
        "model-config.yaml",
        "metadata.json",
        "encoder/config.json",
        "encoder/model.safetensors",
        "encoder/tokenizer.json",
        "encoder/encoder.json",
        "encoder/encoder_scripted.pt",
        "catalog/books.parquet",
        "catalog/users.parquet",
        "catalog/history.parquet",
        "catalog/feature_spec.json",
        "model/catalog.py",
        "model/scoring.py",
        "handlers/engine.py",
        "handlers/schema.py",
        "MAR-INF/MANIFEST.json",
    ):
        assert name in names, name
    assert not any(n.endswith(("requirements.txt", ".pyc")) for n in names)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    assert manifest["handler"] == "bookrec_handler.py" and manifest["serializedFile"] == "model_scripted.pt"
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    assert {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"} <= set(config)
    assert config["maxBatchDelay"] == TEST_BATCH_DELAY_MS
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["config"]["model"]["hidden"] == [32, 16]
    assert meta["fingerprint"] == json.loads((tiny_run / "fingerprint.json").read_text())
    assert meta["versions"]["torch"] and meta["serving_versions"]["torchserve"]
    assert "MLP TorchScript (shipped)" in meta["metrics"]
    # The code: what each step that made model files ran with (steps.json) and what the archive ships.
    shipped_code = code_identity()
    assert meta["code"]["archived_with"]["feature_code_sha256"] == shipped_code["feature_code_sha256"]
    trained = meta["code"]["trained_with"]
    assert set(trained) == {"distill", "features", "train", "compress", "retrieval", "ranking"}
    assert {code["feature_code_sha256"] for code in trained.values()} == {shipped_code["feature_code_sha256"]}
    assert set(meta["steps"]) == {"data", *trained, "evaluate"}
    assert meta["code"]["same_feature_code"] is True
    assert meta["code"]["archived_with"]["git_commit"] == shipped_code["git_commit"]
    # Book metadata and feature vectors (text embeddings first) travel in the catalog.
    books = pq.read_table(model_dir / "catalog" / "books.parquet")
    assert {"isbn", "title", "author", "year", "publisher"} <= set(books.column_names)
    assert (model_dir / layout.catalog_path(layout.BOOK_FEATURES_FILE)).is_file()


def test_archive_ships_the_allow_listed_worker_code_and_no_tools(tiny_store: Path) -> None:
    """Python in the .mar: the handler at the root, handlers/ by its allow-list, model/ whole;
    nothing of serving/ (the archive builder, local server, health check and examples)."""
    names = zipfile.ZipFile(tiny_store / "bookrec.mar").namelist()
    want = {HANDLER_FILE} | {f"handlers/{name}" for name in WORKER_FILES}
    want |= {f"model/{file.name}" for file in (REPO / "model").glob("*.py")}
    assert {n for n in names if n.endswith(".py")} == want
    tools = {file.name for file in (REPO / "serving").glob("*.py")} - {"__init__.py"}
    assert tools and not any(n.startswith("serving/") or Path(n).name in tools for n in names)
    # handlers/ holds worker code only (tools belong in serving/): each of its modules ships.
    assert {file.name for file in (REPO / "handlers").glob("*.py")} == {HANDLER_FILE, *WORKER_FILES}


def test_worker_code_imports_no_training_batch_or_tool_code() -> None:
    """handlers/ runs in the worker, from the archive: it may import model/ and its own shipped
    modules, never train/, batch/ or serving/ (not in the archive)."""
    shipped = {HANDLER_FILE, *WORKER_FILES}
    for name, targets in import_edges(module_files(REPO)).items():
        if not name.startswith("handlers."):
            continue
        for module in targets:
            assert module.split(".")[0] not in ("train", "batch", "serving"), f"{name} imports {module}"
            if module.startswith("handlers."):
                assert f"{module.split('.')[1]}.py" in shipped, f"{name} imports {module}, which is not shipped"


def _made_with_other_code(run: Path, steps: tuple[str, ...]) -> None:
    """Record ``steps`` of ``run`` as run with other model/ code (another feature-code hash and commit)."""
    record = json.loads((run / "steps.json").read_text())
    for name in steps:
        record[name]["code"] = {**record[name]["code"], "feature_code_sha256": "0" * 64, "git_commit": "abc123"}
    (run / "steps.json").write_text(json.dumps(record))


def test_archive_refuses_a_run_trained_with_other_model_code(tiny_run: Path, tmp_path: Path) -> None:
    """A run a step of which made model files with a feature-code hash that is not the checkout's is
    refused, naming the step and both hashes, unless the change is allowed; the metadata then says the
    code differs. A run from before steps.json is judged by its versions.json."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _made_with_other_code(run, ("features",))
    with pytest.raises(CodeChanged, match=r"features with feature-code hash 000000000000 \(commit abc123\).*--allow"):
        build_archive(run, tmp_path / "store")
    path = build_archive(run, tmp_path / "store", archive_format="no-archive", allow_code_change=True)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["code"]["same_feature_code"] is False
    assert meta["code"]["trained_with"]["features"]["git_commit"] == "abc123"

    (run / "steps.json").unlink()
    versions = json.loads((run / "versions.json").read_text())
    versions["code"] = {**versions["code"], "feature_code_sha256": "0" * 64, "git_commit": "abc123"}
    (run / "versions.json").write_text(json.dumps(versions))
    with pytest.raises(CodeChanged, match=r"run with feature-code hash 000000000000 \(commit abc123\)"):
        build_archive(run, tmp_path / "store2")


@pytest.mark.training  # a `python -m train` process of its own
def test_rerunning_a_step_keeps_the_record_of_the_code_that_made_the_model(tiny_run: Path, tmp_path: Path) -> None:
    """Rerunning a step that makes no model file (here the distill step, a no-op for a random-init
    encoder, as evaluate is for the model) with the checkout's code does not make a run made with
    other code archivable: the code-change guard holds."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _made_with_other_code(run, ("distill", "features", "train", "compress", "retrieval", "ranking"))
    versions = json.loads((run / "versions.json").read_text())
    versions["code"] = {**versions["code"], "feature_code_sha256": "0" * 64, "git_commit": "abc123"}
    (run / "versions.json").write_text(json.dumps(versions))
    proc = subprocess.run(
        [sys.executable, "-m", "train", "distill", "--config", str(run / "config.yaml"), "--run-dir", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((run / "steps.json").read_text())
    assert record["distill"]["code"]["feature_code_sha256"] == code_identity()["feature_code_sha256"]
    assert json.loads((run / "versions.json").read_text())["code"]["git_commit"] == "abc123"  # not the data step
    with pytest.raises(CodeChanged, match=r"features with feature-code hash 000000000000"):
        build_archive(run, tmp_path / "store")

    # A run from before steps.json: each step is taken to have run with the code versions.json names.
    from train.config import load_config
    from train.steps import run_step

    (run / "steps.json").unlink()
    run_step("distill", load_config(run / "config.yaml", [f"run_dir={run}"]), progress=False)
    record = json.loads((run / "steps.json").read_text())
    assert record["features"]["code"]["git_commit"] == "abc123" and record["features"]["config_sha256"] is None
    with pytest.raises(CodeChanged, match=r"features with feature-code hash 000000000000"):
        build_archive(run, tmp_path / "store")


def test_archive_rejects_an_incomplete_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(IncompleteModelFolder, match=r"model_scripted\.pt"):
        build_archive(tmp_path / "run", tmp_path / "store")


STANDALONE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
model_dir, user = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, model_dir)
import os, yaml, ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
import bookrec_handler, handlers, model
manifest = json.load(open(model_dir + "/MAR-INF/MANIFEST.json"))
config = yaml.safe_load(open(model_dir + "/model-config.yaml"))
metrics = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
metrics.initialize_cache()
context = Context("bookrec", model_dir, manifest, 32, None, "0.12.0", metrics=metrics, model_yaml_config=config)
handler = bookrec_handler.BookrecHandler()
handler.initialize(context)
context.request_processor = [RequestProcessor({})]
context.request_ids = metrics.request_ids = {0: "standalone"}
body = json.dumps({"action": "recommend", "user": {"user_id": user}, "k": 3}).encode()
[answer] = handler.handle([{"body": body}], context)
print(json.dumps({"files": [model.__file__, handlers.__file__, bookrec_handler.__file__],
                  "status": context.get_response_status(0)[0], "answer": json.loads(answer),
                  "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")}))
"""


def test_unpacked_archive_serves_without_the_project_or_network(model_dir: Path, samples: dict) -> None:
    """A fresh interpreter with sockets disabled, run from the unpacked archive, loads the handler
    and answers; the project code it runs is the archive's copy, not the repository's, and its
    encoder is the scripted one: transformers is never imported (it was most of a worker's start)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(model_dir), str(samples["user"])],
        cwd=model_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for file in result["files"]:
        assert Path(file).resolve().is_relative_to(model_dir.resolve()), file
    assert result["status"] == 200 and len(result["answer"]["recommendations"]) == 3
    assert result["transformers"] == [], "the worker imported transformers"
    # TorchScript's deprecation warnings stay out of the worker's output.
    assert "deprecated" not in proc.stderr.lower(), proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------- API
def test_loads_on_cpu_when_no_gpu_is_assigned(loaded: tuple[Any, Any]) -> None:
    handler, _ = loaded  # the context carries gpu_id None, as TorchServe does on a CPU host
    assert handler.initialized
    assert handler.device == torch.device("cpu") == handler.engine.device
    assert not handler.engine.scorer.book_proj.is_cuda
    # The MLP BaseHandler loaded from the archive's serialized file is the one the engine scores with.
    assert handler.model is handler.engine.scorer.model


def test_the_handler_file_defines_one_class_as_torchserve_requires(loaded: tuple[Any, Any]) -> None:
    from ts.utils.util import list_classes_from_module

    handler = type(loaded[0])
    assert list_classes_from_module(sys.modules[handler.__module__]) == [handler]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_on_the_gpu_it_is_given_and_scores_like_cpu(model_dir: Path, samples: dict) -> None:
    cpu, cpu_ctx = load_handler(model_dir, gpu=None)
    gpu, gpu_ctx = load_handler(model_dir, gpu=0)
    assert str(gpu.device) == "cuda:0" and gpu.engine.scorer.book_proj.is_cuda
    assert gpu.model is gpu.engine.scorer.model
    body = {"action": "rate", "user": {"user_id": samples["user"]}, "books": samples["isbns"][:20]}
    [(s1, a)], [(s2, b)] = call(cpu, cpu_ctx, [body]), call(gpu, gpu_ctx, [body])
    assert s1 == s2 == 200
    for x, y in zip(a["predictions"], b["predictions"], strict=True):
        assert x["rating"] == pytest.approx(y["rating"], abs=1e-4)


def test_rate_known_and_new_users_and_books(loaded: tuple[Any, Any], samples: dict) -> None:
    handler, context = loaded
    isbns = samples["isbns"]
    new_book = {"title": "The Long Voyage", "author": "Nora Kepler", "year": 1999, "publisher": "Orbit"}
    new_user = {"city": "porto", "country": "portugal", "age": 41, "ratings": [{"isbn": isbns[0], "rating": 9}]}
    bodies = [
        {"action": "rate", "user": {"user_id": samples["user"]}, "books": [isbns[1], {"isbn": isbns[2]}, new_book]},
        {"action": "rate", "user": new_user, "books": [isbns[1], new_book]},
        {"action": "rate", "user": {"country": "usa"}, "books": [isbns[1]]},
    ]
    answers = call(handler, context, bodies)
    assert [s for s, _ in answers] == [200, 200, 200]
    first, second, third = (a for _, a in answers)
    assert [p["isbn"] for p in first["predictions"]] == [isbns[1], isbns[2], None]
    assert first["predictions"][2]["title"] == "The Long Voyage"
    assert first["user"] == {"user_id": samples["user"], "known": True}
    assert second["user"] == {"user_id": None, "known": False, "ratings_used": 1}
    for answer in (first, second, third):
        for p in answer["predictions"]:
            assert 1.0 <= p["rating"] <= 10.0
    # A rating history changes the new user's prediction (the taste profile is used).
    assert second["predictions"][0]["rating"] != pytest.approx(third["predictions"][0]["rating"], abs=1e-7)
    # Batched answers equal the same requests answered one at a time.
    for body, (_, batched) in zip(bodies, answers, strict=True):
        [(_, alone)] = call(handler, context, [body])
        for x, y in zip(batched["predictions"], alone["predictions"], strict=True):
            assert x["rating"] == pytest.approx(y["rating"], abs=1e-5)


def test_recommend_ranks_the_catalog_and_excludes_rated_books(loaded: tuple[Any, Any], samples: dict) -> None:
    handler, context = loaded
    engine = handler.engine
    user = {"user_id": samples["user"]}
    (s1, excl), (s2, incl), (s3, default) = call(
        handler,
        context,
        [
            {"action": "recommend", "user": user, "k": 100, "exclude_rated": True},
            {"action": "recommend", "user": user, "k": 100, "exclude_rated": False},
            {"action": "recommend", "user": user},
        ],
    )
    assert (s1, s2, s3) == (200, 200, 200)
    assert len(default["recommendations"]) == 10 and default["k"] == 10
    recs = excl["recommendations"]
    # the heaviest reader of the tiny catalog may have read most of it: every unread book, up to k
    expected = min(100, len(engine.catalog.books) - len(samples["rated"]))
    assert len(recs) == expected and [r["rank"] for r in recs] == list(range(1, expected + 1))
    scores = [r["score"] for r in recs]
    relevance = [r["relevance"] for r in recs]
    assert relevance == sorted(relevance, reverse=True)  # ordered by the two-stage relevance
    assert all(1 <= s <= 10 for s in scores)  # each with its predicted rating
    assert not {r["isbn"] for r in recs} & set(samples["rated"])
    assert {r["isbn"] for r in incl["recommendations"]} & set(samples["rated"]), "history should rank high"
    # The scores are the model's ratings of those pairs, and titles/authors come from the catalog.
    row = engine.catalog.user_index[samples["user"]]
    books = engine.catalog.book_rows([r["isbn"] for r in recs])
    expected = engine.scorer.rate(engine.catalog.user_feats[[row] * len(recs)], engine.catalog.book_feats[books])
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    first = engine.catalog.books.iloc[int(books[0])]
    assert (recs[0]["title"], recs[0]["author"]) == (first["title"], first["author"])
    # The exclusion list of a known user is exactly their training history.
    history = engine.catalog.history
    for user_row in range(0, len(engine.catalog.users), 7):
        user_id = int(engine.catalog.users["user_id"].iat[user_row])
        mine = engine._rated_rows(KnownUser(user_id=user_id))
        isbns = history.loc[history["user_id"] == user_id, "isbn"].tolist()
        assert mine.tolist() == engine.catalog.book_rows(isbns).tolist()


def test_recommend_for_a_new_user_excludes_their_ratings(loaded: tuple[Any, Any], samples: dict) -> None:
    handler, context = loaded
    rated = samples["isbns"][:3]
    user = {"country": "germany", "age": 30, "ratings": [{"isbn": i, "rating": 10} for i in rated]}
    [(status, answer)] = call(handler, context, [{"action": "recommend", "user": user, "k": 100}])
    assert status == 200 and len(answer["recommendations"]) == 100
    assert not {r["isbn"] for r in answer["recommendations"]} & set(rated)


def test_describe_returns_the_archive_metadata(loaded: tuple[Any, Any]) -> None:
    handler, context = loaded
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor({"describe": "True"})]
    [meta] = handler.handle([{"body": b""}], context)
    # BaseHandler.handle returns describe_handle's dict; the worker JSON-encodes it for the frontend.
    assert isinstance(meta, dict) and json.loads(json.dumps(meta)) == meta
    assert meta["model_version"] == "1.0" and meta["books"] == len(handler.engine.catalog.books)
    assert meta["limits"] == vars(Limits())
    assert "MLP TorchScript (shipped)" in meta["metrics"]


# ----------------------------------------------------------------------------------- bad input
def bad_requests(user: int, isbn: str) -> list[tuple[str, Any, int, str]]:
    """(name, body, expected status, expected field) for every class of bad input."""
    rate = {"action": "rate", "user": {"user_id": user}, "books": [isbn]}
    rec = {"action": "recommend", "user": {"user_id": user}}
    return [
        ("malformed JSON", b'{"action": "rate", ', 400, "body"),
        ("not UTF-8", b'{"action": "\xff\xfe"}', 400, "body"),
        ("empty body", b"", 400, "body"),
        ("no body", None, 400, "body"),
        ("JSON array", b"[1, 2]", 400, "body"),
        ("NaN literal", f'{{"action": "recommend", "user": {{"user_id": {user}}}, "k": NaN}}'.encode(), 400, "body"),
        ("deep nesting", b"[" * 100000 + b"]" * 100000, 400, "body"),
        ("missing action", {"user": {"user_id": user}}, 400, "action"),
        ("unknown action", {**rec, "action": "delete"}, 400, "action"),
        ("missing user", {"action": "recommend"}, 400, "user"),
        ("missing books", {"action": "rate", "user": {"user_id": user}}, 400, "books"),
        ("extra field", {**rec, "debug": True}, 400, "debug"),
        ("extra user field", {**rec, "user": {"user_id": user, "age": 3}}, 400, "user.age"),
        ("extra book field", {**rate, "books": [{"isbn": isbn, "price": 3}]}, 400, "books[0].price"),
        ("empty user", {**rec, "user": {}}, 400, "user"),
        ("user not an object", {**rec, "user": user}, 400, "user"),
        ("user id as string", {**rec, "user": {"user_id": str(user)}}, 400, "user.user_id"),
        ("user id as bool", {**rec, "user": {"user_id": True}}, 400, "user.user_id"),
        ("unknown user id", {**rec, "user": {"user_id": 10**12}}, 404, "user.user_id"),
        ("unknown ISBN", {**rate, "books": [isbn, "no-such-isbn"]}, 404, "books[1]"),
        ("unknown ISBN object", {**rate, "books": [{"isbn": "no-such-isbn"}]}, 404, "books[0].isbn"),
        (
            "unknown ISBN in history",
            {**rec, "user": {"country": "usa", "ratings": [{"isbn": "no-such-isbn", "rating": 5}]}},
            404,
            "user.ratings[0].isbn",
        ),
        ("ISBN wrong type", {**rate, "books": [123]}, 400, "books[0]"),
        ("books not a list", {**rate, "books": isbn}, 400, "books"),
        ("empty books", {**rate, "books": []}, 400, "books"),
        ("too many books", {**rate, "books": [isbn] * 101}, 400, "books"),
        ("empty ratings", {**rec, "user": {"country": "usa", "ratings": []}}, 400, "user.ratings"),
        (
            "too many ratings",
            {**rec, "user": {"country": "usa", "ratings": [{"isbn": isbn, "rating": 5}] * 51}},
            400,
            "user.ratings",
        ),
        (
            "rating out of range",
            {**rec, "user": {"ratings": [{"isbn": isbn, "rating": 11}]}},
            400,
            "user.ratings[0].rating",
        ),
        ("rating missing", {**rec, "user": {"ratings": [{"isbn": isbn}]}}, 400, "user.ratings[0].rating"),
        (
            "rating NaN",
            {**rec, "user": {"ratings": [{"isbn": isbn, "rating": math.nan}]}},
            400,
            "user.ratings[0].rating",
        ),
        (
            "rating inf",
            {**rec, "user": {"ratings": [{"isbn": isbn, "rating": math.inf}]}},
            400,
            "user.ratings[0].rating",
        ),
        ("age NaN", {**rec, "user": {"country": "usa", "age": math.nan}}, 400, "user.age"),
        ("age as float", {**rec, "user": {"country": "usa", "age": 30.5}}, 400, "user.age"),
        ("age out of range", {**rec, "user": {"country": "usa", "age": 500}}, 400, "user.age"),
        ("huge string", {**rec, "user": {"city": "x" * 100_000}}, 400, "user.city"),
        ("huge title", {**rate, "books": [{"title": "t" * 5000}]}, 400, "books[0].title"),
        ("huge ISBN", {**rate, "books": ["9" * 5000]}, 400, "books[0]"),
        ("title missing", {**rate, "books": [{"author": "someone"}]}, 400, "books[0].title"),
        ("title empty", {**rate, "books": [{"title": "  "}]}, 400, "books[0].title"),
        # json.loads('"\\ud800"') is a str with a lone surrogate: valid JSON, but not text.
        ("lone surrogate in title", {**rate, "books": [{"title": json.loads('"\\ud800"')}]}, 400, "books[0].title"),
        ("lone surrogate in city", {**rec, "user": {"city": "porto" + json.loads('"\\udc00"')}}, 400, "user.city"),
        ("lone surrogate as body", b'{"action": "recommend", "user": {"country": "\\ud800"}}', 400, "user.country"),
        ("year wrong type", {**rate, "books": [{"title": "t", "year": "1999"}]}, 400, "books[0].year"),
        ("year inf", {**rate, "books": [{"title": "t", "year": math.inf}]}, 400, "books[0].year"),
        ("k zero", {**rec, "k": 0}, 400, "k"),
        ("k too large", {**rec, "k": 101}, 400, "k"),
        ("k float", {**rec, "k": 2.5}, 400, "k"),
        ("k NaN", {**rec, "k": math.nan}, 400, "k"),
        ("k huge", {**rec, "k": 10**30}, 400, "k"),
        ("exclude_rated string", {**rec, "exclude_rated": "yes"}, 400, "exclude_rated"),
        ("books in recommend", {**rec, "books": [isbn]}, 400, "books"),
        ("similar unknown ISBN", {"action": "similar", "book": "nope-123"}, 404, "book"),
        ("similar unknown ISBN object", {"action": "similar", "book": {"isbn": "nope-123"}}, 404, "book.isbn"),
        ("similar without a book", {"action": "similar", "k": 3}, 400, "book"),
        ("similar k zero", {"action": "similar", "book": isbn, "k": 0}, 400, "k"),
        ("similar with a user", {"action": "similar", "book": isbn, "user": {"user_id": user}}, 400, "user"),
    ]


@pytest.fixture(scope="module")
def bad_cases(samples: dict) -> list[tuple[str, Any, int, str]]:
    return bad_requests(samples["user"], samples["isbns"][0])


def test_every_bad_input_gets_its_own_4xx_and_the_good_ones_succeed(
    loaded: tuple[Any, Any], samples: dict, bad_cases: list
) -> None:
    """All bad cases in one TorchServe batch, interleaved with good requests."""
    handler, context = loaded
    good = {"action": "rate", "user": {"user_id": samples["user"]}, "books": samples["isbns"][:2]}
    bodies: list[Any] = []
    for _, body, _, _ in bad_cases:
        bodies += [body, good]
    answers = call(handler, context, bodies)
    for n, (name, _, status, field) in enumerate(bad_cases):
        got_status, got = answers[2 * n]
        assert got_status == status, (name, got)
        assert got["error"]["field"] == field, (name, got)
        assert got["error"]["status"] == status and got["error"]["message"], name
        assert len(json.dumps(got)) < 600, f"{name}: the error must not echo the whole input"
        ok_status, ok = answers[2 * n + 1]
        assert ok_status == 200 and len(ok["predictions"]) == 2, name


def test_validation_hands_each_bad_input_on_as_a_refusal_naming_its_field(
    loaded: tuple[Any, Any], bad_cases: list
) -> None:
    """Between the stages a bad body is a ``Refusal`` (status, field, message), answered as its body."""
    engine = loaded[0].engine
    parsed = engine.validate([body for _, body, _, _ in bad_cases])
    for (name, _, status, field), refusal in zip(bad_cases, parsed, strict=True):
        assert isinstance(refusal, Refusal), (name, refusal)
        assert (refusal.status, refusal.field) == (status, field) and refusal.message, (name, refusal)
    assert engine.answer(parsed) == [(r.status, r.body()) for r in parsed]


def test_a_valid_body_is_validated_into_the_models_the_engine_scores(loaded: tuple[Any, Any], samples: dict) -> None:
    """No copies: the engine gets the pydantic models, a bare ISBN as a ``CatalogBook``, defaults filled."""
    engine = loaded[0].engine
    isbn = samples["isbns"][0]
    rate, recommend = engine.validate(
        [
            {"action": "rate", "user": {"user_id": samples["user"]}, "books": [isbn, {"isbn": isbn}, {"title": "t"}]},
            {"action": "recommend", "user": {"country": "usa", "ratings": [{"isbn": isbn, "rating": 7.0}]}},
        ]
    )
    assert isinstance(rate, RateBody) and rate.user == KnownUser(user_id=samples["user"]) and rate.user.known
    assert rate.books == [CatalogBook(isbn=isbn), CatalogBook(isbn=isbn), NewBook(title="t")]
    assert [book.known for book in rate.books] == [True, True, False]
    assert isinstance(recommend, RecommendBody) and (recommend.k, recommend.exclude_rated) == (DEFAULT_K, True)
    assert isinstance(recommend.user, NewUser) and not recommend.user.known
    assert recommend.user.ratings == [RatedBook(isbn=isbn, rating=7.0)]


def test_an_unknown_fields_hint_names_every_field_that_object_may_hold(loaded: tuple[Any, Any], samples: dict) -> None:
    """``{"id": 103}`` reads as a new user (no ``user_id``): the hint still names ``user_id``."""
    engine = loaded[0].engine
    user, isbn = samples["user"], samples["isbns"][0]
    refused = engine.validate(
        [
            {"action": "recommend", "user": {"id": user}},
            {"action": "recommend", "user": {"user_id": user, "age": 30}},
            {"action": "rate", "user": {"user_id": user}, "books": [{"isbn13": isbn}]},
        ]
    )
    assert [r.field for r in refused] == ["user.id", "user.age", "books[0].isbn13"]
    for refusal in refused[:2]:
        assert all(name in refusal.message for name in ("user_id", *NewUser.model_fields)), refusal
    assert all(name in refused[2].message for name in ("isbn", *NewBook.model_fields)), refused[2]


def test_isbns_are_read_as_training_spelt_them(loaded: tuple[Any, Any], samples: dict) -> None:
    """Training upper-cases and trims the catalog's ISBNs; a request's are read the same way."""
    engine = loaded[0].engine
    isbn = next(i for i in samples["isbns"] if "X" in i)
    spellings = [isbn, isbn.lower(), f" {isbn.lower()} "]
    user = {"user_id": samples["user"]}
    answers = engine.run(
        [
            {"action": "rate", "user": user, "books": [*spellings, *({"isbn": s} for s in spellings)]},
            *(
                {"action": "recommend", "user": {"country": "usa", "ratings": [{"isbn": s, "rating": 8}]}, "k": 5}
                for s in spellings
            ),
        ]
    )
    assert [s for s, _ in answers] == [200] * 4, answers
    predictions = answers[0][1]["predictions"]
    assert {p["isbn"] for p in predictions} == {isbn} and len({p["rating"] for p in predictions}) == 1
    first, *others = (answer["recommendations"] for _, answer in answers[1:])
    for other in others:
        assert [r["isbn"] for r in other] == [r["isbn"] for r in first]
        assert [r["score"] for r in other] == pytest.approx([r["score"] for r in first])


def test_a_validator_failure_is_a_500_refusal_for_that_request_only(
    loaded: tuple[Any, Any], samples: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in validation refuses that body with the internal error, naming no field."""
    handler, context = loaded
    engine = handler.engine
    original = engine.parse

    def fragile(body: Any) -> Any:
        if isinstance(body, dict) and body.get("k") == 7:
            raise RuntimeError("boom")
        return original(body)

    monkeypatch.setattr(engine, "parse", fragile)
    good = {"action": "recommend", "user": {"user_id": samples["user"]}, "k": 2}
    assert engine.validate([{**good, "k": 7}]) == [INTERNAL_ERROR]
    answers = call(handler, context, [good, {**good, "k": 7}, good])
    assert [s for s, _ in answers] == [200, 500, 200]
    assert answers[1][1] == {"error": {"status": 500, "field": None, "message": "internal error; see the model log"}}


def test_an_unexpected_failure_is_a_500_for_that_request_only(
    loaded: tuple[Any, Any], samples: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If scoring itself breaks for one request, the batch is retried one by one."""
    handler, context = loaded
    engine = handler.engine
    original = engine.score

    def fragile(requests: list) -> list:
        if any(getattr(r, "k", None) == 7 for r in requests):
            raise RuntimeError("boom")
        return original(requests)

    monkeypatch.setattr(engine, "score", fragile)
    good = {"action": "recommend", "user": {"user_id": samples["user"]}, "k": 2}
    answers = call(handler, context, [good, {**good, "k": 7}, good])
    assert [s for s, _ in answers] == [200, 500, 200]
    assert answers[1][1]["error"]["status"] == 500


# -------------------------------------------------------------------------------------- schema
def test_json_schema_in_the_docs_is_the_one_the_handler_enforces(tmp_path: Path) -> None:
    """docs/request.schema.json is generated from the models the handler validates with."""
    published = json.loads((REPO / "docs" / "request.schema.json").read_text())
    assert published == request_schema(), "regenerate: python -m handlers.schema --write docs/request.schema.json"
    assert main(["--write", str(tmp_path / "schema.json")]) == 0
    assert json.loads((tmp_path / "schema.json").read_text()) == published


def test_json_schema_states_the_shared_value_ranges_and_default_limits() -> None:
    defs = request_schema()["$defs"]
    age = defs["NewUser"]["properties"]["age"]["anyOf"][0]
    assert (age["minimum"], age["maximum"]) == (AGE_MIN, AGE_MAX)
    year = defs["NewBook"]["properties"]["year"]["anyOf"][0]
    assert (year["minimum"], year["maximum"]) == (YEAR_MIN, YEAR_MAX)
    rating = defs["RatedBook"]["properties"]["rating"]
    assert (rating["minimum"], rating["maximum"]) == (RATING_MIN, RATING_MAX)
    limits = Limits()
    assert defs["RateBody"]["properties"]["books"]["maxItems"] == limits.max_books
    assert defs["NewUser"]["properties"]["ratings"]["maxItems"] == limits.max_ratings
    assert defs["RecommendBody"]["properties"]["k"]["maximum"] == limits.max_k
    assert defs["NewBook"]["properties"]["title"]["maxLength"] == limits.max_string


def test_configured_limits_are_enforced(loaded: tuple[Any, Any], samples: dict) -> None:
    """An archive's ``handler:`` limits replace the defaults the schema states."""
    engine = loaded[0].engine
    user = {"user_id": samples["user"]}
    rate = {"action": "rate", "user": user, "books": samples["isbns"][:3]}
    recommend = {"action": "recommend", "user": user, "k": 6}
    default = engine.limits
    engine.limits = Limits(max_books=2, max_k=5)
    try:
        (s1, a1), (s2, a2), (s3, _) = engine.run([rate, recommend, {**rate, "books": rate["books"][:2]}])
    finally:
        engine.limits = default
    assert (s1, a1["error"]["field"]) == (400, "books"), a1
    assert (s2, a2["error"]["field"]) == (400, "k"), a2
    assert s3 == 200
    assert [s for s, _ in engine.run([rate, recommend])] == [200, 200]


def test_limits_from_the_config_ignore_other_handler_keys_and_refuse_bad_values() -> None:
    """The archive's ``handler:`` section also holds ``profile`` and may hold ``torch_threads``."""
    assert Limits.from_config({"profile": True, "torch_threads": 2, "max_k": 5}) == Limits(max_k=5)
    assert Limits.from_config(None) == Limits()
    with pytest.raises(ValueError):
        Limits.from_config({"profile": True, "max_books": "many"})


def test_each_stage_is_timed_when_the_archive_profiles(
    loaded: tuple[Any, Any], samples: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """``handler: {profile: true}`` (the archive's default) makes TorchServe's ``@timed`` report the
    three stages; BaseHandler.handle reports HandlerTime. The worker prints these lines, which the
    frontend turns into Prometheus metrics (checked against a real server in test_serve.py)."""
    handler, context = loaded
    assert context.model_yaml_config["handler"]["profile"] is True
    body = {"action": "rate", "user": {"user_id": samples["user"]}, "books": samples["isbns"][:2]}
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        assert [s for s, _ in call(handler, context, [body, {"action": "nope"}])] == [200, 400]
    names = {m.split(".")[0] for m in re.findall(r"\[METRICS\](\S+):", caplog.text)}
    assert {"ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess", "HandlerTime"} <= names
    assert "Failed" not in caplog.text, caplog.text


# -------------------------------------------------------------------------------------- parity
def evaluation_pairs(run_dir: Path) -> tuple[Any, np.ndarray]:
    """Test-split and cold-split pairs with the evaluation code's predictions for them."""
    from model.catalog import Catalog
    from train.config import load_config
    from train.rating.dataset import build_training_data
    from train.rating.fit import predict

    cfg = load_config(run_dir / "config.yaml")
    catalog = Catalog.load(run_dir)
    ratings = pq.read_table(run_dir / "data" / "ratings.parquet").to_pandas()
    data = build_training_data(catalog, ratings, cfg.split.folds, cfg.split.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(run_dir / "model_scripted.pt"), map_location="cpu")
    out = []
    for split in ("test", "cold_book", "cold_user"):
        rows = data.splits[split]
        pred = predict(model, data.user_table, data.book_table, rows)
        out += list(zip(rows.user_id.tolist(), rows.isbn.tolist(), pred.tolist(), strict=True))
    return out


def rate_requests(pairs: list[tuple[int, str, float]], max_books: int = 100) -> list[tuple[dict, list[float]]]:
    """One rate request per user (split at ``max_books``) with the expected ratings."""
    by_user: dict[int, list[tuple[str, float]]] = {}
    for user, isbn, expected in pairs:
        by_user.setdefault(int(user), []).append((isbn, expected))
    out = []
    for user, items in by_user.items():
        for start in range(0, len(items), max_books):
            part = items[start : start + max_books]
            body = {"action": "rate", "user": {"user_id": user}, "books": [i for i, _ in part]}
            out.append((body, [e for _, e in part]))
    return out


def test_parity_with_the_evaluation_code(loaded: tuple[Any, Any], tiny_run: Path) -> None:
    """Every test/cold pair scored by the handler equals train.rating.fit.predict on the same pair."""
    handler, context = loaded
    pairs = evaluation_pairs(tiny_run)
    assert len(pairs) > 300
    requests = rate_requests(pairs)
    got, want = [], []
    for start in range(0, len(requests), 32):  # TorchServe batches of up to batchSize requests
        chunk = requests[start : start + 32]
        for (status, answer), (_, expected) in zip(call(handler, context, [b for b, _ in chunk]), chunk, strict=True):
            assert status == 200
            got += [p["rating"] for p in answer["predictions"]]
            want += expected
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_inference_key_is_read_only_once_written_whole(tmp_path: Path) -> None:
    from serving.healthcheck import inference_key

    key_file = tmp_path / "key_file.json"
    assert inference_key(key_file) is None  # not there yet (or token authorization disabled)
    key_file.write_text("")  # TorchServe creates the file before it fills it
    assert inference_key(key_file) is None
    key_file.write_text('{"inference": {"key": "abc"')
    assert inference_key(key_file) is None
    key_file.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "xyz"}}))
    assert inference_key(key_file) == "abc"
