"""What the batch job prints: its own progress, warnings that matter and the summary; Beam's chatter
goes to a log file.

Apache Beam, its SDK worker processes and Dask write a lot to stderr that says nothing to the user of
this job (``apitools not found``, ``No semi_persistent_directory found``, ``Discarding unparseable
args``, ...). While the pipeline runs, file descriptor 2 of the driver, which every worker process
it starts inherits, points at a log file; the console gets a duplicate of the original stderr,
where the progress bar and this job's own log lines (``bookrec.*``, INFO and up) go, and every
ERROR from anywhere. ``--verbose`` leaves stderr alone and shows everything. Errors are never
hidden: exceptions propagate after the console is restored, and a failed run keeps its log and
says where it is.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConsoleFilter(logging.Filter):
    """This job's own INFO and up, and any ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.name.startswith("bookrec") and record.levelno >= logging.INFO)


class NotApitools(logging.Filter):
    """Beam warns on import that the optional GCP client libraries are missing; not our business."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


class ConsoleHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (never a stale one), or to the console stream
    ``quiet_stderr`` hands it while stderr points at the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.console: IO[str] | None = None

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return self.console or sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ assigns it; ignored
        pass


def setup_logging(verbose: bool) -> logging.Handler:
    """The console handler on the root logger (filtered unless ``verbose``); returns it."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for old in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(old)
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(NotApitools())
    if not verbose:
        console.addFilter(ConsoleFilter())
    root.addHandler(console)
    for noisy in ("apache_beam", "distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    return console


@contextmanager
def quiet_stderr(log_path: Path | None) -> Iterator[IO[str]]:
    """Send fd 2 (this process and every process it starts meanwhile) and all log records to
    ``log_path``; yields the console stream for progress bars. ``None``: nothing redirected."""
    if log_path is None:
        yield sys.stderr
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    log_file = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    root = logging.getLogger()
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    consoles = [h for h in root.handlers if isinstance(h, ConsoleHandler)]
    os.dup2(log_file.fileno(), 2)
    for handler in consoles:
        handler.console = console
    root.addHandler(file_handler)
    try:
        yield console
    finally:
        sys.stderr.flush()
        root.removeHandler(file_handler)
        for handler in consoles:
            handler.console = None
        os.dup2(saved, 2)
        os.close(saved)
        console.close()
        log_file.close()
