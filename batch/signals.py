"""Ctrl-C and SIGTERM: the job stops its worker processes and unwinds, so its temp folder goes.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread is; SIGTERM would end the
process on the spot, leaving the run's temp folder and the runner's worker processes behind. While
the job runs, both signals stop every process the job started (Beam's SDK workers, a local Dask
cluster) and raise ``Interrupted`` in the main thread; the job's own cleanup then runs as for any
failure, and the CLI prints one line and exits 128 + the signal's number.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_GRACE_S = 5.0  # a worker that ignores SIGTERM this long is killed


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal (a ``KeyboardInterrupt``, so nothing catches it as an error)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.detail = ""  # what became of the output, when the job got that far

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_workers() -> None:
    """Terminate every process this one started (children and theirs), killing the ones that
    outlast ``WORKER_GRACE_S``."""
    import psutil

    try:
        workers = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for proc in workers:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(workers, timeout=WORKER_GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=WORKER_GRACE_S)


def _stop(signum: int, frame: FrameType | None) -> None:
    # A second Ctrl-C must not cut the cleanup short: from here on both signals are ignored. The
    # runner logs the lost workers as errors, with tracebacks: the stop is on purpose, and the CLI
    # says so in one line, so logging is off until the job has unwound.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    logging.disable(logging.CRITICAL)
    stop_workers()
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the workers and raise ``Interrupted``; the previous
    handlers come back afterwards. Outside the main thread (no signals there) it does nothing."""
    try:
        previous = {sig: signal.signal(sig, _stop) for sig in SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logging.disable(logging.NOTSET)
