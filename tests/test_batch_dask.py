"""The batch job on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 (``batch/dask_cluster.py``), started in a folder of their own, and ``python -m batch
--runner=DaskRunner --dask_client_address=...`` run as a command from another folder with relative
``--model`` and ``--output`` paths, as a user runs it.

The output must equal the DirectRunner's, row for row; a worker SIGKILLed while both workers hold
tasks must still leave exactly that output (Dask recomputes what the dead worker held).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import io
from batch.pipeline import run
from batch.plan import plan_job
from model.catalog import Catalog

pytest.importorskip("distributed", reason="the dask extra (dask[distributed]) is not installed")

from batch.dask_cluster import LoopbackCluster

pytestmark = pytest.mark.beam

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 300


def _env() -> dict[str, str]:
    """The workers' and the command's environment: this checkout importable from any folder."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def caller_folder(root: Path, tiny_run: Path) -> Path:
    """The folder the command runs in: ``run`` is the model there, a path the workers (started in
    another folder) cannot see as given."""
    caller = root / "caller"
    caller.mkdir()
    (caller / "run").symlink_to(tiny_run)
    return caller


def start_batch(caller: Path, address: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "batch", "--model", "run", "--output", "out", "--no-progress"),
            *("--runner=DaskRunner", f"--dask_client_address={address}", *flags),
        ],
        cwd=caller,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out)


def direct(tiny_run: Path, out: Path, *flags: str) -> dict:
    """The same job on the DirectRunner (in-process), absolute paths."""
    return run(
        plan_job(
            ["--model", str(tiny_run), "--output", str(out), "--no-progress", "--direct_running_mode=in_memory", *flags]
        )
    )


def rows(output: Path, keys: list[str]) -> pa.Table:
    return pq.read_table(output).sort_by([(k, "ascending") for k in keys])


def assert_same_rows(got: Path, expected: Path, keys: list[str]) -> None:
    a, b = rows(got, keys), rows(expected, keys)
    assert a.schema.equals(b.schema)
    assert a.num_rows == b.num_rows > 0
    for name in a.column_names:
        assert a[name].equals(b[name]), f"column {name} differs"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LoopbackCluster(2, tmp_path_factory.mktemp("dask-cluster"), env=_env()) as c:
        yield c


def test_dask_cluster_output_equals_direct_runner(cluster, tiny_run: Path, tmp_path: Path) -> None:
    """All pairs of the tiny run through the cluster: relative paths resolved by the command, the
    rows equal the DirectRunner's, and each worker process loads the model once (once more per job
    only when the model changed: a second job reuses it)."""
    caller = caller_folder(tmp_path, tiny_run)
    shards = ("--num-shards", "8")
    summary = finish(start_batch(caller, cluster.address, *shards))
    assert summary["runner"] == "DaskRunner"
    assert summary["model"] == str(caller / "run")  # absolute: what the workers were given
    assert not (cluster.cwd / "out").exists() and (caller / "out" / io.SUCCESS).is_file()
    direct(tiny_run, tmp_path / "direct", *shards)
    assert_same_rows(caller / "out", tmp_path / "direct", ["user_id", "isbn"])

    # Eight partitions on two workers: every worker that scored built the context and loaded the
    # model once (Beam's Dask translation runs setup once per partition).
    workers = summary["workers"]
    assert set(workers) <= {f"{os.uname().nodename}:{pid}" for pid in cluster.pids().values()}
    assert sum(w["shards"] for w in workers.values()) == 8
    assert all(w["contexts"] == 1 and w["model_loads"] == 1 for w in workers.values()), workers

    again = finish(start_batch(caller, cluster.address, *shards))["workers"]
    for name, counts in again.items():
        assert counts["contexts"] == 1
        assert counts["model_loads"] == (0 if name in workers else 1), again
    assert_same_rows(caller / "out", tmp_path / "direct", ["user_id", "isbn"])


def many_users(tiny_run: Path, path: Path, n: int) -> Path:
    """A user features file of ``n`` users (the catalog's feature rows, repeated): a job long
    enough to kill a worker in the middle of it."""
    feats = Catalog.load(tiny_run).user_feats.numpy()
    rows = np.arange(n) % len(feats)
    column = pa.array(list(feats[rows]), pa.list_(pa.float32()))
    pq.write_table(pa.table({"user_id": pa.array(np.arange(1, n + 1), pa.int64()), "features": column}), path)
    return path


def _processing(client) -> dict[str, int]:
    """Tasks each worker (by name) holds right now."""
    info = client.scheduler_info()["workers"]
    return {info[addr]["name"]: len(keys) for addr, keys in client.processing().items() if addr in info}


def test_worker_killed_mid_job_still_leaves_the_exact_output(tiny_run: Path, tmp_path: Path) -> None:
    """Top-k for 8,000 users in 24 shards; once the first shard is done and both workers hold
    tasks, one worker is SIGKILLed. The job finishes with every user's rows, equal to the
    DirectRunner's."""
    from distributed import Client

    caller = caller_folder(tmp_path, tiny_run)
    users = many_users(tiny_run, caller / "users.parquet", 8000)
    job = (
        "--mode",
        "topk",
        "--k",
        "5",
        "--user-features",
        "users.parquet",
        "--num-shards",
        "24",
        "--block-users",
        "16",
    )
    with LoopbackCluster(2, tmp_path / "cluster", env=_env()) as cluster, Client(cluster.address) as client:
        proc = start_batch(caller, cluster.address, *job)
        killed, held = None, {}
        deadline = time.monotonic() + JOB_TIMEOUT
        try:
            while killed is None and proc.poll() is None and time.monotonic() < deadline:
                done = list(caller.glob(f".out.tmp-*/{io.PROGRESS}/*"))
                held = _processing(client) if done else {}
                if len(held) == 2 and all(held.values()):
                    assert not (caller / "out" / io.SUCCESS).exists()
                    cluster.kill("worker-1")
                    killed = "worker-1"
                time.sleep(0.02)
        finally:
            summary = finish(proc)
        assert killed, f"the job ended before both workers held tasks after a finished shard ({held})"
        assert cluster.workers["worker-1"].returncode == -9

    assert summary["users_scored"] == 8000 and summary["rows"] == 5 * 8000
    flags = [f if f != "users.parquet" else str(users) for f in job]
    direct(tiny_run, tmp_path / "direct", *flags)
    assert_same_rows(caller / "out", tmp_path / "direct", ["user_id", "rank"])
    # No attempt files of the lost tasks, no temp folder left behind.
    assert sorted(p.name for p in caller.iterdir()) == ["out", "run", "users.parquet"]
    assert all(io.OWNED.match(p.name) for p in (caller / "out").iterdir())
