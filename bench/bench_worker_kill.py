"""Requests lost when a TorchServe worker is SIGKILLed under load, without and with client retries.

    .venv/bin/python bench/bench_worker_kill.py --run-dir runs/demo --out /tmp/worker_kill.json

Each scenario builds the archive with its number of workers, starts a private TorchServe on free
loopback ports (``serving/local_server.py``) and drives it for ``--duration`` seconds with
``--concurrency`` threads, each a ``serving.client.BookrecClient`` (its own keep-alive session)
sending rate (1 book) and recommend (k=10) requests of random known users back to back. At
``--kill-at`` seconds one worker of our own server gets SIGKILL. Final answers are counted by
status; a monitor polls ``/ping``, the management API's worker list and ``serving.healthcheck``
every 0.2 s and records what each said while the model had no READY worker, and when the killed
worker's replacement was READY.

Scenarios: ``baseline`` (1 worker, no retry: what users saw), ``retry-1w`` (1 worker, the client's
default retry policy), ``retry-2w`` (2 workers, default policy: the shipped set-up on this box).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_serve import make_bodies  # noqa: E402

from serving.client import NO_RETRY, BookrecClient, RetryPolicy  # noqa: E402
from serving.healthcheck import healthy  # noqa: E402
from serving.local_server import LocalServer  # noqa: E402

SCENARIOS = {"baseline": (1, False), "retry-1w": (1, True), "retry-2w": (2, True)}


@dataclass
class Sample:
    """One call: when it started (s after the load began), how long it took, its final answer."""

    start: float
    seconds: float
    status: str
    attempts: int


@dataclass
class Monitor:
    """Polls the server's health signals; ``events`` holds (time, signal, value) at each change."""

    server: LocalServer
    t0: float
    events: list[tuple[float, str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    killed: tuple[str, int] | None = None  # (worker id, pid)
    kill_time: float | None = None
    back_time: float | None = None
    gap_pings: Counter = field(default_factory=Counter)
    gap_checks: Counter = field(default_factory=Counter)

    def _note(self, now: float, name: str, value: str, last: dict[str, str]) -> None:
        if last.get(name) != value:
            last[name] = value
            self.events.append((round(now, 2), name, value))

    def run(self) -> None:
        last: dict[str, str] = {}
        srv = self.server
        while not self.stop.is_set():
            now = time.monotonic() - self.t0
            try:
                ping = requests.get(f"{srv.inference_url}/ping", headers=srv.headers(), timeout=5)
                ping_text = f"{ping.status_code} {ping.json().get('status')}"
                workers = srv.workers()
            except (requests.RequestException, ValueError, KeyError, IndexError) as err:
                ping_text, workers = f"error {type(err).__name__}", []
            check_ok, _ = healthy(srv.inference_url, srv.workdir / "key_file.json", 5, srv.management_url)
            check = "healthy" if check_ok else "unhealthy"
            states = ", ".join(f"{w['id']}:{w['pid']}:{w['status']}" for w in workers)
            self._note(now, "ping", ping_text, last)
            self._note(now, "workers", states, last)
            self._note(now, "healthcheck", check, last)
            if not any(w["status"] == "READY" for w in workers):
                self.gap_pings[ping_text] += 1
                self.gap_checks[check] += 1
            if self.killed and self.back_time is None:
                wid, pid = self.killed
                if any(w["id"] == wid and w["pid"] != pid and w["status"] == "READY" for w in workers):
                    self.back_time = now
            time.sleep(0.2)


def all_ready(server: LocalServer, workers: int, timeout: float = 300.0) -> None:
    """Until every worker is READY (``LocalServer.start`` returns at the first)."""
    deadline = time.monotonic() + timeout
    while sum(w["status"] == "READY" for w in server.workers()) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {workers} workers READY after {timeout:.0f} s\n{server.log_tail()}")
        time.sleep(0.5)


def kill_a_worker(server: LocalServer, monitor: Monitor) -> None:
    """SIGKILL the first READY worker, which must be a child of our own server's process group."""
    worker = next(w for w in server.workers() if w["status"] == "READY")
    pid = int(worker["pid"])
    if os.getpgid(pid) != server.proc.pid:
        raise RuntimeError(f"worker {pid} is not ours")
    monitor.killed = (worker["id"], pid)
    monitor.kill_time = time.monotonic() - monitor.t0
    os.kill(pid, signal.SIGKILL)


def drive(
    server: LocalServer, bodies: list[bytes], policy: RetryPolicy, concurrency: int, duration: float, kill_at: float
) -> tuple[list[Sample], Monitor, float]:
    token = server.keys().get("inference")
    samples: list[Sample] = []
    lock = threading.Lock()
    t0 = time.monotonic() + 1.0  # all threads begin together
    monitor = Monitor(server, t0)

    def client(k: int) -> None:
        rng = random.Random(k)
        with BookrecClient(server.inference_url, token, policy=policy, seed=k) as c:
            c.predict(bodies[k])  # connect, warm
            while time.monotonic() < t0:
                time.sleep(0.001)
            while (start := time.monotonic()) < t0 + duration:
                try:
                    reply = c.predict(rng.choice(bodies))
                    status, attempts = str(reply.status_code), reply.attempts
                except requests.RequestException as err:
                    status, attempts = f"error {type(err).__name__}", policy.attempts
                end = time.monotonic()
                with lock:
                    samples.append(Sample(start - t0, end - start, status, attempts))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    watcher = threading.Thread(target=monitor.run)
    for t in (*threads, watcher):
        t.start()
    while time.monotonic() < t0 + kill_at:
        time.sleep(0.01)
    kill_a_worker(server, monitor)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    # Keep watching until the replacement is READY (the load may end before it is).
    deadline = time.monotonic() + 120
    while monitor.back_time is None and time.monotonic() < deadline:
        time.sleep(0.2)
    monitor.stop.set()
    watcher.join()
    return samples, monitor, wall


def quantiles(seconds: list[float]) -> dict[str, float]:
    if len(seconds) < 2:
        return {"n": len(seconds)}
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1), "max_ms": round(ms[-1], 1)}


def load_times(server: LocalServer) -> list[float]:
    """Each worker's handler initialisation (s), from its "ready in X s" log line, in start order."""
    path = server.logs / "model_log.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return [float(x) for x in re.findall(r"ready in ([0-9.]+) s", text)]


def report(samples: list[Sample], monitor: Monitor, wall: float) -> dict[str, Any]:
    kill, back = monitor.kill_time, monitor.back_time
    # Calls in flight at some moment between the kill and the replacement's READY.
    end = back or wall
    during = [s.seconds for s in samples if kill is not None and s.start <= end and s.start + s.seconds >= kill]
    per_second = Counter(int(s.start + s.seconds) for s in samples if s.status == "200")
    gap = [e for e in monitor.events if e[1] == "workers" and "READY" not in e[2]]
    return {
        "answers": dict(sorted(Counter(s.status for s in samples).items())),
        "lost": sum(s.status != "200" for s in samples),
        "retried_calls": sum(s.attempts > 1 for s in samples),
        "rps": round(len(samples) / wall, 1),
        "latency": quantiles([s.seconds for s in samples]),
        "latency_during_recovery": quantiles(during),
        "kill_s": kill,
        "worker_back_s": None if back is None or kill is None else round(back - kill, 2),
        "first_no_ready_worker_s": gap[0][0] if gap else None,
        "ping_while_no_ready_worker": dict(monitor.gap_pings),
        "healthcheck_while_no_ready_worker": dict(monitor.gap_checks),
        "answers_200_per_second": [per_second.get(i, 0) for i in range(int(wall) + 1)],
        "events": monitor.events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per scenario")
    parser.add_argument("--kill-at", type=float, default=20.0, help="SIGKILL a worker this many seconds in")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--allow-code-change", action="store_true", help="archive a run trained with other model/ code (timing only)"
    )
    args = parser.parse_args()
    if not 0 < args.kill_at < args.duration:
        parser.error(f"--kill-at must lie inside the load (0, {args.duration}), got {args.kill_at}")

    from model.catalog import Catalog
    from serving.archive import build_archive
    from train.run_folder import machine

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bookrec-kill-") as tmp:
        tmp_dir = Path(tmp)
        stores = {}
        for workers in sorted({SCENARIOS[name][0] for name in args.scenarios}):
            stores[workers] = tmp_dir / f"store-{workers}"
            build_archive(args.run_dir, stores[workers], workers=workers, allow_code_change=args.allow_code_change)
        with zipfile.ZipFile(next(iter(stores.values())) / "bookrec.mar") as zf:
            zf.extractall(tmp_dir / "unpacked")
        catalog = Catalog.load(tmp_dir / "unpacked")
        bodies = make_bodies(catalog, "rate_1", 128, seed=0) + make_bodies(catalog, "recommend_10", 128, seed=1)
        del catalog
        for name in args.scenarios:
            workers, retry = SCENARIOS[name]
            policy = RetryPolicy() if retry else NO_RETRY
            load_before = os.getloadavg()[0]
            with LocalServer(stores[workers], tmp_dir / f"server-{name}") as server:
                all_ready(server, workers)
                samples, monitor, wall = drive(server, bodies, policy, args.concurrency, args.duration, args.kill_at)
                time.sleep(1)  # async logging: let the replacement's "ready" line reach the file
                inits = load_times(server)
            results[name] = {
                "workers": workers,
                "policy": asdict(policy),
                "load_average_before": round(load_before, 2),
                **report(samples, monitor, wall),
                "handler_init_s": inits,
            }
            row = {k: v for k, v in results[name].items() if k not in ("events", "answers_200_per_second")}
            print(f"{name}: {json.dumps(row)}", flush=True)
    out = {
        "machine": machine(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "kill_at_s": args.kill_at,
        "results": results,
    }
    print(markdown(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "| scenario | workers | answers by status | lost | retried calls | req/s | p50 / p99 (ms) "
        "| p99 / max during recovery (ms) | worker back (s) |",
        "|---|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for name, r in out["results"].items():
        lat, rec = r["latency"], r["latency_during_recovery"]
        answers = ", ".join(f"{k}: {v}" for k, v in r["answers"].items())
        lines.append(
            f"| {name} | {r['workers']} | {answers} | {r['lost']} | {r['retried_calls']} | {r['rps']} "
            f"| {lat.get('p50_ms')} / {lat.get('p99_ms')} | {rec.get('p99_ms')} / {rec.get('max_ms')} "
            f"| {r['worker_back_s']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
