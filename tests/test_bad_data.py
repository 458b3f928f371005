"""Bad input to the data step: each case fails with one line naming the file (exit 2) and leaves the
previous good run folder (data/, config.yaml, fingerprint.json) as it was; nothing wrong passes silently."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.__main__ import main
from train.config import load_config
from train.data.download import DatasetUnavailable
from train.data.ingest import DataError, read_bookcrossing
from train.data.sample import write_sample
from train.data.step import _replaced_folder, locate_data
from train.evaluation.step import data_line

from .conftest import REPO

UNREACHABLE = "http://127.0.0.1:9/x.zip"


def _args(run: Path, source: Path | str | None, *sets: str) -> list[str]:
    """``python -m train data`` arguments that never reach the network."""
    out = ["data", "--quiet", "--run-dir", str(run), "--set", f"data.url={UNREACHABLE}"]
    out += ["--set", f"data.download_dir={run.parent / 'download'}"]
    if source is not None:
        out += ["--set", f"data.source={source}"]
    for item in sets:
        out += ["--set", item]
    return out


def _snapshot(run: Path) -> dict[str, str]:
    """Every file under the run folder (hidden leftovers included) with its content hash."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A good Kaggle sample and a run folder made from it by the data step."""
    root = tmp_path_factory.mktemp("good")
    write_sample(root / "csv", n_users=60, n_books=50, n_ratings=600, malformed=False)
    assert main(_args(root / "run", root / "csv")) == 0
    return root


@pytest.fixture
def case(good: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the good CSVs to break, a copy of the good run folder)."""
    shutil.copytree(good / "csv", tmp_path / "csv")
    shutil.copytree(good / "run", tmp_path / "run")
    return tmp_path / "csv", tmp_path / "run"


def _fails(argv: list[str], run: Path, capsys, *names: str) -> str:
    """Run the command in-process: exit 2, one ``error:`` line naming ``names``, the run folder untouched."""
    before = _snapshot(run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    for name in names:
        assert name in errors[0], errors[0]
    assert _snapshot(run) == before
    return errors[0]


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _write_rows(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    path.write_bytes(text.getvalue().encode(encoding))


# --- data that leaves a table empty ---------------------------------------------


@pytest.mark.parametrize("name", ["Ratings.csv", "Users.csv", "Books.csv"])
def test_header_only_file_fails(case, capsys, name: str) -> None:
    csv_dir, run = case
    path = csv_dir / name
    path.write_text(path.read_text(encoding="utf-8").splitlines()[0] + "\r\n", encoding="utf-8")
    _fails(_args(run, csv_dir), run, capsys, str(path), "no data rows")


def test_ratings_of_unknown_books_fail(case, capsys) -> None:
    csv_dir, run = case
    rows = _rows(csv_dir / "Ratings.csv")
    _write_rows(csv_dir / "Ratings.csv", [rows[0]] + [[u, f"X{i:09d}", r] for i, (u, _, r) in enumerate(rows[1:])])
    line = _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Ratings.csv"), "no ratings kept")
    assert f"unknown_isbn (not in Books.csv) {len(rows) - 1}" in line


def test_only_implicit_ratings_leave_no_training_split(case, capsys) -> None:
    csv_dir, run = case
    rows = _rows(csv_dir / "Ratings.csv")
    _write_rows(csv_dir / "Ratings.csv", [rows[0]] + [[u, isbn, "0"] for u, isbn, _ in rows[1:]])
    _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Ratings.csv"), "no training ratings", "implicit")


# --- files the reader cannot read -----------------------------------------------


def test_missing_column_fails(case, capsys) -> None:
    csv_dir, run = case
    _write_rows(csv_dir / "Ratings.csv", [[u, isbn] for u, isbn, _ in _rows(csv_dir / "Ratings.csv")])
    _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Ratings.csv"), "lacks column(s) ['rating']")


def test_empty_file_fails(case, capsys) -> None:
    csv_dir, run = case
    (csv_dir / "Users.csv").write_bytes(b"")
    _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Users.csv"), "empty file")


def test_wrong_delimiter_fails(case, capsys) -> None:
    csv_dir, run = case
    lines = [";".join(row) for row in _rows(csv_dir / "Ratings.csv")]
    (csv_dir / "Ratings.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Ratings.csv"), "';'-separated")


def test_latin1_kaggle_books_fail(case, capsys) -> None:
    csv_dir, run = case
    rows = _rows(csv_dir / "Books.csv")
    rows[1:] = [[isbn, f"Les Misérables {i}", *rest] for i, (isbn, _, *rest) in enumerate(rows[1:])]
    _write_rows(csv_dir / "Books.csv", rows, encoding="latin-1")
    line = _fails(_args(run, csv_dir), run, capsys, str(csv_dir / "Books.csv"), "not valid UTF-8", "iconv")
    assert f"{len(rows) - 1} of {len(rows) - 1} rows" in line


def test_a_few_undecodable_rows_are_counted_and_kept(tmp_path: Path, caplog) -> None:
    write_sample(tmp_path, n_users=100, n_books=150, n_ratings=600, malformed=False)
    rows = _rows(tmp_path / "Books.csv")
    rows[5][1] = "Les Misérables"
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    lines = text.getvalue().split("\r\n")
    data = "\r\n".join(lines[:5]).encode() + b"\r\n" + lines[5].encode("latin-1") + b"\r\n"
    (tmp_path / "Books.csv").write_bytes(data + "\r\n".join(lines[6:]).encode())
    with caplog.at_level(logging.WARNING, logger="bookrec.ingest"):
        raw = read_bookcrossing(tmp_path, progress=False)
    assert raw.report.counts["books.soft.undecodable_rows"] == 1
    assert "Books.csv: 1 of 150 rows are not valid UTF-8 (first at line 6)" in caplog.text
    assert raw.books.set_index("isbn").loc[rows[5][0], "title"] == "Les Mis\ufffdrables"


def test_truncated_last_line_is_a_counted_bad_row(tmp_path: Path, caplog) -> None:
    write_sample(tmp_path, n_users=30, n_books=30, n_ratings=200, malformed=False)
    rows = _rows(tmp_path / "Ratings.csv")
    rated = {(u, isbn) for u, isbn, _ in rows[1:]}
    user = _rows(tmp_path / "Users.csv")[1][0]
    isbn = next(b[0] for b in _rows(tmp_path / "Books.csv")[1:] if (user, b[0]) not in rated)
    with (tmp_path / "Ratings.csv").open("a", encoding="utf-8", newline="") as fh:
        fh.write(f"{user},{isbn},1")  # "...,10\r\n" cut short
    with caplog.at_level(logging.WARNING, logger="bookrec.ingest"):
        raw = read_bookcrossing(tmp_path, progress=False)
    assert raw.report.counts["ratings.bad.unterminated_last_line"] == 1
    assert raw.report.bad_rows("ratings") == 1
    assert len(raw.ratings) == len(rows) - 1
    assert not ((raw.ratings.user_id == int(user)) & (raw.ratings.isbn == isbn)).any()
    assert f"Ratings.csv: line {len(rows) + 1}, the last, has no line break" in caplog.text


def test_both_layouts_in_one_folder_fail(case, capsys) -> None:
    csv_dir, run = case
    write_sample(csv_dir, "original", n_users=10, n_books=10, n_ratings=20, malformed=False)
    _fails(_args(run, csv_dir), run, capsys, str(csv_dir), "Ratings.csv", "BX-Book-Ratings.csv", "both layouts")


# --- where the data comes from --------------------------------------------------


@pytest.mark.parametrize("broken", ["missing", "misnamed"])
def test_configured_source_never_falls_back_to_the_sample(case, capsys, broken: str) -> None:
    csv_dir, run = case
    if broken == "missing":
        source, expected = csv_dir.parent / "nothing-here", "no such folder"
    else:
        (csv_dir / "Ratings.csv").rename(csv_dir / "Rating.csv")
        source, expected = csv_dir, "found Books.csv, Rating.csv, Users.csv"
    _fails(_args(run, source, "data.sample_if_missing=true"), run, capsys, str(source), expected)
    assert not (run / "sample-csv").exists()


def test_sample_stands_in_only_when_no_data_is_named(tmp_path: Path, monkeypatch) -> None:
    overrides = [f"data.url={UNREACHABLE}", f"data.download_dir={tmp_path / 'dl'}", "data.sample_if_missing=true"]
    monkeypatch.delenv("BOOKREC_DATA", raising=False)
    cfg = load_config(None, overrides)
    assert locate_data(cfg, tmp_path / "run") == tmp_path / "run" / "sample-csv"
    monkeypatch.setenv("BOOKREC_DATA", str(tmp_path / "stale"))
    with pytest.raises(DatasetUnavailable, match="BOOKREC_DATA"):
        locate_data(cfg, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_demo_config_falls_back_to_the_sample(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BOOKREC_DATA", raising=False)
    argv = _args(tmp_path / "run", None, "data.sample_users=40", "data.sample_books=30", "data.sample_ratings=300")
    assert main([*argv, "--config", str(REPO / "configs" / "demo.yaml")]) == 0
    assert (tmp_path / "run" / "data" / "ratings.parquet").is_file()
    assert (tmp_path / "run" / "sample-csv" / "Ratings.csv").is_file()
    # The demo's evaluation.md opens with this line: it says the sample stood in.
    assert data_line(tmp_path / "run").startswith("Data: the generated Book-Crossing sample")


# --- the config -----------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(case, capsys) -> None:
    csv_dir, run = case
    config = run.parent / "broken.yaml"
    config.write_text("train:\n  epochs: [1, 2\n")
    line = _fails([*_args(run, csv_dir), "--config", str(config)], run, capsys, f"{config}:3:1", "not valid YAML")
    assert line.startswith("error: bad config:")
    _fails([*_args(run, csv_dir), "--set", "train.epochs=[1,"], run, capsys, "override 'train.epochs=[1,'")


def test_top_level_list_names_the_file(case, capsys) -> None:
    csv_dir, run = case
    config = run.parent / "list.yaml"
    config.write_text("- train\n- data\n")
    _fails([*_args(run, csv_dir), "--config", str(config)], run, capsys, str(config), "must be a mapping")
    with pytest.raises(ValueError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(config, ["train.epochs=1"])


def test_verbose_shows_the_traceback(case) -> None:
    csv_dir, run = case
    (csv_dir / "Users.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"Users\.csv: empty file"):
        main([*_args(run, csv_dir), "--verbose"])


# --- the command line and the run folder ----------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    assert all(name in errors[0] for name in names), errors[0]


@pytest.mark.training  # a `python -m train` process of its own
def test_cli_bad_data_and_bad_yaml_exit_2_with_one_line(case) -> None:
    csv_dir, run = case
    (csv_dir / "Ratings.csv").write_text("User-ID,ISBN,Book-Rating\r\n", encoding="utf-8")
    before = _snapshot(run)
    _one_error_line(_cli(*_args(run, csv_dir)), str(csv_dir / "Ratings.csv"))
    config = run.parent / "broken.yaml"
    config.write_text("data: {source: [\n")
    _one_error_line(_cli(*_args(run, csv_dir), "--config", str(config)), f"{config}:2:1")
    assert _snapshot(run) == before


def test_a_good_rerun_replaces_the_data_and_leaves_no_temporary_folder(case, tmp_path: Path) -> None:
    run = case[1]
    write_sample(tmp_path / "other", n_users=40, n_books=40, n_ratings=300, seed=3, malformed=False)
    before = _snapshot(run)
    assert main(_args(run, tmp_path / "other")) == 0
    after = _snapshot(run)
    assert set(after) == set(before)
    assert {k for k in after if after[k] != before[k]} >= {"data/ratings.parquet", "fingerprint.json", "config.yaml"}
    assert load_config(run / "config.yaml").data.source == str(tmp_path / "other")


def test_failed_writes_leave_the_folder_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.parquet").write_text("old")
    with pytest.raises(OSError), _replaced_folder(tmp_path / "data") as new:
        (new / "t.parquet").write_text("new")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert (tmp_path / "data" / "t.parquet").read_text() == "old"


def test_a_failed_data_step_removes_the_run_folder_it_made(case, tmp_path: Path, capsys) -> None:
    """A new run folder (and the parents made for it) goes with a failed data step; an existing one,
    even empty, stays."""
    csv_dir = case[0]
    (csv_dir / "Ratings.csv").write_text("User-ID,ISBN,Book-Rating\r\n", encoding="utf-8")
    new = tmp_path / "new" / "runs" / "r"
    for source in (tmp_path / "missing", csv_dir):
        assert main(_args(new, source)) == 2
        assert not (tmp_path / "new").exists(), sorted(tmp_path.rglob("*"))
    (tmp_path / "empty").mkdir()
    _fails(_args(tmp_path / "empty", csv_dir), tmp_path / "empty", capsys, str(csv_dir / "Ratings.csv"))
    assert (tmp_path / "empty").is_dir()


def _one_line(err: str, *names: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert all(name in errors[0] for name in names), errors[0]


def test_download_and_sweep_end_bad_data_with_one_line(case, tmp_path: Path, capsys) -> None:
    """``python -m train.data.download`` and ``python -m train sweep`` on a folder with both layouts, an
    empty ratings file, or a config that is not YAML: one ``error:`` line naming the file, exit 2, no
    run folder left; ``--verbose`` raises."""
    from train.data.download import main as download
    from train.experiments.sweep import main as sweep

    csv_dir = case[0]
    both = tmp_path / "both"
    shutil.copytree(csv_dir, both)
    for name in ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv"):
        (both / name).write_text("")
    capsys.readouterr()
    assert download(["--source", str(both), "--dest", str(tmp_path / "dl")]) == 2
    _one_line(capsys.readouterr().err, str(both), "both layouts")
    with pytest.raises(DataError):
        download(["--source", str(both), "--dest", str(tmp_path / "dl"), "--verbose"])

    (csv_dir / "Ratings.csv").write_text("User-ID,ISBN,Book-Rating\r\n", encoding="utf-8")
    run = tmp_path / "sweep-run"
    args = ["--trials", "1", "--quiet", "--set", f"data.source={csv_dir}", "--set", f"run_dir={run}"]
    assert sweep(args) == 2
    _one_line(capsys.readouterr().err, str(csv_dir / "Ratings.csv"), "no ratings")
    assert not run.exists()
    with pytest.raises(DataError):
        sweep([*args, "--verbose"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: [\n")
    assert sweep(["--config", str(bad)]) == 2
    _one_line(capsys.readouterr().err, f"{bad}:2:1", "not valid YAML")
