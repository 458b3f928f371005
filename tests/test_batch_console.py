"""The batch job's console: progress, its own messages and the summary; Beam's chatter in a log file.

Runs the real command line (a separate process, the default multi-process DirectRunner) on the
``tiny_run`` fixture, so the SDK worker processes' own stderr is part of what is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batch import io
from tests.conftest import REPO

pytestmark = pytest.mark.beam

CHATTER = ("semi_persistent_directory", "Discarding unparseable args", "apitools not found", "sdk_worker")


def batch_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_default_console_is_quiet_and_the_log_holds_the_chatter(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    proc = batch_cli("--model", str(tiny_run), "--output", str(out), "--mode", "topk", "--k", "2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in CHATTER:
        assert noise not in proc.stderr, noise
    assert "shards: 100%" in proc.stderr  # the job's own progress bar
    assert "bookrec.batch: scoring" in proc.stderr  # and its own log line
    summary = json.loads(proc.stdout)
    assert summary["run_id"] and (out / io.SUCCESS).is_file()
    log = (out / io.RUN_LOG).read_text()
    assert "Discarding unparseable args" in log or "semi_persistent_directory" in log, log[-2000:]
    # A rerun replaces the output, log included (the log counts as the job's own file).
    again = batch_cli("--model", str(tiny_run), "--output", str(out), "--mode", "topk", "--k", "2", "--workers", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["run_id"] != summary["run_id"]


def test_verbose_shows_the_chatter(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    proc = batch_cli(
        *("--model", str(tiny_run), "--output", str(out), "--mode", "topk", "--k", "1"),
        *("--workers", "2", "--verbose", "--no-progress"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(noise in proc.stderr for noise in CHATTER), proc.stderr[-3000:]
    assert not (out / io.RUN_LOG).exists()


def test_redirect_covers_child_processes_and_never_hides_errors(tmp_path: Path) -> None:
    """While redirected, a child process's stderr lands in the log; an exception still propagates
    and the console is back afterwards (in a fresh interpreter, so pytest's capture stays out)."""
    script = f"""
import logging, subprocess, sys
from pathlib import Path
from batch.console import quiet_stderr, setup_logging
setup_logging(verbose=False)
try:
    with quiet_stderr(Path({str(tmp_path / "run.log")!r})) as console:
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child chatter\\n')"])
        logging.getLogger("apache_beam.x").warning("beam chatter")
        logging.getLogger("bookrec.batch").info("own progress line")
        print("bar", file=console)
        raise RuntimeError("scoring failed")
except RuntimeError as err:
    print(f"error reached the console: {{err}}", file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run.log").read_text()
    assert "child chatter" in log and "beam chatter" in log and "own progress line" in log
    assert "child chatter" not in proc.stderr and "beam chatter" not in proc.stderr
    assert "own progress line" in proc.stderr and "bar" in proc.stderr
    assert "error reached the console: scoring failed" in proc.stderr
