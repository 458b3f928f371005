"""A client of bookrec's inference API that retries what a worker crash loses.

    python -m serving.client --key-file key_file.json -d '{"action": "recommend", "user": {"user_id": 11676}}'

Both actions, ``rate`` and ``recommend``, only read the model, so sending one again is safe. When a
TorchServe worker dies, the frontend answers the requests that worker held with ``"message":
"Worker died."`` (status 500 or 507, or 413 when the worker's exit status was 137, i.e. SIGKILL or
the OOM killer) and queues the next ones until a new worker has loaded. This client sends a request
again on such an answer, on a 503 and on a connection error, after an exponential back-off with
jitter, within a bound on attempts and on total time. Every other answer is final: a bad request
stays a 4xx naming the field, and the handler's own 500 (an unexpected failure of that request) is
not repeated; nor is a read timeout (the server may still be working on that request).

The retrying is urllib3's ``Retry`` in requests' ``HTTPAdapter``, with the policy's back-off and time
bound; the client itself only tells a "Worker died." answer from the final answers that share its
statuses, which needs the body (``BookrecClient.predict`` says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError, ResponseError
from urllib3.util.retry import RequestHistory, Retry

from serving.healthcheck import inference_key

log = logging.getLogger("bookrec.client")

WORKER_DIED = "worker died."  # TorchServe's error message for the requests a dead worker held
RETRY_STATUSES = frozenset({503})  # retried whatever the body says


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try one call.

    The n-th retry waits ``min(max_delay, base_delay * 2**(n-1))`` scaled by a random factor in
    [0.5, 1] (jitter spreads the retries of many clients that lost their answers at once). No retry
    starts once it would begin later than ``total`` seconds after the first try.
    """

    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 4.0
    total: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay or self.total <= 0:
            raise ValueError(
                f"need 0 <= base_delay <= max_delay and total > 0, got {self.base_delay}, {self.max_delay}, "
                f"{self.total}"
            )

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1)) * rng.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(attempts=1)


def worker_died(status: int, text: str) -> bool:
    """TorchServe's answer for a request whose worker died: its own error body, message "Worker died."."""
    if status < 400:
        return False
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("message", "")).strip().lower() == WORKER_DIED


def retry_reason(status: int, text: str) -> str | None:
    """Why an answer is worth sending again, or None when it is final."""
    if status in RETRY_STATUSES:
        return f"{status} service unavailable"
    if worker_died(status, text):
        return f"{status} worker died"
    return None


def describe(entry: RequestHistory) -> str:
    """Why a try was sent again, from an entry of urllib3's retry history (which holds no body: a
    status other than a ``RETRY_STATUSES`` one is there because its answer said "Worker died.")."""
    if entry.error is not None:
        return f"connection error ({type(entry.error).__name__})"
    return retry_reason(entry.status, "") or f"{entry.status} worker died"


class PolicyRetry(Retry):
    """urllib3's ``Retry`` for one call of ``predict``: what it retries and counts, with the policy's
    jittered back-off, its bound on total time (counted from ``start``) and a log line per retry.

    A POST is retried (both actions only read the model) on ``RETRY_STATUSES`` and on connection
    errors, the refused or reset connection included, but not on a read timeout. The waits stay the
    policy's: urllib3's own back-off sends the first retry at once, adds its jitter instead of scaling
    by it, and has no bound on time.
    """

    def __init__(
        self,
        *args: Any,
        policy: RetryPolicy = NO_RETRY,
        rng: random.Random | None = None,
        start: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.policy, self.rng, self.start = policy, rng or random.Random(), start
        self.wait = 0.0

    @classmethod
    def starting_now(cls, policy: RetryPolicy, rng: random.Random) -> PolicyRetry:
        return cls(
            total=policy.attempts - 1,
            allowed_methods=frozenset({"POST"}),
            status_forcelist=RETRY_STATUSES,
            raise_on_status=False,  # the last answer is returned, whatever it is
            respect_retry_after_header=False,
            policy=policy,
            rng=rng,
            start=time.monotonic(),
        )

    def new(self, **kw: Any) -> PolicyRetry:
        retry = super().new(**kw)
        retry.policy, retry.rng, retry.start = self.policy, self.rng, self.start
        return retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> PolicyRetry:
        if isinstance(error, ReadTimeoutError):
            raise error  # urllib3 would retry it as it does a reset; the server may still be working on it
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # MaxRetryError past attempts
        retry.wait = self.policy.delay(len(retry.history), self.rng)
        if time.monotonic() - self.start + retry.wait > self.policy.total:
            reason = error or ResponseError(f"no retry starts {self.policy.total} s after the first try")
            raise MaxRetryError(_pool, url or "", reason) from reason
        log.info("retry %d of %s in %.2f s: %s", len(retry.history), url, retry.wait, describe(retry.history[-1]))
        return retry

    def get_backoff_time(self) -> float:
        return self.wait


@dataclass
class Reply:
    """The final answer of one call and how many tries it took (``retries`` says why each retry)."""

    response: requests.Response
    attempts: int
    retries: list[str] = field(default_factory=list)

    @property
    def status_code(self) -> int:
        return self.response.status_code

    def json(self) -> Any:
        return self.response.json()


class BookrecClient:
    """``POST /predictions/<model>`` with retries; one keep-alive session, so one client per thread."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        model: str = "bookrec",
        policy: RetryPolicy | None = None,
        timeout: float = 60.0,
        seed: int | None = None,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.session = requests.Session()
        self._adapter = HTTPAdapter()
        self.session.mount(self.endpoint, self._adapter)
        self._rng = random.Random(seed)

    @classmethod
    def from_key_file(cls, url: str, key_file: Path, **kwargs: Any) -> BookrecClient:
        """A client with the inference key TorchServe wrote (no token when the file is absent)."""
        return cls(url, inference_key(Path(key_file)), **kwargs)

    def predict(self, body: dict[str, Any] | bytes) -> Reply:
        """Send one request; retried as the policy allows. Raises the last connection error when
        no try reached the server."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        retry = PolicyRetry.starting_now(self.policy, self._rng)
        while True:
            self._adapter.max_retries = retry  # this call's budget, so far (one client per thread)
            resp = self.session.post(self.endpoint, data=data, headers=self.headers, timeout=self.timeout)
            retry = resp.raw.retries
            # urllib3 decides on the status alone, but "Worker died." comes with 500, 413 or 507, which
            # TorchServe also sends as final answers (the handler's own 500, a body over the size limit):
            # only the body tells them apart, and requests reads the body after urllib3 has returned.
            if not worker_died(resp.status_code, resp.text):
                break
            try:
                retry = retry.increment(resp.request.method, resp.request.path_url, response=resp.raw)
            except MaxRetryError:
                break
            retry.sleep()
        return Reply(resp, len(retry.history) + 1, [describe(entry) for entry in retry.history])

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> BookrecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--data", required=True, help="the request JSON (@FILE reads it from FILE)")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's token file")
    defaults = RetryPolicy()
    parser.add_argument("--attempts", type=int, default=defaults.attempts, help="tries in all (1: no retry)")
    parser.add_argument("--max-time", type=float, default=defaults.total, help="no retry after this many seconds")
    args = parser.parse_args(argv)
    data = Path(args.data[1:]).read_bytes() if args.data.startswith("@") else args.data.encode()
    policy = RetryPolicy(attempts=args.attempts, total=args.max_time)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its warning on a broken connection repeats our retry line
    with BookrecClient.from_key_file(args.url, args.key_file, policy=policy) as client:
        reply = client.predict(data)
    print(reply.response.text.strip())
    print(f"HTTP {reply.status_code} after {reply.attempts} attempt(s)", file=sys.stderr)
    return 0 if reply.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
