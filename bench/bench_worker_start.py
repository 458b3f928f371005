"""How fast a TorchServe worker is ready, and how fast a SIGKILLed one answers again, per archive.

    .venv/bin/python bench/bench_worker_start.py --store before=/tmp/store-a --store after=/tmp/store-b \
        --rounds 3 --kills 2 --out /tmp/worker_start.json

Each ``--store NAME=FOLDER`` is a model store holding ``bookrec.mar`` (build it with one worker:
``python -m serving.archive --workers 1``). The stores take turns, round after round, so a change
of the machine's load falls on all of them alike. Per turn a private TorchServe
(``serving/local_server.py``) starts on the store, and then ``--kills`` times its worker gets
SIGKILL. Figures, in seconds:

- ``server_ready``: from ``torchserve --start`` to the first READY worker (the frontend's start too);
- ``worker_ready``: from the worker process's own start (its creation time) to the management
  API's READY for it: Python, imports, the handler's initialisation and warm-up;
- ``handler_init``: the part the handler logs itself (``ready in X s``: verify, load, warm-up);
- ``back``: from the SIGKILL to the first 200 answer of a recommend request; ``respawn`` is the
  part of it before the new worker process existed (TorchServe's restart delay).

The load average before each measurement is recorded with it: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.local_server import LocalServer  # noqa: E402

POLL_S = 0.1
READY_LINE = re.compile(r"ready in ([0-9.]+) s")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def ready_worker(server: LocalServer, exclude: set[int] = frozenset()) -> dict[str, Any] | None:
    """The first READY worker not in ``exclude``, or None (also while the API does not answer)."""
    try:
        workers = server.workers()
    except (requests.RequestException, KeyError, IndexError, ValueError):
        return None
    return next((w for w in workers if w.get("status") == "READY" and int(w["pid"]) not in exclude), None)


def handler_inits(server: LocalServer) -> list[float]:
    """Every ``ready in X s`` the handler logged so far, in order."""
    log = server.logs / "model_log.log"
    return [float(x) for x in READY_LINE.findall(log.read_text(errors="replace"))] if log.is_file() else []


def answer_once(server: LocalServer, body: bytes, timeout: float) -> float:
    """Send ``body`` until it is answered 200; the time.time() of that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = requests.post(
                f"{server.inference_url}/predictions/bookrec",
                data=body,
                headers={**server.headers(), "Content-Type": "application/json"},
                timeout=timeout,
            )
            if reply.status_code == 200:
                return time.time()
        except requests.RequestException:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"no 200 answer within {timeout:.0f} s\n{server.log_tail()}")


def kill_and_time(server: LocalServer, body: bytes, timeout: float) -> dict[str, float]:
    """SIGKILL the READY worker (ours: in our server's process group); time its successor."""
    worker = ready_worker(server)
    if worker is None:
        raise RuntimeError("no READY worker to kill")
    pid = int(worker["pid"])
    if os.getpgid(pid) != server.proc.pid:
        raise RuntimeError(f"worker {pid} is not ours")
    inits = len(handler_inits(server))
    load = load_average()
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (new := ready_worker(server, {pid})) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new READY worker within {timeout:.0f} s\n{server.log_tail()}")
        time.sleep(POLL_S)
    ready_at = time.time()
    started_at = psutil.Process(int(new["pid"])).create_time()
    back_at = answer_once(server, body, timeout)
    later = handler_inits(server)[inits:]
    return {
        "load_before": load,
        "back": round(back_at - killed_at, 2),
        "respawn": round(started_at - killed_at, 2),
        "worker_ready": round(ready_at - started_at, 2),
        "handler_init": later[0] if later else None,
    }


def one_turn(name: str, store: Path, kills: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"worker-start-{name}-") as tmp:
        server = LocalServer(store, Path(tmp))
        load = load_average()
        start = time.time()
        server.start(timeout)
        try:
            first = ready_worker(server)
            ready_at = time.time()
            started_at = psutil.Process(int(first["pid"])).create_time()
            user = _a_known_user(server)
            body = json.dumps({"action": "recommend", "user": {"user_id": user}, "k": 10}).encode()
            answer_once(server, body, timeout)
            turn = {
                "load_before": load,
                "server_ready": round(ready_at - start, 2),
                "worker_ready": round(ready_at - started_at, 2),
                "handler_init": (handler_inits(server) or [None])[0],
                "kills": [kill_and_time(server, body, timeout) for _ in range(kills)],
            }
        finally:
            server.stop()
    print(f"{name}: {json.dumps(turn)}", flush=True)
    return turn


def _a_known_user(server: LocalServer) -> int:
    """A catalog user of the served archive (its unpacked catalog, under the server's TEMP)."""
    import pyarrow.parquet as pq

    users = next((server.workdir / "tmp").rglob("catalog/users.parquet"))
    return int(pq.ParquetFile(users).read(columns=["user_id"]).column(0)[0].as_py())


def summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each figure over the turns (first starts) and over the kills."""

    def stats(values: list[float]) -> dict[str, float]:
        values = [v for v in values if v is not None]
        return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "n": len(values)}

    kills = [k for t in turns for k in t["kills"]]
    out = {f"start_{key}": stats([t[key] for t in turns]) for key in ("server_ready", "worker_ready", "handler_init")}
    for key in ("back", "respawn", "worker_ready", "handler_init"):
        out[f"kill_{key}"] = stats([k[key] for k in kills])
    out["load_before"] = stats([t["load_before"] for t in turns] + [k["load_before"] for k in kills])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", required=True, metavar="NAME=FOLDER", help="a model store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per server start")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    stores = dict(item.split("=", 1) for item in args.store)
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in stores}
    for _ in range(args.rounds):
        for name, store in stores.items():
            turns[name].append(one_turn(name, Path(store), args.kills, args.timeout))
    result = {
        "machine": _machine(),
        "stores": stores,
        "summary": {name: summary(t) for name, t in turns.items()},
        "turns": turns,
    }
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _machine() -> dict[str, Any]:
    """CPU model, cores this process may use, and the instruction sets that matter here."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), []))
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "isa": isa}


if __name__ == "__main__":
    sys.exit(main())
