"""A worker crash under a real TorchServe (one worker, archive of ``tiny_run``): the retrying client
still gets its answer, a bad request is not repeated, and the health check says unhealthy while
the model has no live worker although ``/ping`` keeps saying Healthy."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from serving import healthcheck
from serving.client import NO_RETRY, BookrecClient, RetryPolicy, worker_died
from serving.local_server import LocalServer

pytestmark = pytest.mark.torchserve

BODY = {"action": "recommend", "user": {"country": "usa"}, "k": 2}


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = LocalServer(tiny_store, tmp_path_factory.mktemp("torchserve-kill"))
    srv.start(timeout=240)
    try:
        yield srv
    finally:
        srv.stop()


def client(srv: LocalServer, policy: RetryPolicy | None = None) -> BookrecClient:
    return BookrecClient.from_key_file(srv.inference_url, srv.workdir / "key_file.json", policy=policy, timeout=120)


def our_worker(srv: LocalServer) -> int:
    """The pid of the one READY worker, checked to be a child of our own server."""
    [worker] = [w for w in srv.workers() if w["status"] == "READY"]
    pid = int(worker["pid"])
    assert os.getpgid(pid) == srv.proc.pid, "only a worker of our own server may be signalled"
    return pid


def requests_total(srv: LocalServer) -> float:
    text = requests.get(f"{srv.metrics_url}/metrics", timeout=10).text
    match = re.search(r'^ts_inference_requests_total\{model_name="bookrec".*\} ([0-9.eE+-]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_bad_request_is_answered_once_with_its_field(server: LocalServer) -> None:
    before = requests_total(server)
    with client(server) as c:
        reply = c.predict({"action": "recommend", "user": {"country": "usa"}, "k": 0})
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "k"
    assert reply.attempts == 1 and reply.retries == []
    assert requests_total(server) == before + 1  # the server saw it once


def test_the_client_command_line(server: LocalServer, capsys: pytest.CaptureFixture[str]) -> None:
    from serving import client as client_cli

    argv = ["--url", server.inference_url, "--key-file", str(server.workdir / "key_file.json")]
    assert client_cli.main([*argv, "-d", json.dumps(BODY)]) == 0
    assert len(json.loads(capsys.readouterr().out)["recommendations"]) == 2
    assert client_cli.main([*argv, "-d", '{"action": "recommend", "user": {"country": "usa"}, "k": 0}']) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["field"] == "k" and "HTTP 400 after 1 attempt(s)" in out.err


def test_the_client_retries_a_request_its_worker_died_with(server: LocalServer) -> None:
    """Freeze the worker (SIGSTOP) so two requests are surely in flight on it, then SIGKILL it:
    TorchServe answers both "Worker died."; the client without retries gets that answer, the
    retrying one its 200 from the replacement worker."""
    pid = our_worker(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool, client(server) as retrying, client(server, NO_RETRY) as once:
            replies = [pool.submit(c.predict, BODY) for c in (retrying, once)]
            time.sleep(2)  # the frontend hands the batch to the frozen worker within maxBatchDelay
            assert not any(r.done() for r in replies)
            os.kill(pid, signal.SIGKILL)
            got, lost = (r.result(timeout=150) for r in replies)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert lost.status_code != 200 and worker_died(lost.status_code, lost.response.text), lost.response.text
    assert lost.attempts == 1
    assert got.status_code == 200 and len(got.json()["recommendations"]) == 2
    assert got.attempts >= 2 and "worker died" in got.retries[0], got.retries
    server.wait_ready(timeout=150, exclude_pids={pid})


def test_the_health_check_is_unhealthy_while_no_worker_is_live(
    server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", server.inference_url, "--management-url", server.management_url]
    argv += ["--key-file", str(server.workdir / "key_file.json")]
    assert healthcheck.main(argv) == 0
    assert "1 of 1 bookrec workers READY" in capsys.readouterr().out
    pid = our_worker(server)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while healthcheck.main(argv) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("unhealthy:") and "0 of 1 bookrec workers READY" in out, out
    # What the check is for: TorchServe's own /ping does not see the dead worker.
    ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    server.wait_ready(timeout=150, exclude_pids={pid})
    assert healthcheck.main(argv) == 0
    assert capsys.readouterr().out.startswith("healthy:")


def test_the_health_check_needs_the_management_key(server: LocalServer, tmp_path: Path) -> None:
    """With only the inference key the worker list is refused: unhealthy, saying why."""
    keys = json.loads((server.workdir / "key_file.json").read_text())
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": keys["inference"]}))
    ok, detail = healthcheck.healthy(server.inference_url, tmp_path / "key_file.json", 10, server.management_url)
    assert not ok and "management API answered 400" in detail
    ok, _ = healthcheck.healthy(server.inference_url, tmp_path / "key_file.json", 10, management_url=None)
    assert ok  # /ping alone, as before


def test_two_workers_by_default_where_the_memory_allows() -> None:
    """One crash then leaves a worker serving; memory (1.75 GiB a worker, half the RAM) and the
    core count bound it."""
    from serving.archive import WORKER_MEMORY, default_workers

    gib = 2**30
    assert default_workers(cores=2, memory=24 * gib) == 2
    assert default_workers(cores=1, memory=24 * gib) == 2
    assert default_workers(cores=16, memory=128 * gib) == 8
    assert default_workers(cores=16, memory=8 * gib) == 2  # 4 GiB for workers: two of 1.75 GiB
    assert default_workers(cores=2, memory=3 * gib) == 1  # a second worker would not fit
    assert default_workers(cores=2, memory=WORKER_MEMORY) == 1
    assert default_workers() >= 1
