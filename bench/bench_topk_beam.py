"""Top-10 for every user through Beam against Spark ALS ``recommendForAllUsers(10)``, in one run.

    python bench/bench_topk_beam.py --run runs/bookcrossing [--k 10] [--repeats 1]

Runs, in turn on the same machine: the batch job (``python -m batch --mode topk``, default
DirectRunner on every core, the two-stage recommender) over every user x every book, then Spark
ALS (rank 10, pyspark local mode, Java 17) fitted on the same training history and timed on
``recommendForAllUsers``. Both ``beam_job`` and ``spark_peer`` are the ones ``bench_batch.py`` uses.
Prints and optionally writes a JSON with wall times and pairs/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_batch import beam_job, cores, spark_peer  # noqa: E402


def _load_average() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "bookcrossing")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternating Beam / Spark rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    rounds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bookrec-topk-beam-") as tmp:
            load = _load_average()
            beam = beam_job(args.run, Path(tmp) / "top", ["--mode", "topk", "--k", str(args.k)])
        t = time.perf_counter()
        spark = spark_peer(args.run, args.k)
        spark_wall = time.perf_counter() - t
        rounds.append(
            {
                "load_average_before": load,
                "beam_wall_s": round(beam["wall_s"], 1),
                "beam_pairs_per_s": beam["pairs"] / beam["wall_s"],
                "beam_peak_rss_mb": round(beam["peak_rss_bytes"] / 2**20),
                "users": beam["users"],
                "books": beam["books"],
                "spark": spark,
                "spark_total_s": round(spark_wall, 1),
                "beam_over_spark_recommend": (beam["wall_s"] / spark["recommend_s"]) if spark else None,
            }
        )
        print(json.dumps(rounds[-1], indent=2), flush=True)
    result = {
        "cores": cores(),
        "command": "python bench/bench_topk_beam.py " + " ".join(sys.argv[1:]),
        "rounds": rounds,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
