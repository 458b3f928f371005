"""A Dask cluster of separate processes on this machine, started the way docs/BATCH.md starts one:
``dask scheduler`` and N ``dask worker`` processes on 127.0.0.1 (free ports), each worker without a
nanny, so that killing its process really loses the worker. The tests and the benchmark use it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

STOP_SECONDS = 10.0


class ClusterError(RuntimeError):
    """The scheduler or a worker did not start."""


class LoopbackCluster:
    """``with LoopbackCluster(2, cwd=folder, env=env) as cluster:`` then
    ``--runner=DaskRunner --dask_client_address=<cluster.address>``.

    ``cwd`` is the folder the processes start in (their logs and Dask's scratch space go there);
    ``env`` is their environment (it must let them import this project, e.g. ``PYTHONPATH``).
    """

    def __init__(
        self,
        n_workers: int,
        cwd: Path,
        env: dict[str, str] | None = None,
        nthreads: int = 1,
        timeout: float = 120.0,
    ):
        self.n_workers = n_workers
        self.cwd = Path(cwd)
        self.env = dict(os.environ if env is None else env)
        self.nthreads = nthreads
        self.timeout = timeout
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.cwd / f"{name}.log").open("wb")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> LoopbackCluster:
        self.cwd.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        info = self.cwd / "scheduler.json"
        info.unlink(missing_ok=True)
        # --idle-timeout: a scheduler left behind by a crashed caller goes away on its own, and
        # --death-timeout takes its workers with it.
        self.scheduler = self._start(
            "scheduler",
            *("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"),
            *("--scheduler-file", str(info), "--idle-timeout", "900"),
        )
        self.address = self._wait_for_address(info)
        for i in range(self.n_workers):
            name = f"worker-{i}"
            self.workers[name] = self._start(
                name,
                *("worker", self.address, "--host", "127.0.0.1", "--name", name, "--no-nanny"),
                *("--nthreads", str(self.nthreads), "--no-dashboard", "--death-timeout", "60"),
                *("--local-directory", str(self.cwd / name)),
            )
        self._wait_for_workers()

    def _wait_for_address(self, info: Path) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise ClusterError(f"dask scheduler exited ({self.scheduler.returncode}); see {self.cwd}/scheduler.log")
            try:
                return json.loads(info.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        raise ClusterError(f"dask scheduler wrote no {info} in {self.timeout:.0f} s")

    def _wait_for_workers(self) -> None:
        from distributed import Client

        with Client(self.address, timeout=self.timeout) as client:
            deadline = time.monotonic() + self.timeout
            while len(client.scheduler_info()["workers"]) < self.n_workers:
                dead = [n for n, p in self.workers.items() if p.poll() is not None]
                if dead:
                    raise ClusterError(f"dask worker {dead[0]} exited; see {self.cwd}/{dead[0]}.log")
                if time.monotonic() > deadline:
                    raise ClusterError(f"{self.n_workers} dask workers did not connect in {self.timeout:.0f} s")
                time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.workers.items()}

    def kill(self, name: str) -> None:
        """SIGKILL one worker process (no nanny restarts it)."""
        process = self.workers[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=STOP_SECONDS)

    def close(self) -> None:
        """Stop the workers, then the scheduler: SIGTERM, and SIGKILL what is still running."""
        processes = [*self.workers.values(), *([self.scheduler] if self.scheduler else [])]
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=STOP_SECONDS)
        for log in self._logs:
            log.close()
        self._logs.clear()
