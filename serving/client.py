"""A client of bookrec's inference API that retries what a worker crash loses.

    python -m serving.client --key-file key_file.json -d '{"action": "recommend", "user": {"user_id": 11676}}'

Both actions, ``rate`` and ``recommend``, only read the model, so sending one again is safe. When a
TorchServe worker dies, the frontend answers the requests that worker held with ``"message":
"Worker died."`` (status 500 or 507, or 413 when the worker's exit status was 137, i.e. SIGKILL or
the OOM killer) and queues the next ones until a new worker has loaded. This client sends a request
again on such an answer, on a 503 and on a connection error, after an exponential back-off with
jitter, within a bound on attempts and on total time. Every other answer is final: a bad request
stays a 4xx naming the field, and the handler's own 500 (an unexpected failure of that request) is
not repeated.
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

from serving.healthcheck import inference_key

log = logging.getLogger("bookrec.client")

WORKER_DIED = "worker died."  # TorchServe's error message for the requests a dead worker held


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
    if status == 503:
        return "503 service unavailable"
    if worker_died(status, text):
        return f"{status} worker died"
    return None


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
        self._rng = random.Random(seed)

    @classmethod
    def from_key_file(cls, url: str, key_file: Path, **kwargs: Any) -> BookrecClient:
        """A client with the inference key TorchServe wrote (no token when the file is absent)."""
        return cls(url, inference_key(Path(key_file)), **kwargs)

    def predict(self, body: dict[str, Any] | bytes) -> Reply:
        """Send one request; retried as the policy allows. Raises the last connection error when
        no try reached the server."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        start = time.monotonic()
        retries: list[str] = []
        attempt = 0
        error: requests.ConnectionError | None = None
        while True:
            attempt += 1
            try:
                resp = self.session.post(self.endpoint, data=data, headers=self.headers, timeout=self.timeout)
                error = None
                reason = retry_reason(resp.status_code, resp.text)
                if reason is None:
                    return Reply(resp, attempt, retries)
            except requests.ConnectionError as err:  # refused, reset, or the connect timed out
                resp, error, reason = None, err, f"connection error ({type(err).__name__})"
            wait = self.policy.delay(attempt, self._rng)
            if attempt >= self.policy.attempts or time.monotonic() - start + wait > self.policy.total:
                if error is not None:
                    raise error
                return Reply(resp, attempt, retries)
            retries.append(reason)
            log.info("retry %d of %s in %.2f s: %s", attempt, self.endpoint, wait, reason)
            time.sleep(wait)

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
    with BookrecClient.from_key_file(args.url, args.key_file, policy=policy) as client:
        reply = client.predict(data)
    print(reply.response.text.strip())
    print(f"HTTP {reply.status_code} after {reply.attempts} attempt(s)", file=sys.stderr)
    return 0 if reply.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
