"""A few example calls against a running bookrec TorchServe (what ``make demo`` shows).

``python -m serving.examples --run-dir runs/demo`` waits for the worker, then rates, recommends and
sends one bad request, printing each answer. Users and ISBNs are taken from the run's catalog. The
calls go through ``serving.client``, which sends a call again when a worker crash lost it (the bad
request is not repeated: a 4xx is final).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import requests

from model import layout
from serving.client import BookrecClient
from serving.healthcheck import inference_key


def wait_ready(url: str, headers: dict[str, str], timeout: float) -> None:
    """Until /ping says Healthy (the worker loads and warms up after ``torchserve --start``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/ping", headers=headers, timeout=5).json().get("status") == "Healthy":
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"TorchServe at {url} was not healthy after {timeout:.0f} s")


def read_key(key_file: Path, deadline: float) -> str:
    """The inference token, once TorchServe has written the key file whole."""
    while (key := inference_key(key_file)) is None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no readable TorchServe key file at {key_file}")
        time.sleep(0.5)
    return key


def examples(run_dir: Path) -> list[tuple[str, dict]]:
    """Titled request bodies using a known user and known books of the run."""
    history = pq.read_table(run_dir / layout.catalog_path(layout.HISTORY_FILE)).to_pandas()
    user_id = int(history["user_id"].value_counts().index[0])
    isbns = history["isbn"].value_counts().index[:3].tolist()
    new_user = {"city": "lyon", "country": "france", "age": 31, "ratings": [{"isbn": isbns[0], "rating": 9}]}
    new_book = {"title": "The Night Garden", "author": "Ann Smith", "year": 2003, "publisher": "Tor"}
    return [
        (
            "rate: a known user, two known books and a new one",
            {"action": "rate", "user": {"user_id": user_id}, "books": [*isbns[1:], new_book]},
        ),
        (
            "recommend: top 5 for the known user, books they rated left out",
            {"action": "recommend", "user": {"user_id": user_id}, "k": 5, "exclude_rated": True},
        ),
        ("recommend: top 3 for a new user with one rating", {"action": "recommend", "user": new_user, "k": 3}),
        ("similar: 5 books readers of the most read book also read", {"action": "similar", "book": isbns[0], "k": 5}),
        ("similar: 3 books like a new book, from its text", {"action": "similar", "book": new_book, "k": 3}),
        (
            "a bad request: k out of range (expect a 4xx naming the field)",
            {"action": "recommend", "user": {"user_id": user_id}, "k": 0},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True, help="the run the archive was built from")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's token file")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)

    history = args.run_dir / layout.catalog_path(layout.HISTORY_FILE)
    if not history.is_file():  # said now, not once the server is up
        print(f"error: --run-dir {args.run_dir}: no {layout.catalog_path(layout.HISTORY_FILE)}", file=sys.stderr)
        return 2
    calls = examples(args.run_dir)
    deadline = time.monotonic() + args.timeout
    try:
        key = read_key(args.key_file, deadline)
        headers = {"Authorization": f"Bearer {key}"}
        wait_ready(args.url, headers, max(1.0, deadline - time.monotonic()))
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    with BookrecClient(args.url, key, timeout=30) as client:
        for title, body in calls:
            answer = client.predict(body)
            retried = f" after {answer.attempts} attempts ({'; '.join(answer.retries)})" if answer.retries else ""
            print(f"\n### {title}\n$ curl -H 'Authorization: Bearer ...' -d '{json.dumps(body)}' {client.endpoint}")
            print(f"HTTP {answer.status_code}{retried}\n{json.dumps(answer.json(), indent=2)[:1500]}")
            ok &= (answer.status_code == 200) == ("bad request" not in title)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
