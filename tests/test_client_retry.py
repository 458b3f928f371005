"""What the client retries and how long it keeps at it (no server: TorchServe's recorded answers and
a closed loopback port). The retries against a real worker death are in tests/test_worker_kill.py."""

from __future__ import annotations

import json
import logging
import random

import pytest
import requests

from serving.client import BookrecClient, RetryPolicy, retry_reason, worker_died
from serving.local_server import free_port

# TorchServe 0.12's answer to a request held by a worker that got SIGKILL (recorded verbatim).
WORKER_DIED_507 = '{\n  "code": 507,\n  "type": "InternalServerException",\n  "message": "Worker died."\n}\n'


def test_worker_deaths_and_503_are_retried() -> None:
    assert retry_reason(507, WORKER_DIED_507) == "507 worker died"
    for status in (500, 413):  # the other statuses TorchServe sends "Worker died." with
        assert worker_died(status, WORKER_DIED_507.replace("507", str(status)))
    assert retry_reason(503, '{"code": 503, "type": "ServiceUnavailableException", "message": "busy"}')
    assert retry_reason(503, "not json") == "503 service unavailable"


def test_bad_requests_and_handler_failures_are_final() -> None:
    bad = {"error": {"status": 400, "field": "k", "message": "Input should be greater than or equal to 1"}}
    assert retry_reason(400, json.dumps(bad)) is None
    assert retry_reason(404, json.dumps({"error": {"status": 404, "field": "user.user_id", "message": "x"}})) is None
    assert retry_reason(413, '{"code": 413, "type": "TooLongFrameException", "message": "too large"}') is None
    # The handler's own 500 (an unexpected failure of that request) would fail again.
    assert retry_reason(500, json.dumps({"error": {"status": 500, "field": None, "message": "Worker died."}})) is None
    assert retry_reason(200, json.dumps({"message": "Worker died."})) is None
    assert retry_reason(500, "<html>Worker died.</html>") is None


def test_back_off_grows_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=0.25, max_delay=4.0)
    rng = random.Random(0)
    for retry, cap in ((1, 0.25), (2, 0.5), (3, 1.0), (5, 4.0), (9, 4.0)):
        delays = [policy.delay(retry, rng) for _ in range(200)]
        assert cap / 2 <= min(delays) < max(delays) <= cap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"attempts": 0}, "attempts must be at least 1"), ({"base_delay": 2, "max_delay": 1}, "base_delay <= max_delay")],
)
def test_a_bad_policy_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_connection_errors_are_retried_up_to_the_attempts(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02, total=30)
    with caplog.at_level(logging.INFO, "bookrec.client"), BookrecClient(url, policy=policy) as client:
        with pytest.raises(requests.ConnectionError):
            client.predict({"action": "recommend", "user": {"country": "usa"}})
    retries = [r for r in caplog.records if r.name == "bookrec.client"]
    assert len(retries) == 3 and all("connection error" in r.getMessage() for r in retries)


def test_retries_stop_at_the_total_time(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=1000, base_delay=0.05, max_delay=0.05, total=0.5)
    with caplog.at_level(logging.INFO, "bookrec.client"), BookrecClient(url, policy=policy) as client:
        with pytest.raises(requests.ConnectionError):
            client.predict(b"{}")
    retries = [r for r in caplog.records if r.name == "bookrec.client"]
    assert 1 <= len(retries) <= 20  # at most 0.5 s of >= 25 ms waits, far from the 999 allowed
