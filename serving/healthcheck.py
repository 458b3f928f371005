"""Health check of a running bookrec TorchServe: ``/ping`` with the inference token, stdlib only.

    python -m serving.healthcheck --url http://127.0.0.1:8080 --key-file key_file.json

Exit status 0 when TorchServe answers ``{"status": "Healthy"}``, 1 otherwise (the Docker
HEALTHCHECK runs it). With token authorization on, ``/ping`` needs the inference key, which
TorchServe writes to key_file.json in its working directory at start.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def inference_key(key_file: Path) -> str | None:
    """The inference key, or None when the file is absent (token authorization disabled) or not
    written whole yet (TorchServe creates it empty, then fills it)."""
    try:
        return json.loads(key_file.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError):
        return None


def healthy(url: str, key_file: Path, timeout: float = 5.0) -> tuple[bool, str]:
    request = urllib.request.Request(f"{url.rstrip('/')}/ping")
    key = inference_key(key_file)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            return resp.status == 200 and json.loads(body).get("status") == "Healthy", body.strip()
    except (urllib.error.URLError, OSError, ValueError) as err:
        return False, f"{type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    ok, detail = healthy(args.url, args.key_file, args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
