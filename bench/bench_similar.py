"""The "similar books" protocol (EVALUATION.md) on a finished run, and the in-process latency of the
``similar`` action, without rerunning the evaluate step.

    python bench/bench_similar.py --run runs/bookcrossing [--out bench/similar.json] [--calls 300]

Recall@10 of the model's similar books against item-kNN and RP3beta item-item lists, all tuned on
validation pairs (``train/evaluation/similar.py``); then p50/p95 of ``BookrecEngine.run`` on one
``similar`` request (k=10) for a random catalog book and for a new book given by its text.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handlers.engine import BookrecEngine  # noqa: E402
from model import layout  # noqa: E402
from train.config import load_config  # noqa: E402
from train.evaluation.similar import evaluate_similar, similar_markdown  # noqa: E402
from train.evaluation.topk import training_matrix  # noqa: E402
from train.run_folder import machine  # noqa: E402


def latency(engine: BookrecEngine, calls: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """p50/p95 milliseconds of one similar request, a catalog book and a new book."""
    rng = random.Random(seed)
    isbns = engine.catalog.books["isbn"].tolist()
    books = engine.catalog.books.sample(n=min(calls, len(isbns)), random_state=seed)
    new = [
        {"title": f"{t} (new edition)", "author": a, "year": 2004, "publisher": p}
        for t, a, p in zip(books["title"], books["author"], books["publisher"], strict=True)
    ]
    makers = {
        "catalog book": lambda: {"action": "similar", "book": rng.choice(isbns), "k": 10},
        "new book": lambda: {"action": "similar", "book": rng.choice(new), "k": 10},
    }
    out = {}
    for name, make in makers.items():
        times = []
        for _ in range(calls):
            body = make()
            start = time.perf_counter()
            status, _ = engine.run([body])[0]
            times.append((time.perf_counter() - start) * 1000)
            assert status == 200
        ordered = sorted(times)
        out[name] = {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "bookcrossing")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    cfg = load_config(args.run / "config.yaml")
    # A run folder from before models had a manifest is read as it is (verified=True skips the check).
    engine = BookrecEngine(args.run, verified=not (args.run / layout.MANIFEST_FILE).is_file())
    engine.warm_up()
    ratings = pd.read_parquet(args.run / layout.DATA_DIR / layout.DATA_RATINGS)
    train = training_matrix(engine.catalog)
    report = evaluate_similar(engine.similar, train, engine.catalog, ratings, cfg.eval.topk_tuning, cfg.split.seed)
    print(similar_markdown(report))
    report["latency_in_process"] = latency(engine, args.calls)
    report["machine"] = machine()
    report["run"] = str(args.run)
    print(json.dumps(report["latency_in_process"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
