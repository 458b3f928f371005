"""Run a private TorchServe on free loopback ports (tests and the benchmark; not shipped in the .mar).

The instance gets its own working directory: a config.properties derived from the repository's
(same settings, other ports and paths), its logs (handlers/log4j2.xml with LOG_LOCATION there), its
own TMPDIR/TEMP (pid file, unpacked archives, worker sockets) and key_file.json. Nothing lands in the repository, and a
second TorchServe on the same machine is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.properties"

LOG_CONFIG = REPO / "handlers" / "log4j2.xml"  # the production logging config, logs under LOG_LOCATION


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines of a Java properties file (comments and blanks skipped, ``\\\\`` unescaped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().replace("\\\\", "\\")
    return out


def write_properties(path: Path, props: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v.replace(chr(92), chr(92) * 2)}\n" for k, v in props.items()))


@dataclass
class LocalServer:
    """One TorchServe process tree serving ``model_store/<archive>`` from ``workdir``."""

    model_store: Path
    workdir: Path
    archive: str = "bookrec.mar"  # or several, space-separated, each ``[name=]file.mar``
    overrides: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def _config(self) -> Path:
        props = read_properties(CONFIG)
        self.ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_i", "grpc_m")}
        props.update(
            {
                "inference_address": self.inference_url,
                "management_address": self.management_url,
                "metrics_address": self.metrics_url,
                "grpc_inference_port": str(self.ports["grpc_i"]),
                "grpc_management_port": str(self.ports["grpc_m"]),
                "model_store": str(self.model_store),
                "load_models": ",".join(self.archive.split()),
                **self.overrides,
            }
        )
        path = self.workdir / "config.properties"
        write_properties(path, props)
        return path

    def _env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        venv_bin = str(Path(sys.executable).parent)
        # TS_CONFIG_FILE (the documented serve set-up) would win over --ts-config: keep it out.
        return {
            **{k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"},
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "TMPDIR": str(tmp),  # the CLI's pid file
            "TEMP": str(tmp),  # java.io.tmpdir: unpacked archives, worker sockets
            "LOG_LOCATION": str(self.logs),
            "METRICS_LOCATION": str(self.logs),
            **self.env,
        }

    def start(self, timeout: float = 180.0, model: str = "bookrec", healthy: bool = True) -> LocalServer:
        """Start TorchServe and wait until ``model`` has a READY worker and (with ``healthy``) /ping says
        so; raises with the log tail."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        config = self._config()
        cmd = [
            str(Path(sys.executable).parent / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(self.model_store),
            "--models",
            *self.archive.split(),
            "--ts-config",
            str(config),
            "--log-config",
            str(LOG_CONFIG),
        ]
        out = (self.workdir / "torchserve.out").open("wb")
        # Own session: the CLI, java and the Python workers share one process group we can kill.
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self._env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        try:
            self.wait_ready(timeout, model=model, healthy=healthy)
        except BaseException:
            self.stop()
            raise
        return self

    def keys(self) -> dict[str, str]:
        """The tokens TorchServe wrote: {'inference': ..., 'management': ..., 'API': ...}."""
        path = self.workdir / "key_file.json"
        if not path.is_file():
            return {}
        return {name: entry["key"] for name, entry in json.loads(path.read_text()).items()}

    def headers(self, kind: str = "inference") -> dict[str, str]:
        key = self.keys().get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def workers(self, model: str = "bookrec") -> list[dict[str, Any]]:
        resp = requests.get(f"{self.management_url}/models/{model}", headers=self.headers("management"), timeout=10)
        resp.raise_for_status()
        return resp.json()[0]["workers"]

    def wait_ready(
        self, timeout: float = 180.0, model: str = "bookrec", exclude_pids: set[int] | None = None, healthy: bool = True
    ) -> None:
        """Until a READY worker (not one of ``exclude_pids``) serves ``model`` and, with ``healthy``, /ping
        is healthy (it is not while another model of the store has no worker)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                ping = requests.get(f"{self.inference_url}/ping", headers=self.headers(), timeout=5)
                ready = [
                    w
                    for w in self.workers(model)
                    if w.get("status") == "READY" and w.get("pid") not in (exclude_pids or set())
                ]
                if (ping.status_code == 200 or not healthy) and ready:
                    return
                last = f"ping {ping.status_code}, workers not ready"
            except (requests.RequestException, KeyError, IndexError, ValueError) as err:
                last = f"{type(err).__name__}: {err}"
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s ({last})\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        for name in ("torchserve.out", "logs/ts_log.log", "logs/model_log.log"):
            path = self.workdir / name
            if path.is_file():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """``torchserve --stop`` for this instance, then kill whatever is left of its process group."""
        if self.proc is None:
            return
        try:
            subprocess.run(
                [str(Path(sys.executable).parent / "torchserve"), "--stop"],
                cwd=self.workdir,
                env=self._env(),
                capture_output=True,
                timeout=60,
            )
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
            self.proc = None
            shutil.rmtree(self.workdir / "tmp", ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
