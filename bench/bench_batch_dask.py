"""The batch job on a Dask cluster against the DirectRunner, same job, same machine.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_batch_dask.py --run RUN --users 8000 --workers 2

For each mode (all pairs, top-10) it runs ``python -m batch`` as a command, as a user would:

1. on the default DirectRunner (multi-process, ``--workers`` worker processes);
2. on a Dask cluster of separate processes on 127.0.0.1 (``batch/dask_cluster.py``: one
   ``dask scheduler``, ``--workers`` ``dask worker`` processes with one thread each), started once
   and reused by every repeat, as a standing cluster is.

The user set is ``--users`` users whose feature rows repeat the catalog's (``--user-features``), so
the job size does not depend on the run's catalog. Reported per runner: the command's wall time
(interpreter start, planning, the job, the commit), the job's own time from ``_SUCCESS``
(``seconds``), pairs/s over the job's time, and the model loads per worker process (from
``_SUCCESS``: the first job on a standing cluster loads the model once per worker, later jobs
reuse it). The CPU time other processes used meanwhile is recorded too: on a shared machine it
tells a slow machine from a slow runner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.dask_cluster import LoopbackCluster  # noqa: E402
from model.catalog import Catalog  # noqa: E402


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (every process)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children (the job's processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def user_features(run: Path, n: int, path: Path) -> Path:
    feats = Catalog.load(run).user_feats.numpy()
    rows = np.arange(n) % len(feats)
    column = pa.array(list(feats[rows]), pa.list_(pa.float32()))
    pq.write_table(pa.table({"user_id": pa.array(np.arange(1, n + 1), pa.int64()), "features": column}), path)
    return path


def job(run: Path, out: Path, features: Path, mode: str, runner: list[str], cwd: Path) -> dict:
    """One ``python -m batch`` command: its wall time, the job's own summary, the machine's load."""
    flags = ["--model", str(run), "--output", str(out), "--user-features", str(features), "--no-progress"]
    flags += ["--mode", "topk", "--k", "10"] if mode == "topk" else []
    busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "batch", *flags, *runner], cwd=cwd, env=env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"batch job failed ({' '.join(runner)}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    others = max(0.0, (busy_seconds() - busy) - (own_seconds() - own))
    return {"wall_s": wall, "job_s": summary["seconds"], "summary": summary, "other_cores": others / wall}


def row(name: str, results: list[dict], pairs: int) -> dict:
    job_s = statistics.median(r["job_s"] for r in results)
    loads = [{w: c["model_loads"] for w, c in r["summary"].get("workers", {}).items()} for r in results]
    return {
        "runner": name,
        "wall_s": round(statistics.median(r["wall_s"] for r in results), 2),
        "job_s": round(job_s, 2),
        "pairs_per_s": round(pairs / job_s),
        "other_cores": round(max(r["other_cores"] for r in results), 2),
        "model_loads_per_worker": loads,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="training run folder (or unpacked archive)")
    p.add_argument("--users", type=int, default=8000, help="users scored (catalog feature rows repeated)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, both runners")
    p.add_argument("--repeats", type=int, default=2, help="runs per runner and mode (the median is reported)")
    p.add_argument("--modes", default="all,topk", help="comma-separated: all, topk")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    run = args.run.absolute()
    n_books = len(Catalog.load(run).books)
    pairs = args.users * n_books
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-dask-") as tmp:
        root = Path(tmp)
        features = user_features(run, args.users, root / "users.parquet")
        with LoopbackCluster(args.workers, root / "cluster", env=env()) as cluster:
            runners = {
                "DirectRunner": ["--workers", str(args.workers)],
                "DaskRunner": ["--runner=DaskRunner", f"--dask_client_address={cluster.address}"],
            }
            for mode in args.modes.split(","):
                for name, flags in runners.items():
                    done = [job(run, root / f"{mode}-{name}", features, mode, flags, root) for _ in range(args.repeats)]
                    results.append({"mode": mode, **row(name, done, pairs)})
                    print(json.dumps(results[-1]), flush=True)
    report = {
        "users": args.users,
        "books": n_books,
        "pairs": pairs,
        "workers": args.workers,
        "repeats": args.repeats,
        "cores": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
