"""Latency of the serving engine in process, on CPU or GPU, without TorchServe around it.

    python bench/bench_engine.py --run runs/bookcrossing --device cuda [--batches 1 32]

``BookrecEngine`` is what the TorchServe handler calls per batch; this times ``engine.run`` on
batches of ``recommend`` (k=10, known users, read books excluded) and ``rate`` (one known pair)
requests, so a GPU figure exists where no Java runtime is at hand. TorchServe's own overhead is
measured by ``bench/bench_serve.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handlers.engine import BookrecEngine  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request_makers(engine: BookrecEngine, seed: int = 0) -> dict[str, Callable[[], dict]]:
    """Per scenario, a function making one request body: recommend (k=10) for a random known user,
    rate of one random (known user, known book) pair."""
    rng = random.Random(seed)
    users = engine.catalog.users["user_id"].tolist()
    isbns = engine.catalog.books["isbn"].tolist()
    return {
        "recommend_10": lambda: {"action": "recommend", "user": {"user_id": rng.choice(users)}, "k": 10},
        "rate_1": lambda: {"action": "rate", "user": {"user_id": rng.choice(users)}, "books": [rng.choice(isbns)]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "bookcrossing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    engine = BookrecEngine(args.run, device=args.device)
    engine.warm_up()
    bodies = request_makers(engine)
    results = []
    for name, body in bodies.items():
        for batch in args.batches:
            times = []
            for _ in range(args.calls):
                requests = [body() for _ in range(batch)]
                if engine.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                engine.run(requests)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results.append(
                {
                    "scenario": name,
                    "batch": batch,
                    "p50_ms": round(statistics.median(times) * 1e3, 2),
                    "p99_ms": round(percentile(times, 0.99) * 1e3, 2),
                    "requests_per_s": round(batch / statistics.mean(times), 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if engine.device.type == "cuda" else "cpu"
    payload = {
        "device": device,
        "threads": torch.get_num_threads(),
        "books": len(engine.catalog.books),
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
