"""Nothing wrong passes the batch job silently: bad id lists, a root output, Ctrl-C and SIGTERM.

Each bad input ends the job before any work with exit code 2 and one line on stderr naming the flag
and the file (and the line or row where there is one), no traceback, nothing written next to the
output and the previous output untouched. A stopped job (a real multi-process job on the tiny run,
stopped while it scores) ends with one line and 128 + the signal's number, its worker processes
gone and its temp folder removed; a later run removes the temp folders of dead runs, naming them,
and leaves those of live ones alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import io
from batch.__main__ import main
from model import layout
from model.artifacts import ModelFolder
from model.catalog import Catalog
from tests.test_batch_dask import many_users

pytestmark = pytest.mark.beam

REPO = Path(__file__).resolve().parents[1]
IN_MEMORY = "--direct_running_mode=in_memory"
STOP_WAIT_S = 120  # bound on a stopped job's exit (it stops in seconds)
SCORING_WAIT_S = 300  # bound on a job's start (loading the model on busy cores)


def batch(model: Path, output: Path | str, *flags: str) -> int:
    return main(["--model", str(model), "--output", str(output), "--no-progress", IN_MEMORY, *flags])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def temp_folders(output: Path) -> list[str]:
    """The run folders and locks beside ``output``."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.tmp-"))


def one_line(err: str) -> str:
    """The single line of stderr, besides this job's own INFO lines; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and " INFO bookrec." not in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def previous(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished output that every failing run below points at again."""
    out = tmp_path_factory.mktemp("previous") / "scores"
    assert batch(tiny_run, out, "--max-users", "3") == 0
    return out


def refused(capsys: pytest.CaptureFixture, tiny_run: Path, output: Path, *flags: str) -> str:
    """Run the job on ``output`` (a finished output); expect exit 2, one line, the output and its
    folder as they were; return the line."""
    before, around = snapshot(output), sorted(p.name for p in output.parent.iterdir())
    capsys.readouterr()
    assert batch(tiny_run, output, *flags) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line(captured.err)
    assert line.startswith("python -m batch: error: "), line
    assert snapshot(output) == before and sorted(p.name for p in output.parent.iterdir()) == around
    return line


def test_bad_id_lists_are_one_line_naming_the_file(tiny_run: Path, previous: Path, tmp_path: Path, capsys) -> None:
    big = tmp_path / "big.txt"
    big.write_text("user_id\n12\n99999999999999999999\n")
    line = refused(capsys, tiny_run, previous, "--users", str(big))
    assert f"--users {big} line 3: 99999999999999999999 is out of range for a user_id" in line

    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"user_id": ["12", "abc"]}), strings)
    line = refused(capsys, tiny_run, previous, "--users", str(strings))
    assert f"--users {strings}: column 'user_id' holds string, not integers" in line

    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"user_id": list(range(100))}), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40] + b"PAR1")  # a Parquet head and tail, no body
    line = refused(capsys, tiny_run, previous, "--users", str(corrupt))
    assert f"--users {corrupt}: not a readable Parquet file" in line

    books = tmp_path / "books.parquet"
    pq.write_table(pa.table({"isbn": [1, 2]}), books)  # ISBNs as numbers: leading zeros lost
    assert f"--books {books}: column 'isbn' holds int64, not strings" in refused(
        capsys, tiny_run, previous, "--books", str(books)
    )

    for flag, column in (("--users", "user_id"), ("--books", "isbn")):
        empty = tmp_path / f"empty{flag}.txt"
        empty.write_text("")
        line = refused(capsys, tiny_run, previous, flag, str(empty))
        assert f"{flag} {empty}: no {column} values in the file" in line
        header_only = tmp_path / f"header{flag}.parquet"
        pq.write_table(
            pa.table({column: pa.array([], pa.int64() if column == "user_id" else pa.string())}), header_only
        )
        line = refused(capsys, tiny_run, previous, flag, str(header_only))
        assert f"{flag} {header_only}: no {column} values in the file" in line

    for flag, column in (("--user-features", "user_id"), ("--book-features", "isbn")):
        empty = tmp_path / f"empty{flag}.parquet"
        ids = pa.array([], pa.int64() if column == "user_id" else pa.string())
        pq.write_table(pa.table({column: ids, "features": pa.array([], pa.list_(pa.float32()))}), empty)
        assert f"{flag} {empty}: no rows" in refused(capsys, tiny_run, previous, flag, str(empty))


def test_root_output_is_refused(tiny_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``--output /`` once wrote into the current folder (``"/".rstrip("/")`` is ``""``)."""
    monkeypatch.chdir(tmp_path)
    for root in ("/", "//", "file:///"):
        assert batch(tiny_run, root) == 2
        line = one_line(capsys.readouterr().err)
        message = f"--output {root}: a filesystem root cannot be the output; name a folder inside it"
        assert line == f"python -m batch: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0(capsys) -> None:
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: python -m batch") and "--users" in captured.out and captured.err == ""


def test_books_are_normalised_as_training_normalises_isbns(tiny_run: Path, tmp_path: Path) -> None:
    """Training upper-cases ISBNs ('039592720x' is '039592720X'); a --books list in lower case and
    quotes finds the same books, and _SUCCESS says the ranking stage ordered the lists."""
    catalog = Catalog.load(tiny_run)
    isbns = [i for i in catalog.books["isbn"].tolist() if i.endswith("X")][:2]
    assert len(isbns) == 2
    books = tmp_path / "books.txt"
    books.write_text(f'isbn\n{isbns[0].lower()}\n "{isbns[1].lower()}"\n{isbns[0]}\n')
    out = tmp_path / "scores"
    assert batch(tiny_run, out, "--books", str(books), "--max-users", "3", "--mode", "topk", "--k", "2") == 0
    summary = json.loads((out / io.SUCCESS).read_text())
    assert (summary["books_requested"], summary["dead_letters"]) == (2, 0)
    assert sorted(set(pq.read_table(out)["isbn"].to_pylist())) == sorted(isbns)
    assert summary["variant"] == "scripted" and summary["ranking_stage"] is True
    assert summary["ranked_by"].startswith("the ranking stage")

    # A --book-features file with the ISBNs in lower case: the same books again.
    rows = [catalog.book_index[i] for i in isbns]
    features = tmp_path / "books.parquet"
    column = pa.array(list(catalog.book_feats.numpy()[rows]), pa.list_(pa.float32()))
    pq.write_table(pa.table({"isbn": [i.lower() for i in isbns], "features": column}), features)
    out = tmp_path / "from-features"
    assert batch(tiny_run, out, "--books", str(books), "--book-features", str(features), "--max-users", "3") == 0
    summary = json.loads((out / io.SUCCESS).read_text())
    assert (summary["books_requested"], summary["dead_letters"], summary["rows"]) == (2, 0, 6)
    assert sorted(set(pq.read_table(out)["isbn"].to_pylist())) == sorted(isbns)


def test_success_says_which_path_ranked(tiny_run: Path, tmp_path: Path) -> None:
    """Without a ranking stage (a copy of the run without its files) top-k lists come from the
    retrieval blend, and --mode all ranks nothing: _SUCCESS says so."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny_run.iterdir():
        if path.name not in (*layout.RANKING_FILES, layout.MANIFEST_FILE):
            (bare / path.name).symlink_to(path)
    ModelFolder(bare).write_manifest()  # a model trained without a ranking stage
    assert batch(bare, tmp_path / "topk", "--max-users", "2", "--mode", "topk", "--variant", "int8") == 0
    summary = json.loads((tmp_path / "topk" / io.SUCCESS).read_text())
    assert (summary["variant"], summary["model_file"], summary["ranking_stage"]) == ("int8", "model_int8.pt", False)
    assert summary["ranked_by"].startswith("no ranking stage")
    assert batch(tiny_run, tmp_path / "all", "--max-users", "2") == 0
    summary = json.loads((tmp_path / "all" / io.SUCCESS).read_text())
    assert summary["ranking_stage"] is False and summary["ranked_by"].startswith("none: every pair")


@pytest.fixture(scope="module")
def users(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--user-features for 20,000 users: a job long enough to be stopped while it scores."""
    return many_users(tiny_run, tmp_path_factory.mktemp("many-users") / "users.parquet", 20_000)


def start_job(tiny_run: Path, users: Path, output: Path, log: Path) -> subprocess.Popen:
    """A real multi-process job (2 SDK worker processes) as its own process, waited for until it
    scores (a shard's attempt file exists in its temp folder)."""
    argv = ["--model", str(tiny_run), "--output", str(output), "--mode", "topk", "--user-features", str(users)]
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batch", *argv, "--no-progress", "--workers", "2"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # a process group of its own, as a terminal gives a command
        )
    deadline = time.monotonic() + SCORING_WAIT_S
    while not list(output.parent.glob(f".{output.name}.tmp-*/attempt-*.parquet")):
        assert proc.poll() is None, f"the job ended before it scored: {log.read_text()}"
        assert time.monotonic() < deadline, f"the job did not start scoring: {log.read_text()}"
        time.sleep(0.2)
    return proc


def end(proc: subprocess.Popen) -> None:
    """Kill a job a failed test left running, its workers with it (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_WAIT_S)


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still alive (a zombie waiting for its reaper is not)."""
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop(proc: subprocess.Popen, signum: int, log: Path) -> str:
    """Send ``signum`` to a scoring job (SIGINT to its whole process group, as Ctrl-C in a terminal
    does; SIGTERM to the job alone, as ``kill`` does); check it stops its workers and ends with
    128 + signum and one line; return that line."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers  # the SDK workers (and the shells that start them)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    assert proc.wait(timeout=STOP_WAIT_S) == 128 + signum, log.read_text()
    deadline = time.monotonic() + STOP_WAIT_S
    while running(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(workers), f"worker processes left: {running(workers)}"
    return one_line(log.read_text())


@pytest.fixture
def stale(tmp_path: Path) -> Iterator[Path]:
    """The temp folder a killed run left beside ``tmp_path/scores``: its lock file, held by nobody."""
    folder = tmp_path / ".scores.tmp-deadbeef0000"
    (folder / "_progress").mkdir(parents=True)
    (folder / io.RUN_LOG).write_text("the log of a run that was killed\n")
    Path(f"{folder}.lock").touch()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_sigterm_stops_the_job_and_a_later_run_removes_only_dead_runs_temp_folders(
    tiny_run: Path, users: Path, tmp_path: Path, stale: Path, caplog
) -> None:
    out = tmp_path / "scores"
    log = tmp_path / "job.err"
    proc = start_job(tiny_run, users, out, log)
    try:
        assert stale.name not in temp_folders(out)  # the job removed it at its start
        live = temp_folders(out)
        assert len(live) == 2 and live[1] == f"{live[0]}.lock", live

        # A second run into the same output while the first scores: it removes a dead run's
        # folder (named in its log) and leaves the live one's.
        (stale / "_progress").mkdir(parents=True)
        Path(f"{stale}.lock").touch()
        with caplog.at_level("INFO", logger="bookrec.batch"):
            assert batch(tiny_run, out, "--max-users", "3") == 0
        assert f"removed 1 temp folder(s) of earlier runs that did not finish: {stale}" in caplog.text
        assert temp_folders(out) == live
        before = snapshot(out)

        line = stop(proc, signal.SIGTERM, log)
    finally:
        end(proc)
    assert line == f"python -m batch: stopped by SIGTERM; the previous output {out} is unchanged"
    assert temp_folders(out) == []
    assert snapshot(out) == before


def test_ctrl_c_stops_the_job_with_one_line(tiny_run: Path, users: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    log = tmp_path / "job.err"
    proc = start_job(tiny_run, users, out, log)
    try:
        line = stop(proc, signal.SIGINT, log)
    finally:
        end(proc)
    assert line == f"python -m batch: stopped by SIGINT; nothing was written to {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.err"]


def test_a_live_runs_lock_keeps_its_temp_folder(tmp_path: Path) -> None:
    """The rule the job relies on, on its own: a folder whose lock is held stays, one whose lock is
    free (or missing) goes, with its lock."""
    out = tmp_path / "scores"
    held, free, bare = (tmp_path / f".scores.tmp-{name}" for name in ("a", "b", "c"))
    for folder in (held, free, bare):
        folder.mkdir()
    Path(f"{free}.lock").touch()
    with open(f"{held}.lock", "a") as lock:  # as a running job holds it (another open file: flock conflicts)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert io.remove_stale_temp_dirs(str(out)) == [str(free), str(bare)]
    assert temp_folders(out) == [held.name, f"{held.name}.lock"]
