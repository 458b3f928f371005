"""Health check of a running bookrec TorchServe: ``/ping`` and a live worker, stdlib only.

    python -m serving.healthcheck --url http://127.0.0.1:8080 --key-file key_file.json

Exit status 0 when TorchServe answers ``{"status": "Healthy"}`` on ``/ping`` *and* the management
API lists at least one READY worker of the model, 1 otherwise (the Docker HEALTHCHECK runs it).
``/ping`` alone is not enough: while the only worker is dead or still loading its replacement,
TorchServe 0.12 keeps answering ``Healthy`` (docs/SERVING.md, "Retries and worker crashes"). With
token authorization on, ``/ping`` needs the inference key and the management API the management
key, both in the key_file.json TorchServe writes to its working directory at start.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def token(key_file: Path, kind: str = "inference") -> str | None:
    """One key from key_file.json (``inference`` or ``management``), or None when the file is absent
    (token authorization disabled) or not written whole yet (TorchServe creates it empty, then fills it)."""
    try:
        return json.loads(key_file.read_text())[kind]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inference_key(key_file: Path) -> str | None:
    """The inference key (see ``token``)."""
    return token(key_file, "inference")


def _get(url: str, key: str | None, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def ready_workers(management_url: str, key_file: Path, model: str = "bookrec", timeout: float = 5.0) -> list[str]:
    """The status of each worker of ``model`` (``READY`` once its model is loaded), from the
    management API's model description. Raises ``RuntimeError`` on any other answer."""
    status, body = _get(f"{management_url.rstrip('/')}/models/{model}", token(key_file, "management"), timeout)
    if status != 200:
        raise RuntimeError(f"management API answered {status}: {body.strip()[:200]}")
    return [str(worker.get("status")) for worker in json.loads(body)[0].get("workers", [])]


def healthy(
    url: str,
    key_file: Path,
    timeout: float = 5.0,
    management_url: str | None = "http://127.0.0.1:8081",
    model: str = "bookrec",
) -> tuple[bool, str]:
    """(healthy, what was seen): ``/ping`` Healthy and, unless ``management_url`` is None, a READY worker."""
    try:
        status, body = _get(f"{url.rstrip('/')}/ping", inference_key(key_file), timeout)
        ping = body.strip().replace("\n", "")
        if status != 200 or json.loads(body).get("status") != "Healthy":
            return False, f"ping {status}: {ping}"
        if management_url is None:
            return True, ping
        workers = ready_workers(management_url, key_file, model, timeout)
    except (urllib.error.URLError, OSError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        return False, f"{type(err).__name__}: {err}"
    ready = workers.count("READY")
    detail = f"{ping}; {ready} of {len(workers)} {model} workers READY ({', '.join(workers) or 'none'})"
    return ready > 0, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument(
        "--management-url",
        default="http://127.0.0.1:8081",
        help="management address, for the worker check; 'none' checks /ping only",
    )
    parser.add_argument("--model", default="bookrec")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    management = None if args.management_url.lower() == "none" else args.management_url
    ok, detail = healthy(args.url, args.key_file, args.timeout, management, args.model)
    print(("healthy: " if ok else "unhealthy: ") + detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
