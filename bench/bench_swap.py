"""Requests during a version swap and a rollback in a real TorchServe (loopback, token auth).

    python bench/bench_swap.py --store /tmp/swap-store --old bookrec.mar --new bookrec-2.0.mar

A private TorchServe (``serving/local_server.py``) serves ``--old``; ``--clients`` threads of the
project's client send ``recommend`` requests (k=10, random known readers) without pause while
``serving/swap.py`` swaps in ``--new`` and then rolls back. Printed per phase: requests sent,
answered 200, failed, p50/p99 latency, and the swap's own duration.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.client import BookrecClient  # noqa: E402
from serving.local_server import LocalServer  # noqa: E402
from serving.swap import Management, swap  # noqa: E402


def known_users(store: Path, archive: str, n: int = 500) -> list[int]:
    with zipfile.ZipFile(store / archive) as zf, zf.open("catalog/history.parquet") as fh:
        users = pq.read_table(fh, columns=["user_id"]).column("user_id").to_pylist()
    return random.Random(0).sample(sorted(set(users)), min(n, len(set(users))))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--old", default="bookrec.mar")
    parser.add_argument("--new", default="bookrec-2.0.mar")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-swap-ts"))
    args = parser.parse_args()
    users = known_users(args.store, args.old)
    answers: list[tuple[float, float, int]] = []  # (sent at, seconds, status)
    stop = threading.Event()

    with LocalServer(args.store.resolve(), args.work, archive=args.old) as server:
        api = Management(server.management_url, server.keys()["management"])

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with BookrecClient(server.inference_url, server.keys()["inference"]) as c:
                while not stop.is_set():
                    body = {"action": "recommend", "user": {"user_id": rng.choice(users)}, "k": 10}
                    t0 = time.monotonic()
                    try:
                        status = c.predict(body).status_code
                    except requests.RequestException:  # no answer: a failure
                        status = -1
                    answers.append((t0, time.monotonic() - t0, status))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        phases = {}
        time.sleep(5)
        for name, archive in (("swap", args.new), ("rollback", args.old)):
            start = time.monotonic()
            done = swap(api, args.store, archive, workers=1)
            end = time.monotonic()
            phases[name] = {"seconds": round(end - start, 1), "start": start, "end": end, "done": done}
            time.sleep(5)
        stop.set()
        for t in threads:
            t.join()
    report = {}
    for name, phase in phases.items():
        inside = [(s, st) for at, s, st in answers if phase["start"] <= at <= phase["end"]]
        lat = [s * 1000 for s, st in inside if st == 200]
        report[name] = {
            "swap_seconds": phase["seconds"],
            "sent": len(inside),
            "answered_200": len(lat),
            "failed": len(inside) - len(lat),
            "p50_ms": round(percentile(lat, 0.5), 1),
            "p99_ms": round(percentile(lat, 0.99), 1),
        }
    every = [st for _, _, st in answers]
    report["whole_soak"] = {"sent": len(every), "failed": sum(st != 200 for st in every)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
