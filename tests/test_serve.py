"""Integration tests: a real TorchServe on free loopback ports serving an archive of ``tiny_run``.

The server runs from a tmp working directory with a config.properties derived from the
repository's (ports and paths changed only), its own log4j2 config, TMPDIR and key file; it is
stopped in teardown (``torchserve --stop``, then its process group is killed) even on failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from handlers.engine import BookrecEngine
from serving.local_server import LocalServer, read_properties
from tests.conftest import TEST_BATCH_DELAY_MS
from tests.test_handler import (
    bad_requests,
    evaluation_pairs,
    rate_requests,
)

pytestmark = pytest.mark.torchserve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = LocalServer(tiny_store, tmp_path_factory.mktemp("torchserve"))
    srv.start(timeout=240)  # stops the server itself if it never gets ready
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> BookrecEngine:
    """The same archive loaded in-process: what the server must answer."""
    return BookrecEngine(model_dir)


@pytest.fixture(scope="module")
def ids(engine: BookrecEngine) -> dict[str, Any]:
    history = engine.catalog.history
    return {
        "users": [int(u) for u in history["user_id"].value_counts().index[:40]],
        "isbns": engine.catalog.books["isbn"].tolist(),
    }


def post(
    srv: LocalServer, body: Any, token: str | None = "inference", content_type: str | None = "application/json"
) -> requests.Response:
    headers = dict(srv.headers(token)) if token else {}
    if content_type:
        headers["Content-Type"] = content_type
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    return requests.post(f"{srv.inference_url}/predictions/bookrec", data=data, headers=headers, timeout=60)


def worker_pid(srv: LocalServer) -> int:
    [worker] = [w for w in srv.workers() if w["status"] == "READY"]
    return int(worker["pid"])


def assert_same_answer(got: dict, want: dict) -> None:
    """Server answer equals the in-process one: same items in the same order, same numbers."""
    assert got["action"] == want["action"] and got["user"] == want["user"]
    if got["action"] == "rate":
        assert [p.get("isbn") for p in got["predictions"]] == [p.get("isbn") for p in want["predictions"]]
        np.testing.assert_allclose(
            [p["rating"] for p in got["predictions"]], [p["rating"] for p in want["predictions"]], atol=1e-5
        )
    else:
        assert [r["isbn"] for r in got["recommendations"]] == [r["isbn"] for r in want["recommendations"]]
        np.testing.assert_allclose(
            [r["score"] for r in got["recommendations"]], [r["score"] for r in want["recommendations"]], atol=1e-5
        )


# ----------------------------------------------------------------------------- configuration
def test_config_binds_loopback_and_locks_the_model_api() -> None:
    props = read_properties(REPO / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["metrics_mode"] == "prometheus"
    assert props["model_store"] == "model-store" and props["load_models"] == "bookrec.mar"
    # The model API is on for the version swap (serving/swap.py): a bare archive name of the store only.
    assert props["enable_model_api"] == "true" and props["disable_token_authorization"] == "false"
    assert props["install_py_dep_per_model"] == "false"
    assert int(props["max_request_size"]) == 1048576
    assert re.fullmatch(props["allowed_urls"], "file:///srv/model-store/bookrec.mar")
    assert not re.fullmatch(props["allowed_urls"], "https://example.com/model-store/bookrec.mar")
    assert not re.fullmatch(props["allowed_urls"], "s3://bucket/model-store/bookrec.mar")


def test_token_authorization_is_on(server: LocalServer) -> None:
    """Our choice: keep TorchServe's token auth. Keys come from key_file.json in the server's
    working directory; inference and management keys are not interchangeable."""
    keys = server.keys()
    assert set(keys) == {"inference", "management", "API"}
    ping = f"{server.inference_url}/ping"
    assert requests.get(ping, timeout=10).status_code == 400  # TorchServe answers 400 to a bad token
    healthy = requests.get(ping, headers=server.headers("inference"), timeout=10)
    assert healthy.status_code == 200 and healthy.json()["status"] == "Healthy"
    body = {"action": "recommend", "user": {"country": "usa"}, "k": 1}
    assert post(server, body, token=None).status_code == 400
    assert "Token Authorization failed" in post(server, body, token=None).text
    wrong = requests.post(
        f"{server.inference_url}/predictions/bookrec",
        json=body,
        headers={"Authorization": "Bearer not-the-key"},
        timeout=10,
    )
    assert wrong.status_code == 400
    assert post(server, body, token="management").status_code == 400
    assert post(server, body).status_code == 200
    describe = f"{server.management_url}/models/bookrec"
    assert requests.get(describe, timeout=10).status_code == 400
    assert requests.get(describe, headers=server.headers("inference"), timeout=10).status_code == 400
    assert requests.get(describe, headers=server.headers("management"), timeout=10).status_code == 200
    # Prometheus scrapes without a token (the metrics API is not covered by token auth).
    assert requests.get(f"{server.metrics_url}/metrics", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------ API
def test_rate_and_recommend_over_http(server: LocalServer, engine: BookrecEngine, ids: dict) -> None:
    isbns, users = ids["isbns"], ids["users"]
    bodies = [
        {"action": "rate", "user": {"user_id": users[0]}, "books": isbns[:5]},
        {
            "action": "rate",
            "user": {"city": "oslo", "country": "norway", "age": 25, "ratings": [{"isbn": isbns[3], "rating": 2}]},
            "books": [isbns[4], {"title": "A Quiet Orbit", "author": "Ada Stone", "year": 2004}],
        },
        {"action": "recommend", "user": {"user_id": users[1]}, "k": 5},
        {"action": "recommend", "user": {"region": "bavaria", "age": 60}, "k": 3, "exclude_rated": False},
        # ISBNs as a client may spell them: training upper-cased the catalog's, so the API does too.
        {"action": "rate", "user": {"user_id": users[0]}, "books": [i.lower() for i in isbns if "X" in i][:3]},
    ]
    for body in bodies:
        resp = post(server, body)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        [(status, want)] = engine.run([body])
        assert status == 200
        assert_same_answer(resp.json(), want)


def test_similar_and_reasons_over_http(server: LocalServer, engine: BookrecEngine, ids: dict) -> None:
    """The similar action for a catalog and a new book, and the reasons of a recommendation, answer
    over HTTP as in process; an unknown ISBN is a 404 naming it."""
    isbn, user = ids["isbns"][0], ids["users"][1]
    bodies = [
        {"action": "similar", "book": isbn.lower(), "k": 5},
        {"action": "similar", "book": {"title": "A Quiet Orbit", "author": "Ada Stone", "year": 2004}, "k": 3},
        {"action": "recommend", "user": {"user_id": user}, "k": 5},
    ]
    for body in bodies:
        resp = post(server, body)
        assert resp.status_code == 200, resp.text
        [(status, want)] = engine.run([body])
        assert status == 200
        key = "similar" if body["action"] == "similar" else "recommendations"
        got = resp.json()[key]
        assert got and [i["isbn"] for i in got] == [i["isbn"] for i in want[key]]
        assert [i["sources"] for i in got] == [i["sources"] for i in want[key]]
        if key == "recommendations":
            assert [i["because"] for i in got] == [i["because"] for i in want[key]]
    resp = post(server, {"action": "similar", "book": "no-such-isbn"})
    assert resp.status_code == 404
    assert resp.json()["error"]["field"] == "book" and "NO-SUCH-ISBN" in resp.json()["error"]["message"]


def test_parity_with_the_evaluation_code_over_http(server: LocalServer, tiny_run: Path) -> None:
    requests_ = rate_requests(evaluation_pairs(tiny_run))[:25]
    got, want = [], []
    for body, expected in requests_:
        resp = post(server, body)
        assert resp.status_code == 200
        got += [p["rating"] for p in resp.json()["predictions"]]
        want += expected
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_answered_in_order(
    server: LocalServer, engine: BookrecEngine, ids: dict
) -> None:
    isbns, users = ids["isbns"], ids["users"]
    bodies: list[Any] = []
    for i in range(24):
        user = {"user_id": users[i % len(users)]}
        if i % 3 == 0:
            bodies.append({"action": "recommend", "user": user, "k": 1 + i % 10})
        else:
            bodies.append({"action": "rate", "user": user, "books": isbns[i : i + 1 + i % 4]})
    bodies[5] = {"action": "rate", "user": users[0], "books": isbns[:1]}  # bad: user must be an object
    bodies[17] = {"action": "recommend", "user": {"user_id": users[2]}, "k": 1000}  # bad: k too large
    barrier = threading.Barrier(len(bodies))
    responses: list[requests.Response | None] = [None] * len(bodies)

    def client(i: int) -> None:
        barrier.wait()
        responses[i] = post(server, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    batch_sizes = []
    for i, (body, resp) in enumerate(zip(bodies, responses, strict=True)):
        assert resp is not None, i
        [(status, want)] = engine.run([body])
        assert resp.status_code == status, (i, resp.text)
        if status == 200:
            assert_same_answer(resp.json(), want)
        else:
            assert resp.json() == want
        batch_sizes.append(int(resp.headers["x-bookrec-batch-size"]))
    # Typically all 24 share one batch (the test archive waits up to 50 ms for a batch to fill).
    assert sum(size > 1 for size in batch_sizes) >= len(bodies) // 2, f"too little batching: {batch_sizes}"


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_gets_a_4xx_naming_the_field_and_the_worker_survives(server: LocalServer, ids: dict) -> None:
    pid = worker_pid(server)
    for name, body, status, field in bad_requests(ids["users"][0], ids["isbns"][0]):
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()  # NaN stays NaN
        resp = post(server, raw)
        assert resp.status_code == status, (name, resp.text[:300])
        error = resp.json()["error"]
        # TorchServe itself decodes application/json bodies (accepting NaN literals), so a NaN
        # literal reaches the handler as a float and is reported at its field instead.
        expected_field = "k" if name == "NaN literal" else field
        assert error["field"] == expected_field and error["message"], (name, error)
    # Without Content-Type: application/json curl sends a form; the error says what to do.
    resp = post(server, b'{"action": "recommend"}', content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 400 and "Content-Type: application/json" in resp.json()["error"]["message"]
    # A body over max_request_size is refused by TorchServe before it reaches the worker.
    huge = {"action": "recommend", "user": {"city": "x" * 2_000_000}}
    assert post(server, huge).status_code == 413
    good = post(server, {"action": "recommend", "user": {"user_id": ids["users"][0]}, "k": 2})
    assert good.status_code == 200 and len(good.json()["recommendations"]) == 2
    assert worker_pid(server) == pid, "the worker restarted"


# ----------------------------------------------------------------------------- ops endpoints
def test_prometheus_metrics_count_requests_and_latency(server: LocalServer) -> None:
    before = _metric(server, "ts_inference_requests_total")
    for _ in range(3):
        assert post(server, {"action": "recommend", "user": {"country": "spain"}, "k": 1}).status_code == 200
    assert post(server, {"action": "recommend"}).status_code == 400
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    assert _metric(server, "ts_inference_requests_total", text) >= before + 4
    assert _metric(server, "ts_inference_latency_microseconds", text) > 0
    assert _metric(server, "ts_queue_latency_microseconds", text) > 0
    assert re.search(r"^Requests4XX\{.*\} [1-9]", text, re.M)


def test_prometheus_metrics_time_each_handler_stage(server: LocalServer) -> None:
    """TorchServe's ``@timed`` stage timers (on: the archive's ``handler: {profile: true}``) and
    BaseHandler's HandlerTime reach /metrics: the worker prints them, the frontend exports them
    (``model_metrics_auto_detect=true``) shortly after the answers."""
    for _ in range(3):
        assert post(server, {"action": "recommend", "user": {"country": "chile"}, "k": 2}).status_code == 200
    names = ("ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess", "HandlerTime")
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
        values = {name: _model_metric(text, name) for name in names}
        if all(v > 0 for v in values.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(v > 0 for v in values.values()), values
    # Gauges: each holds the milliseconds of the last batch the worker reported.
    for name in names:
        assert re.search(rf"^# TYPE {name} gauge$", text, re.M), name


def _model_metric(text: str, name: str) -> float:
    """The bookrec worker's value of a metric the frontend auto-detected (labels ModelName, Level,
    Hostname); 0 when absent."""
    match = re.search(rf'^{name}\{{.*ModelName="bookrec".*\}} ([0-9.eE+-]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _metric(srv: LocalServer, name: str, text: str | None = None) -> float:
    text = text if text is not None else requests.get(f"{srv.metrics_url}/metrics", timeout=10).text
    match = re.search(rf'^{name}\{{model_name="bookrec".*\}} ([0-9.eE+-]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_management_api_describes_the_model(server: LocalServer) -> None:
    headers = server.headers("management")
    [desc] = requests.get(f"{server.management_url}/models/bookrec", headers=headers, timeout=10).json()
    assert desc["modelVersion"] == "1.0" and desc["batchSize"] == 32
    assert desc["maxBatchDelay"] == TEST_BATCH_DELAY_MS and desc["minWorkers"] == 1
    assert [w["status"] for w in desc["workers"]] == ["READY"]
    [custom] = requests.get(
        f"{server.management_url}/models/bookrec?customized=true", headers=headers, timeout=30
    ).json()
    meta = custom["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["model_version"] == "1.0" and meta["device"] == "cpu"
    assert "MLP TorchScript (shipped)" in meta["metrics"]


def test_the_model_api_registers_only_archives_of_the_store(server: LocalServer, tiny_store: Path) -> None:
    """The model API is on for the version swap (serving/swap.py): no download, no path out of the
    store, and only with the management key."""
    headers = server.headers("management")
    before = sorted(p.name for p in tiny_store.iterdir())
    for url in ("https://example.com/evil.mar", "../model-store/bookrec.mar", "file:///etc/evil.mar"):
        resp = requests.post(f"{server.management_url}/models", params={"url": url}, headers=headers, timeout=30)
        assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text)
    no_key = requests.post(f"{server.management_url}/models", params={"url": "bookrec.mar"}, timeout=10)
    assert no_key.status_code == 400 and "Token Authorization failed" in no_key.text  # TorchServe's 400
    wrong_key = requests.delete(f"{server.management_url}/models/bookrec", headers=server.headers(), timeout=10)
    assert wrong_key.status_code == 400 and "Token Authorization failed" in wrong_key.text
    assert sorted(p.name for p in tiny_store.iterdir()) == before
    assert post(server, {"action": "recommend", "user": {"country": "usa"}, "k": 1}).status_code == 200


def test_a_killed_worker_comes_back_and_serves(server: LocalServer, ids: dict) -> None:
    """Kill -9 the Python worker (a child of our TorchServe): the frontend starts a new one."""
    pid = worker_pid(server)
    assert os.getpgid(pid) == server.proc.pid, "only a worker of our own server may be killed"
    os.kill(pid, signal.SIGKILL)
    server.wait_ready(timeout=150, exclude_pids={pid})
    assert worker_pid(server) != pid
    resp = post(server, {"action": "rate", "user": {"user_id": ids["users"][0]}, "books": ids["isbns"][:3]})
    assert resp.status_code == 200 and len(resp.json()["predictions"]) == 3
    assert all(math.isfinite(p["rating"]) for p in resp.json()["predictions"])
