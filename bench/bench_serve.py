"""Latency and throughput of bookrec through TorchServe against the same handler in-process.

    .venv/bin/python bench/bench_serve.py --run-dir runs/bookcrossing --out bench/serve_results.json

Scenarios: rate (1 pair), rate (100 pairs), rate of 100 new books (each embedded by the run's encoder
in the request), recommend (k=10 over the whole catalog) for a known and for a new user, each at
concurrency 1, 8 and 32 and with a bounded number of requests. "In-process" constructs the
handler from the unpacked archive with TorchServe's own ``Context`` and calls ``handle`` directly:
one request per call at concurrency 1, a batch of ``c`` requests per call at concurrency ``c`` (the
best TorchServe's batching could do). "TorchServe" starts a private server on free loopback ports
and drives it with ``c`` client threads on keep-alive connections. Both load the same archive in
the same run; the ratio of their latencies is TorchServe's overhead.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCENARIOS = ("rate_1", "rate_100", "rate_100_new", "recommend_10", "recommend_new_user", "similar")
LABELS = {
    "rate_1": "rate (1 pair)",
    "rate_100": "rate (100 pairs)",
    "rate_100_new": "rate (100 new books)",
    "recommend_10": "recommend (k=10)",
    "recommend_new_user": "recommend (k=10, new user)",
    "similar": "similar (k=10, a catalog book)",
}


def new_books(books: Any, rng: random.Random, n: int) -> list[dict]:
    """``n`` books the catalog does not hold: catalog metadata under a title no request sent before."""
    rows = books.sample(n, random_state=rng.randrange(2**31))
    out = []
    for row in rows.itertuples(index=False):
        book = {"title": f"{row.title} (edition {rng.randrange(10**6)})"}
        if isinstance(row.author, str):
            book["author"] = row.author
        if isinstance(row.publisher, str):
            book["publisher"] = row.publisher
        out.append(book)
    return out


def make_bodies(catalog: Any, scenario: str, n: int, seed: int) -> list[bytes]:
    """``n`` distinct request bodies (random known users and ISBNs, fixed seed)."""
    rng = random.Random(seed)
    users = catalog.users["user_id"].tolist()
    isbns = catalog.books["isbn"].tolist()
    bodies = []
    for _ in range(n):
        user = {"user_id": int(rng.choice(users))}
        if scenario == "rate_1":
            body = {"action": "rate", "user": user, "books": [rng.choice(isbns)]}
        elif scenario == "rate_100":
            body = {"action": "rate", "user": user, "books": rng.sample(isbns, 100)}
        elif scenario == "rate_100_new":
            body = {"action": "rate", "user": user, "books": new_books(catalog.books, rng, 100)}
        elif scenario == "similar":
            body = {"action": "similar", "book": rng.choice(isbns), "k": 10}
        elif scenario == "recommend_new_user":
            ratings = [{"isbn": isbn, "rating": rng.randint(1, 10)} for isbn in rng.sample(isbns, 5)]
            new_user = {"city": "lisbon", "country": "portugal", "age": rng.randint(18, 80), "ratings": ratings}
            body = {"action": "recommend", "user": new_user, "k": 10}
        else:
            body = {"action": "recommend", "user": user, "k": 10}
        bodies.append(json.dumps(body).encode())
    return bodies


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(q[94], 2),
        "p99_ms": round(q[98], 2),
        "rps": round(len(ms) / wall, 1),
    }


# ----------------------------------------------------------------------------------- in-process
def load_handler(model_dir: Path) -> tuple[Any, Any]:
    import ts
    import yaml
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    sys.path.insert(0, str(model_dir))
    import bookrec_handler

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    # BaseHandler.handle reports HandlerTime (and @timed the stages) to TorchServe's metrics cache.
    metrics = MetricsCacheYamlImpl(Path(ts.__file__).parent / "configs" / "metrics.yaml")
    metrics.initialize_cache()
    context = Context(
        "bookrec",
        str(model_dir),
        manifest,
        config["batchSize"],
        None,
        "0.12.0",
        metrics=metrics,
        model_yaml_config=config,
    )
    handler = bookrec_handler.BookrecHandler()
    handler.initialize(context)
    return handler, context


def call_in_process(handler: Any, context: Any, bodies: list[bytes]) -> None:
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor({}) for _ in bodies]
    context.request_ids = context.metrics.request_ids = {i: f"bench-{i}" for i in range(len(bodies))}
    handler.handle([{"body": b} for b in bodies], context)
    for i in range(len(bodies)):
        status = context.get_response_status(i)[0]
        if status != 200:
            raise RuntimeError(f"in-process request failed with {status}")


def bench_in_process(handler: Any, context: Any, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    for i in range(0, min(len(bodies), 20 * concurrency), concurrency):  # warm-up
        call_in_process(handler, context, bodies[i : i + concurrency])
    latencies = []
    start = time.perf_counter()
    done = 0
    while done < requests:
        batch = [bodies[(done + j) % len(bodies)] for j in range(concurrency)]
        t0 = time.perf_counter()
        call_in_process(handler, context, batch)
        latencies += [time.perf_counter() - t0] * concurrency
        done += concurrency
    return summary(latencies, time.perf_counter() - start)


# ---------------------------------------------------------------------------------- TorchServe
def bench_server(
    port: int, token: str, bodies: list[bytes], concurrency: int, requests: int, warm_up_s: float = 0.0
) -> dict:
    """``concurrency`` threads, each with its own keep-alive connection, share ``requests`` requests
    after unmeasured warm-up requests: at least 5 each, and more until ``warm_up_s`` seconds have
    passed (TorchServe's frontend is a JVM: its JIT compiles the request path during the first
    thousand or so requests, so a server that has been running answers faster than a fresh one)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    counter = iter(range(requests))
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []

    def send(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, int]:
        t0 = time.perf_counter()
        conn.request("POST", "/predictions/bookrec", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            errors.append(str(resp.status))
        return elapsed, int(resp.getheader("x-bookrec-batch-size", "0"))

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        warm_until = time.perf_counter() + warm_up_s
        j = 0
        while j < 5 or time.perf_counter() < warm_until:
            send(conn, bodies[(k * 5 + j) % len(bodies)])
            j += 1
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            elapsed, batch = send(conn, bodies[i % len(bodies)])
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(batch)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:5]}")
    out = summary(latencies, wall)
    out["mean_batch"] = round(statistics.mean(batch_sizes), 1)
    return out


def markdown(results: dict) -> str:
    lines = [
        "| scenario | concurrency | TorchServe p50 / p95 / p99 (ms) | TorchServe req/s | mean batch "
        "| in-process p50 / p95 / p99 (ms) | in-process req/s | p50 ratio TS / in-process |",
        "|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for scenario in (s for s in SCENARIOS if s in results):
        for c, row in results[scenario].items():
            ts, ip = row["torchserve"], row["in_process"]
            lines.append(
                f"| {LABELS[scenario]} | {c} | {ts['p50_ms']} / {ts['p95_ms']} / {ts['p99_ms']} | {ts['rps']} "
                f"| {ts['mean_batch']} | {ip['p50_ms']} / {ip['p95_ms']} / {ip['p99_ms']} | {ip['rps']} "
                f"| {ts['p50_ms'] / ip['p50_ms']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bookcrossing")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per scenario and concurrency")
    parser.add_argument("--recommend-requests", type=int, default=200, help="the same for recommend (slower)")
    parser.add_argument("--max-batch-delay", type=int, default=None, help="archive maxBatchDelay (ms)")
    parser.add_argument("--batch-size", type=int, default=None, help="archive batchSize")
    parser.add_argument(
        "--workers", type=int, default=1, help="archive workers (1: the in-process comparison is one handler)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (BOOKREC_TORCH_THREADS)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument(
        "--warm-up", type=float, default=10.0, help="seconds of unmeasured requests before each TorchServe measurement"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--allow-code-change", action="store_true", help="archive a run trained with other model/ code (timing only)"
    )
    args = parser.parse_args()

    from model.catalog import Catalog
    from serving.archive import build_archive
    from serving.local_server import LocalServer

    if args.threads:
        os.environ["BOOKREC_TORCH_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bookrec-bench-") as tmp:
        tmp_dir = Path(tmp)
        options = {k: v for k, v in (("max_batch_delay", args.max_batch_delay), ("batch_size", args.batch_size)) if v}
        archive = build_archive(
            args.run_dir, tmp_dir / "store", workers=args.workers, allow_code_change=args.allow_code_change, **options
        )
        model_dir = tmp_dir / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(model_dir)
        catalog = Catalog.load(model_dir)
        counts = {s: (args.recommend_requests if s.startswith("recommend") else args.requests) for s in args.scenarios}
        bodies = {s: make_bodies(catalog, s, 256, seed=i) for i, s in enumerate(args.scenarios)}
        del catalog

        results: dict[str, dict] = {s: {} for s in args.scenarios}
        handler, context = load_handler(model_dir)
        import torch

        threads = torch.get_num_threads()
        for s in args.scenarios:
            for c in args.concurrency:
                results[s][c] = {"in_process": bench_in_process(handler, context, bodies[s], c, counts[s])}
                print(f"in-process {s} c={c}: {results[s][c]['in_process']}", flush=True)
        del handler, context

        with LocalServer(tmp_dir / "store", tmp_dir / "server") as server:
            token = server.keys()["inference"]
            for s in args.scenarios:
                for c in args.concurrency:
                    results[s][c]["torchserve"] = bench_server(
                        server.ports["inference"], token, bodies[s], c, counts[s], args.warm_up
                    )
                    print(f"torchserve {s} c={c}: {results[s][c]['torchserve']}", flush=True)
            config = json.loads(json.dumps(__import__("yaml").safe_load((model_dir / "model-config.yaml").read_text())))
            worker_rss_mb = [round(psutil.Process(w["pid"]).memory_info().rss / 2**20) for w in server.workers()]
    from train.run_folder import cpu_isa, machine

    load = os.getloadavg()
    report = {
        "machine": machine(),
        "isa": cpu_isa(),
        "load_average_after": [round(x, 2) for x in load],
        "torch_threads_per_worker": threads,
        "torchserve_warm_up_s": args.warm_up,
        "model_config": config,
        "worker_rss_mb_after": worker_rss_mb,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    print()
    print(f"machine: {report['machine']} ({report['isa']}); load average after the run: {report['load_average_after']}")
    print(f"model-config: {config}; torch threads per worker: {threads}")
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
