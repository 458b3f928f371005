"""A catalog update served by a real TorchServe on 127.0.0.1: the new version swapped in while the
project's client keeps sending requests (none fails), then rolled back the same way; a failed update
leaves the served version and the model store as they were."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from model.manifest import file_sha256
from serving.archive import build_archive
from serving.client import BookrecClient
from serving.local_server import LocalServer
from serving.swap import Management, SwapError, archive_identity
from tests.test_update import update_for
from tests.update_inputs import NEW_BOOKS
from train.update.build import build_version

pytestmark = pytest.mark.torchserve
REPO = Path(__file__).resolve().parents[1]


class Traffic:
    """Client threads sending requests until stopped, each answer's status and time kept."""

    def __init__(self, server: LocalServer, body: dict[str, Any], threads: int = 2):
        self.server, self.body = server, body
        self.answers: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(threads)]

    def _send(self) -> None:
        with BookrecClient(self.server.inference_url, self.server.keys()["inference"], timeout=30) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.predict(self.body).status_code
                except requests.RequestException:  # no answer at all (a lost request): a failure
                    status = -1
                self.answers.append((sent, status))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def between(self, start: float, end: float) -> list[int]:
        return [status for at, status in self.answers if start <= at <= end]


def swap_cli(server: LocalServer, store: Path, state: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serving.swap", *args, "--store", str(store), "--state", str(state)]
    cmd += ["--management", server.management_url, "--key-file", str(server.workdir / "key_file.json")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def swap_under_traffic(server: LocalServer, body: dict[str, Any], store: Path, state: Path, *args: str) -> list[int]:
    """Run ``python -m serving.swap ARGS`` while the client sends ``body``; asserts it succeeded and
    that requests were in flight during it; returns every answer's status, before, during and after."""
    with Traffic(server, body) as traffic:
        time.sleep(2)
        start = time.monotonic()
        proc = swap_cli(server, store, state, *args)
        end = time.monotonic()
        time.sleep(2)
    assert proc.returncode == 0, proc.stderr + server.log_tail()
    assert traffic.between(start, end), "no request was answered during the swap"
    return [s for _, s in traffic.answers]


def rate_new_book(server: LocalServer) -> int:
    body = {"action": "rate", "user": {"country": "france"}, "books": [NEW_BOOKS[0]]}
    with BookrecClient(server.inference_url, server.keys()["inference"]) as client:
        return client.predict(body).status_code


def test_swap_and_rollback_with_requests_in_flight(tiny_run: Path, tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy2(tiny_store / "bookrec.mar", store / "bookrec.mar")
    folder, info = update_for(tiny_run, tmp_path / "input")  # the archive holds the same catalog
    build_version(store / "bookrec.mar", folder, tmp_path / "v2")
    build_archive(tmp_path / "v2", store, version="2.0", workers=1, file_name="bookrec-2.0")
    assert archive_identity(store, "bookrec-2.0.mar") == ("bookrec", "2.0")
    state = tmp_path / "swap.json"
    body = {"action": "recommend", "user": {"user_id": info["known_user"]}, "k": 5}

    with LocalServer(store, tmp_path / "ts") as server:
        api = Management(server.management_url, server.keys()["management"])
        assert rate_new_book(server) == 404  # version 1.0 does not know the new book

        statuses = swap_under_traffic(server, body, store, state, "bookrec-2.0.mar")
        assert set(statuses) == {200}, statuses
        assert [v["modelVersion"] for v in api.versions("bookrec")] == ["2.0"]
        assert rate_new_book(server) == 200
        assert json.loads(state.read_text())["previous"]["archive"] == "bookrec.mar"

        # A failed update (bad input) changes neither the store nor the served version.
        before = {p.name: file_sha256(p) for p in store.iterdir()}
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "Ratings.csv").write_text("User-ID,ISBN\n1,2\n")
        args = [
            "--model",
            str(store / "bookrec-2.0.mar"),
            "--input",
            str(tmp_path / "bad"),
            "--out",
            str(tmp_path / "v3"),
        ]
        failed = subprocess.run(
            [sys.executable, "-m", "train", "update", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert failed.returncode == 2 and "Ratings.csv" in failed.stderr
        assert {p.name: file_sha256(p) for p in store.iterdir()} == before
        assert api.default("bookrec")["modelVersion"] == "2.0" and not (tmp_path / "v3").exists()

        statuses = swap_under_traffic(server, body, store, state, "--rollback")
        assert set(statuses) == {200}, statuses
        assert [v["modelVersion"] for v in api.versions("bookrec")] == ["1.0"]
        assert rate_new_book(server) == 404


def test_swap_refuses_a_path_or_url(tmp_path: Path) -> None:
    for name in ("../bookrec.mar", "http://example.com/bookrec.mar", "bookrec.zip"):
        with pytest.raises(SwapError, match="not a path or URL"):
            archive_identity(tmp_path, name)
