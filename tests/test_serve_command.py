"""The documented serve command, literally: from a repository-like root, after
``export TS_CONFIG_FILE=$PWD/config.properties``, ``torchserve --start --models bookrec.mar``.

The root is a tmp folder with the repository's config.properties (only its ports changed, to free
ones), ``model-store/bookrec.mar`` (the tiny archive) and ``handlers/log4j2.xml``; TMPDIR is private
so the CLI's pid file cannot meet another TorchServe's. The same server then answers known
requests, and the test checks the serving metrics on its Prometheus endpoint, the request sample
it writes for the drift check, and ``torchserve --stop``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from serving.local_server import LocalServer, free_port, read_properties, write_properties
from tests.conftest import REPO

pytestmark = pytest.mark.torchserve

SERVE = "torchserve --start --models bookrec.mar"
PORT_KEYS = {
    "inference": "inference_address",
    "management": "management_address",
    "metrics": "metrics_address",
}


def repo_like_root(root: Path, store: Path) -> dict[str, int]:
    """config.properties (ports swapped for free ones), model-store/bookrec.mar, handlers/log4j2.xml."""
    ports = {name: free_port() for name in (*PORT_KEYS, "grpc_i", "grpc_m")}
    props = read_properties(REPO / "config.properties")
    for name, key in PORT_KEYS.items():
        props[key] = re.sub(r":\d+$", f":{ports[name]}", props[key])
    props["grpc_inference_port"], props["grpc_management_port"] = str(ports["grpc_i"]), str(ports["grpc_m"])
    write_properties(root / "config.properties", props)
    (root / "model-store").mkdir()
    shutil.copy(store / "bookrec.mar", root / "model-store" / "bookrec.mar")
    (root / "handlers").mkdir()
    shutil.copy(REPO / "handlers" / "log4j2.xml", root / "handlers" / "log4j2.xml")
    return ports


@pytest.fixture(scope="module")
def served(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("repo-root")
    ports = repo_like_root(root, tiny_store)
    (root / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "LOG_LOCATION", "METRICS_", "BOOKREC_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        PWD=str(root),  # what a shell sets after `cd root`
        TMPDIR=str(root / "tmp"),
        TEMP=str(root / "tmp"),
    )
    # The documented one-line set-up, then the literal command, both through a shell. The CLI returns
    # at once; the Java frontend it starts keeps its stdout, so that goes to a file, not a pipe.
    out = (root / "torchserve.out").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", f"export TS_CONFIG_FILE=$PWD/config.properties && {SERVE}"],
        cwd=root,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the Java frontend and workers stay in this process group
    )
    out.close()
    server = LocalServer(root / "model-store", root, ports=ports)
    try:
        assert proc.wait(timeout=120) == 0, server.log_tail()
        server.wait_ready(timeout=240)
        yield server, root, env
    finally:
        subprocess.run(["torchserve", "--stop"], cwd=root, env=env, capture_output=True, timeout=60)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever --stop left behind
        except (ProcessLookupError, PermissionError):
            pass


def post(server: LocalServer, body: Any) -> requests.Response:
    headers = {**server.headers(), "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{server.inference_url}/predictions/bookrec", data=data, headers=headers, timeout=60)


def scrape(server: LocalServer) -> dict[tuple[str, frozenset], float]:
    """The Prometheus text of /metrics as {(name, labels without Hostname/ModelName/Level): value}."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        match = re.match(r"^(bookrec_\w+)\{(.*)\} ([0-9.eE+-]+)$", line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        assert labels.get("ModelName") == "bookrec", line
        key = frozenset((k, v) for k, v in labels.items() if k not in ("Hostname", "ModelName", "Level"))
        out[(match.group(1), key)] = out.get((match.group(1), key), 0.0) + float(match.group(3))
    return out


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def test_the_literal_command_serves_from_the_repository_root(served: Any) -> None:
    server, root, _ = served
    assert server.keys()["inference"]  # key_file.json written into the root, as documented
    assert (root / "logs" / "model_log.log").is_file()  # logs/ beside it
    resp = post(server, {"action": "recommend", "user": {"country": "usa"}, "k": 2})
    assert resp.status_code == 200 and len(resp.json()["recommendations"]) == 2


def test_serving_metrics_on_the_prometheus_endpoint(served: Any, tiny_run: Path) -> None:
    server, _, _ = served
    import pyarrow.parquet as pq

    users = pq.read_table(tiny_run / "catalog" / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
    isbns = pq.read_table(tiny_run / "catalog" / "books.parquet", columns=["isbn"])["isbn"].to_pylist()
    before = scrape(server)
    bodies = [
        {"action": "rate", "user": {"user_id": users[0]}, "books": [isbns[0], isbns[1], {"title": "A New Book"}]},
        {"action": "rate", "user": {"country": "norway", "age": 30}, "books": [isbns[2]]},
        {"action": "recommend", "user": {"user_id": users[1]}, "k": 3},
        {"action": "rate", "user": {"user_id": users[0]}, "books": [isbns[0], {"title": "B", "year": "1999"}]},
        {"action": "rate", "user": {"user_id": users[0]}, "books": [isbns[0], {"title": "C", "year": 99}]},
        {"action": "recommend", "user": {"user_id": -1}},
    ]
    answers = [post(server, body) for body in bodies]
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 400, 404]
    rate_scores = [p["rating"] for a in answers[:2] for p in a.json()["predictions"]]
    expected = {
        ("bookrec_requests", ("action", "rate")): 4,
        ("bookrec_requests", ("action", "recommend")): 2,
        ("bookrec_books", ("book", "known")): 3,
        ("bookrec_books", ("book", "new")): 1,
        ("bookrec_users", ("action", "rate"), ("user", "known")): 1,
        ("bookrec_users", ("action", "rate"), ("user", "new")): 1,
        ("bookrec_users", ("action", "recommend"), ("user", "known")): 1,
        ("bookrec_errors", ("field", "books[].year"), ("status", "400")): 2,
        ("bookrec_errors", ("field", "user.user_id"), ("status", "404")): 1,
        ("rate bins",): len(rate_scores),
    }

    def deltas() -> dict[tuple, float]:
        now = scrape(server)
        got = {}
        for key in expected:
            if key[0] == "rate bins":
                bins = [k for k in now if k[0] == "bookrec_predicted_rating" and ("action", "rate") in k[1]]
                got[key] = sum(now[k] - before.get(k, 0.0) for k in bins)
            else:
                got[key] = metric(now, key[0], **dict(key[1:])) - metric(before, key[0], **dict(key[1:]))
        got[("rate sum",)] = metric(now, "bookrec_predicted_rating_sum", action="rate") - metric(
            before, "bookrec_predicted_rating_sum", action="rate"
        )
        return got

    # The worker reports metrics on its log stream, which the frontend reads on its own thread: the
    # counts arrive shortly after the answers. Poll until they are all in (or give up after a while).
    deadline = time.monotonic() + 60
    got = deltas()
    while any(got[k] < v for k, v in expected.items()) and time.monotonic() < deadline:
        time.sleep(0.5)
        got = deltas()
    assert {k: got[k] for k in expected} == expected
    assert got[("rate sum",)] == pytest.approx(sum(rate_scores), rel=1e-4)


def test_request_sample_for_the_drift_check(served: Any, tiny_run: Path, tmp_path: Path) -> None:
    """The worker writes its sample under $PWD/logs (where torchserve --start ran); the drift check
    reads it (too few requests here to judge: it reports and exits 0)."""
    server, root, _ = served
    for age in (20, 30, 40):
        assert post(server, {"action": "recommend", "user": {"country": "usa", "age": age}, "k": 1}).status_code == 200
    files = list((root / "logs").glob("drift-sample.w*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["age"] for r in lines[-3:]] == [20, 30, 40]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.drift",
            "--run",
            str(tiny_run),
            "--requests",
            str(root / "logs"),
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "too few samples" in (tmp_path / "report" / "drift.md").read_text()
