"""Nothing wrong passes silently: a model folder is verified against its manifest before the archive
tool packs it, the handler's engine loads it or the batch job scores with it.

Every case works on a copy of the session's tiny run (never the fixture itself): each file the model
needs is removed, truncated, emptied or replaced by random bytes of the same size in turn, and every
consumer refuses it by name; a good archive in the store is left untouched by a refused build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batch.model_source import ModelError, resolve
from handlers.engine import BookrecEngine
from model import layout
from model.artifacts import CorruptModelFolder, IncompleteModelFolder, ModelFolder, ModelFolderError
from serving import archive
from tests.conftest import REPO

# The files of the tiny run's model the handler and the batch job load (the encoder's listed apart:
# its file names are the encoder's own).
LOADED = (
    layout.MODEL_FILES[layout.SHIPPED_VARIANT],
    *layout.SCORING_FILES,
    *layout.catalog_feature_paths(),
    *layout.RANKING_FILES,
)
DAMAGE = ("missing", "truncated", "empty", "random")


def damage(path: Path, how: str) -> None:
    """Break one file the way a careless copy or a bad disk does."""
    size = path.stat().st_size
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # the same size, other bytes: only the hash tells
        path.write_bytes(os.urandom(size))


def model_copy(tiny_run: Path, dest: Path) -> Path:
    """A copy of the tiny run's model folder (its data tables left out)."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns(layout.DATA_DIR, layout.DISTILL_DIR))
    return dest


def archive_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = archive.main([*args, "--workers", "1"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def good_mar(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good archive of the tiny run: what a refused build must leave in the store."""
    return archive.build_archive(tiny_run, tmp_path_factory.mktemp("good-store"), workers=1)


def store_with(good_mar: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy2(good_mar, dest / good_mar.name)
    return dest


def test_training_writes_a_manifest_that_verifies(tiny_run: Path) -> None:
    folder = ModelFolder(tiny_run)
    record = folder.read_manifest()
    assert record["stages"] == {"ranking": True, "encoder": record["stages"]["encoder"], "index": None}
    assert set(LOADED) <= set(record["files"])
    assert layout.encoder_path(layout.ENCODER_CONFIG) in record["files"]
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in record["files"].values())
    folder.verify(serving=True)
    for variant in layout.MODEL_FILES:
        folder.verify(variant)


def needed(tiny_run: Path) -> list[str]:
    encoder = sorted(str(p.relative_to(tiny_run)) for p in (tiny_run / layout.ENCODER_DIR).rglob("*") if p.is_file())
    return [*LOADED, *encoder]


@pytest.mark.parametrize("how", DAMAGE)
def test_every_damaged_file_is_refused_by_name_by_every_consumer(
    tiny_run: Path, good_mar: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """For each needed file in turn: the archive tool exits 2 with one line naming it and leaves the
    store's .mar as it was; the engine (the handler's load) and the batch job's model source refuse
    it by name before loading anything."""
    for i, name in enumerate(needed(tiny_run)):
        run = model_copy(tiny_run, tmp_path / f"run{i}")
        damage(run / name, how)
        store = store_with(good_mar, tmp_path / f"store{i}")
        code, err = archive_cli("--run-dir", str(run), "--out", str(store), capsys=capsys)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and name in err, err
        assert sorted(os.listdir(store)) == [good_mar.name], name  # no temporary file left
        assert (store / good_mar.name).read_bytes() == good_mar.read_bytes(), name
        with pytest.raises(ModelFolderError, match=name.replace(".", r"\.")):
            BookrecEngine(run)
        if not name.startswith(f"{layout.ENCODER_DIR}/"):  # the batch job embeds no text: no encoder to check
            with pytest.raises(ModelError, match=name.replace(".", r"\.")):
                resolve(str(run))


def test_a_changed_file_names_the_hash_and_a_truncated_one_its_size(tiny_run: Path, tmp_path: Path) -> None:
    run = model_copy(tiny_run, tmp_path / "run")
    damage(run / layout.catalog_path(layout.BOOKS_FILE), "random")
    damage(run / layout.RETRIEVAL_FILE, "truncated")
    with pytest.raises(CorruptModelFolder) as refused:
        ModelFolder(run).verify()
    message = str(refused.value)
    assert "catalog/books.parquet: SHA-256 differs from the manifest (file changed or corrupt)" in message
    assert f"{layout.RETRIEVAL_FILE}: " in message and "(file changed or truncated)" in message


def test_a_valid_but_changed_file_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    """Ranking settings rewritten to turn the stage off still load and give other lists: only the
    verification tells (without it, this folder would be served)."""
    run = model_copy(tiny_run, tmp_path / "run")
    settings = json.loads((run / layout.RANKING_SETTINGS).read_text())
    (run / layout.RANKING_SETTINGS).write_text(json.dumps({**settings, "enabled": False}))
    assert ModelFolder(run).ranking_settings().enabled is False  # a file that loads fine
    with pytest.raises(CorruptModelFolder, match=f"{layout.RANKING_SETTINGS}: .*file changed"):
        ModelFolder(run).verify()


def batch_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.beam
def test_the_ranking_stage_all_removed_is_refused(
    tiny_run: Path, good_mar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model made with a ranking stage never loads without one: archive, engine and the batch CLI."""
    run = model_copy(tiny_run, tmp_path / "run")
    for name in layout.RANKING_FILES:
        (run / name).unlink()
    ModelFolder(run).check()  # complete as far as file names go: a model without the stage
    store = store_with(good_mar, tmp_path / "store")
    code, err = archive_cli("--run-dir", str(run), "--out", str(store), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "has a ranking stage" in err, err
    assert (store / good_mar.name).read_bytes() == good_mar.read_bytes()
    with pytest.raises(CorruptModelFolder, match="has a ranking stage"):
        BookrecEngine(run)
    proc = batch_cli("--model", str(run), "--output", str(tmp_path / "out"), "--mode", "topk", "--k", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "has a ranking stage" in proc.stderr and all(name in proc.stderr for name in layout.RANKING_FILES)
    assert not (tmp_path / "out").exists()


@pytest.mark.beam
@pytest.mark.parametrize(
    "name, how",
    [
        (layout.MODEL_FILES[layout.SHIPPED_VARIANT], "truncated"),
        (layout.catalog_path(layout.BOOKS_FILE), "empty"),
        (layout.RANKER_FILE, "random"),
    ],
)
def test_the_batch_cli_refuses_a_damaged_model_in_one_line(tiny_run: Path, tmp_path: Path, name: str, how: str) -> None:
    run = model_copy(tiny_run, tmp_path / "run")
    damage(run / name, how)
    proc = batch_cli("--model", str(run), "--output", str(tmp_path / "out"), "--mode", "topk", "--k", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "PytorchStreamReader" not in proc.stderr


def test_a_folder_without_manifest_is_refused_until_one_is_written(
    tiny_run: Path, good_mar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = model_copy(tiny_run, tmp_path / "run")
    (run / layout.MANIFEST_FILE).unlink()
    with pytest.raises(CorruptModelFolder, match="--write-manifest"):
        BookrecEngine(run)
    store = store_with(good_mar, tmp_path / "store")
    code, err = archive_cli("--run-dir", str(run), "--out", str(store), capsys=capsys)
    assert code == 2 and "retrain" in err and "--write-manifest" in err, err
    assert archive.main(["--write-manifest", str(run)]) == 0
    assert json.loads((run / layout.MANIFEST_FILE).read_text()) == ModelFolder(tiny_run).read_manifest()


def test_an_unfinished_run_is_one_line_and_verbose_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    code, err = archive_cli("--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "store"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "missing model_scripted.pt" in err, err
    with pytest.raises(IncompleteModelFolder):
        archive.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "store"), "--verbose"])


def test_a_good_build_replaces_the_archive_and_leaves_no_temporary_file(
    tiny_run: Path, good_mar: Path, tmp_path: Path
) -> None:
    store = store_with(good_mar, tmp_path / "store")
    (store / good_mar.name).write_bytes(b"an old archive")
    path = archive.build_archive(tiny_run, store, workers=1)
    assert sorted(os.listdir(store)) == [good_mar.name]
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(path, unpacked, format="zip")
    ModelFolder(unpacked).verify(serving=True)
    shipped = ModelFolder(unpacked).read_manifest()
    assert layout.MODEL_FILES["fp32"] not in shipped["files"]  # the run folder's other variants stay there
    assert shipped["stages"] == ModelFolder(tiny_run).read_manifest()["stages"]


def test_an_archive_that_does_not_verify_is_not_installed(tmp_path: Path) -> None:
    """The check the tool runs on the archive it wrote, before it replaces the store's."""
    (tmp_path / "bookrec.mar").write_bytes(b"not a zip")
    with pytest.raises(archive.ArchiveError, match="cannot be read back"):
        archive._check_archive(tmp_path / "bookrec.mar")


def test_a_step_refreshes_the_manifest_or_drops_a_stale_one(tiny_run: Path, tmp_path: Path) -> None:
    """What ``run_step`` does after a model step: a complete folder's manifest records its files as
    they are now; a folder left incomplete keeps no manifest vouching for it."""
    from train.run_folder import refresh_manifest

    run = model_copy(tiny_run, tmp_path / "run")
    damage(run / layout.BOOK_VECTORS, "random")  # a step rewrote the file
    refresh_manifest(run)
    ModelFolder(run).verify(serving=True)
    (run / layout.RETRIEVAL_FILE).unlink()
    assert refresh_manifest(run) is None and not (run / layout.MANIFEST_FILE).exists()


def _changed_vectors(good_mar: Path, dest: Path) -> None:
    """``good_mar`` with its book vectors negated: the same shape and size, loadable, wrong answers."""
    import io
    import zipfile

    import numpy as np

    with zipfile.ZipFile(good_mar) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == layout.BOOK_VECTORS:
                buffer = io.BytesIO()
                np.save(buffer, -np.load(io.BytesIO(data)))
                assert len(buffer.getvalue()) == len(data)
                data = buffer.getvalue()
            out.writestr(item, data)


@pytest.mark.torchserve
def test_torchserve_never_serves_an_archive_with_a_changed_model_file(
    tiny_run: Path, good_mar: Path, tmp_path: Path
) -> None:
    """One real TorchServe, one store: the good archive and a copy whose book vectors changed after
    packing. The changed one's worker refuses to start, its log naming the file, and the model never
    answers a prediction; the good one serves."""
    import time

    import requests

    from serving.examples import examples
    from serving.local_server import LocalServer

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy2(good_mar, store / "good.mar")
    _changed_vectors(good_mar, store / "bad.mar")
    body = next(body for _, body in examples(tiny_run) if body["action"] == "recommend")
    srv = LocalServer(store, tmp_path / "ts", archive="good=good.mar bad=bad.mar")
    srv.start(timeout=240, model="good", healthy=False)  # /ping is unhealthy while `bad` has no worker
    try:

        def ask(model: str) -> requests.Response:
            url = f"{srv.inference_url}/predictions/{model}"
            return requests.post(url, json=body, headers=srv.headers(), timeout=60)

        def ask_bad() -> int | str:
            """Its status, or "no answer" when TorchServe holds the request for a worker that never comes."""
            try:
                url = f"{srv.inference_url}/predictions/bad"
                return requests.post(url, json=body, headers=srv.headers(), timeout=15).status_code
            except requests.Timeout:
                return "no answer"

        good = ask("good")
        assert good.status_code == 200 and len(good.json()["recommendations"]) == body["k"], good.text
        refusal = f"{layout.BOOK_VECTORS}: SHA-256 differs from the manifest"
        log = srv.logs / "model_log.log"
        deadline = time.monotonic() + 120
        answers = []
        while not (log.is_file() and refusal in log.read_text(errors="replace")):
            assert time.monotonic() < deadline, srv.log_tail()
            answers.append(ask_bad())
            time.sleep(2)
        answers += [ask_bad() for _ in range(2)]
        assert 200 not in answers, answers
        assert not [w for w in srv.workers("bad") if w.get("status") == "READY"]
        assert ask("good").json() == good.json()
    finally:
        srv.stop()


def test_verifying_hashes_while_the_body_loads_and_names_a_changed_file(tiny_run: Path, tmp_path: Path) -> None:
    """``verifying`` (the handler's and the engine's): a truncated file is refused before the body
    runs; a changed one after it, also in place of the error a body that failed on it raised; an
    intact folder lets the body's own error through."""
    changed = model_copy(tiny_run, tmp_path / "changed")
    damage(changed / layout.BOOK_VECTORS, "random")
    ran = []
    with pytest.raises(CorruptModelFolder, match=f"{layout.BOOK_VECTORS}: SHA-256 differs"):
        with ModelFolder(changed).verifying(serving=True):
            ran.append("loaded")
    assert ran == ["loaded"]
    with pytest.raises(CorruptModelFolder, match=f"{layout.BOOK_VECTORS}: SHA-256 differs") as refused:
        with ModelFolder(changed).verifying(serving=True):
            raise RuntimeError("the load failed on the changed file")
    assert isinstance(refused.value.__context__, RuntimeError)
    with pytest.raises(RuntimeError, match="unrelated"), ModelFolder(tiny_run).verifying(serving=True):
        raise RuntimeError("unrelated")

    truncated = model_copy(tiny_run, tmp_path / "truncated")
    damage(truncated / layout.BOOK_VECTORS, "truncated")
    ran = []
    with pytest.raises(CorruptModelFolder, match="file changed or truncated"):
        with ModelFolder(truncated).verifying(serving=True):
            ran.append("loaded")
    assert ran == []
