"""Command line and plan of the batch job: bad flags fail fast (exit 2, no traceback), the plan carries
every flag, and the command lines documented for Flink, Spark and Dataflow parse into the right
PipelineOptions (nothing is run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SparkRunnerOptions,
    StandardOptions,
    WorkerOptions,
)

from batch.__main__ import main
from batch.options import BatchUsageError, JobOptions, cores, parse
from batch.plan import plan_job

REPO = Path(__file__).resolve().parents[1]


def beam(options: JobOptions) -> PipelineOptions:
    """The Beam options the command line gives the runner."""
    return PipelineOptions(list(options.runner.flags))


def fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI in-process, expect exit code 2 and return stderr (which must hold no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    return err


def test_bad_flags_fail_fast_with_a_clear_message(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    model = str(tiny_run)
    assert "invalid choice: 'pairs'" in fails(capsys, "--model", model, "--output", out, "--mode", "pairs")
    topk = ("--model", model, "--output", out, "--mode", "topk")
    assert "--k must be at least 1, got 0" in fails(capsys, *topk, "--k", "0")
    assert "--k must be at least 1, got -3" in fails(capsys, *topk, "--k", "-3")
    assert "--k applies to --mode topk and --mode similar" in fails(
        capsys, "--model", model, "--output", out, "--k", "5"
    )
    similar = ("--model", model, "--output", out, "--mode", "similar")
    assert "--exclude-rated does not apply to --mode similar" in fails(capsys, *similar, "--exclude-rated")
    assert "--max-users does not apply to --mode similar" in fails(capsys, *similar, "--max-users", "3")
    assert "no such file or folder" in fails(capsys, "--model", str(tmp_path / "nope"), "--output", out)
    assert "missing model_scripted.pt" in fails(capsys, "--model", str(tmp_path), "--output", out)
    assert "the following arguments are required: --output" in fails(capsys, "--model", model)
    assert "unknown flag(s): --bogus" in fails(capsys, "--model", model, "--output", out, "--bogus", "1")
    assert "unknown flag(s): --exclude_rated" in fails(capsys, "--model", model, "--output", out, "--exclude_rated")
    assert "--num-shards must be at least 1" in fails(capsys, "--model", model, "--output", out, "--num-shards", "0")
    assert "--users" in fails(capsys, "--model", model, "--output", out, "--users", str(tmp_path / "none.txt"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot write next to --output" in fails(capsys, "--model", model, "--output", str(blocker / "sub" / "out"))
    assert not (tmp_path / "out").exists()


def test_malformed_id_list_fails_fast(tiny_run: Path, tmp_path: Path, capsys) -> None:
    users = tmp_path / "users.txt"
    users.write_text("user_id\n12\nnot-a-number\n")
    err = fails(capsys, "--model", str(tiny_run), "--output", str(tmp_path / "o"), "--users", str(users))
    assert "line 3: 'not-a-number' is not a valid user_id" in err


def test_cli_exit_code_and_stderr_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batch", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--model" in proc.stderr


def test_direct_runner_defaults_are_offline_and_use_every_core() -> None:
    args = parse(["--model", "m", "--output", "o"])
    options = beam(args)
    direct = options.view_as(DirectOptions)
    assert options.view_as(StandardOptions).runner is None  # the job builds the FnApiRunner itself
    assert direct.direct_running_mode == "multi_processing"
    assert direct.direct_num_workers == cores() == args.runner.workers
    assert args.runner.threads == 1

    args = parse(["--model", "m", "--output", "o", "--direct_running_mode=in_memory"])
    assert beam(args).view_as(DirectOptions).direct_running_mode == "in_memory"
    assert args.runner.threads == cores()  # one in-process worker: it threads over the cores


FLINK = [
    "--runner=FlinkRunner",
    "--flink_master=flink-jobmanager:8081",
    "--environment_type=DOCKER",
    "--environment_config=ghcr.io/acme/bookrec-beam:1.0",
    "--parallelism=16",
]
SPARK = [
    "--runner=SparkRunner",
    "--spark_master_url=spark://spark-master:7077",
    "--environment_type=LOOPBACK",
]
DATAFLOW_GPU = [
    "--runner=DataflowRunner",
    "--project=acme-recs",
    "--region=us-central1",
    "--temp_location=gs://acme-recs/tmp",
    "--sdk_container_image=us-docker.pkg.dev/acme-recs/beam/bookrec-gpu:1.0",
    "--machine_type=n1-standard-8",
    "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
    "--experiments=use_runner_v2",
    "--number_of_worker_harness_threads=1",
    "--max_num_workers=4",
    "--device=cuda",
]


def _job(*flags: str) -> list[str]:
    return ["--model", "gs://acme-recs/models/bookrec.mar", "--output", "gs://acme-recs/scores/2026-11-26", *flags]


def test_flink_command_line() -> None:
    args = parse(_job("--mode", "topk", "--k", "20", *FLINK))
    options = beam(args)
    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    assert options.view_as(FlinkRunnerOptions).flink_master == "flink-jobmanager:8081"
    assert options.view_as(FlinkRunnerOptions).parallelism == 16
    assert options.view_as(PortableOptions).environment_type == "DOCKER"
    assert options.view_as(PortableOptions).environment_config == "ghcr.io/acme/bookrec-beam:1.0"
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"  # untouched: not a local runner
    assert args.mode == "topk" and args.k == 20 and args.runner.threads == 1
    assert args.runner.name == "FlinkRunner" and not args.runner.local and args.runner.workers == 1


def test_spark_command_line() -> None:
    args = parse(_job(*SPARK))
    options = beam(args)
    assert options.view_as(StandardOptions).runner == "SparkRunner"
    assert options.view_as(SparkRunnerOptions).spark_master_url == "spark://spark-master:7077"
    assert options.view_as(PortableOptions).environment_type == "LOOPBACK"


def test_dataflow_gpu_command_line() -> None:
    args = parse(_job(*DATAFLOW_GPU))
    options = beam(args)
    gcp = options.view_as(GoogleCloudOptions)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert (gcp.project, gcp.region, gcp.temp_location) == ("acme-recs", "us-central1", "gs://acme-recs/tmp")
    assert gcp.dataflow_service_options == ["worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]
    worker = options.view_as(WorkerOptions)
    assert worker.machine_type == "n1-standard-8" and worker.max_num_workers == 4
    assert worker.sdk_container_image == "us-docker.pkg.dev/acme-recs/beam/bookrec-gpu:1.0"
    debug = options.view_as(DebugOptions)
    assert debug.experiments == ["use_runner_v2"] and debug.number_of_worker_harness_threads == 1
    # --device cuda is checked against the local machine only for local runners.
    assert args.device == "cuda" and args.runner.threads == 1


def test_cuda_on_a_local_runner_without_gpu_fails_fast() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BatchUsageError, match="no CUDA device"):
        parse(["--model", "m", "--output", "o", "--device", "cuda"])


def test_unreadable_features_file_fails_fast(tiny_run: Path, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "feats.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "vector": [[0.0], [1.0]]}), path)
    err = fails(capsys, "--model", str(tiny_run), "--output", str(tmp_path / "o"), "--user-features", str(path))
    assert "--user-features" in err and "'features'" in err


def test_worker_paths_are_absolute_and_remote_uris_unchanged(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Workers start in folders of their own: the spec they get holds absolute local paths."""
    from batch import io

    (tmp_path / "run").symlink_to(tiny_run)
    monkeypatch.chdir(tmp_path)
    plan = plan_job(["--model", "run", "--output", "scores/", "--direct_running_mode=in_memory"])
    spec = plan.spec
    assert spec.model == plan.summary()["model"] == str(tmp_path / "run")
    assert spec.output == str(tmp_path / "scores")
    assert spec.temp_dir.startswith(str(tmp_path / ".scores.tmp-"))
    assert io.absolute("file://run") == str(tmp_path / "run")
    for uri in ("gs://bucket/models/bookrec.mar", "s3://bucket/scores"):
        assert io.absolute(uri) == uri


def test_the_plan_is_built_once_from_the_command_line_and_carries_every_flag(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    """One call turns the argv into a frozen plan holding every flag, resolved (ids read, paths made
    absolute, shards and blocks sized), and writes nothing; a bad flag is still its one-line error."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.options import RunnerOptions, build_parser
    from model.catalog import Catalog

    catalog = Catalog.load(tiny_run)
    u0, u1, u2 = catalog.users["user_id"].tolist()[:3]
    b0, b1 = catalog.books["isbn"].tolist()[:2]
    (tmp_path / "users.txt").write_text(f"user_id\n{u0}\n{u1}\n{u0}\n123456789\n{u2}\n")
    (tmp_path / "books.txt").write_text(f"{b0}\n{b1}\n{b0}\n")
    for kind, column, ids, feats in (
        ("user", "user_id", [u0, u1, u2], catalog.user_feats[:3]),
        ("book", "isbn", [b0, b1], catalog.book_feats[:2]),
    ):
        pq.write_table(pa.table({column: ids, "features": feats.tolist()}), tmp_path / f"{kind}s.parquet")
    files = sorted(tmp_path.iterdir())
    argv = [
        *("--model", str(tiny_run), "--output", str(tmp_path / "scores") + "/", "--mode", "topk", "--k", "7"),
        *("--exclude-rated", "--users", str(tmp_path / "users.txt"), "--books", str(tmp_path / "books.txt")),
        *("--max-users", "3", "--user-features", str(tmp_path / "users.parquet")),
        *("--book-features", str(tmp_path / "books.parquet"), "--variant", "int8", "--num-shards", "2"),
        *("--block-users", "1", "--compression", "gzip", "--device", "cpu", "--precision", "bf16"),
        *("--kernel", "torch", "--threads", "3", "--workers", "2", "--no-progress", "--verbose"),
        "--default_sdk_harness_log_level=ERROR",
    ]
    plan = plan_job(argv)

    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags - {f.name for f in dataclasses.fields(plan.options)} == {"workers", "threads"}  # in .runner
    expected = {
        **{"model": str(tiny_run), "output": str(tmp_path / "scores") + "/", "mode": "topk", "k": 7},
        **{"exclude_rated": True, "users": str(tmp_path / "users.txt"), "books": str(tmp_path / "books.txt")},
        **{"max_users": 3, "user_features": str(tmp_path / "users.parquet"), "variant": "int8"},
        **{"book_features": str(tmp_path / "books.parquet"), "num_shards": 2, "block_users": 1},
        **{"compression": "gzip", "device": "cpu", "precision": "bf16", "kernel": "torch"},
        **{"progress": False, "verbose": True},
    }
    assert {k: getattr(plan.options, k) for k in expected} == expected
    direct = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert plan.runner == RunnerOptions("DirectRunner", True, 2, 3, ("--default_sdk_harness_log_level=ERROR", *direct))
    assert plan.beam_flags == plan.runner.flags

    spec = plan.spec
    assert (spec.model, spec.output, spec.mode, spec.k, spec.exclude_rated) == (
        str(tiny_run),
        str(tmp_path / "scores"),
        "topk",
        7,
        True,
    )
    assert spec.temp_dir == str(tmp_path / f".scores.tmp-{spec.run_id}")
    assert (spec.books, spec.user_features, spec.book_features) == (
        (b0, b1),
        str(tmp_path / "users.parquet"),
        str(tmp_path / "books.parquet"),
    )
    assert (spec.variant, spec.num_shards, spec.block_users, spec.compression) == ("int8", 2, 1, "gzip")
    assert (spec.device, spec.precision, spec.kernel, spec.threads) == ("cpu", "bf16", "torch", 3)
    # Ids de-duplicated, cut to --max-users, unknown ones kept for the workers' dead letters.
    assert [(b.shard, b.index, b.user_ids.tolist()) for b in plan.blocks] == [
        (0, 0, [u0]),
        (0, 1, [u1]),
        (1, 0, [123456789]),
    ]
    assert (plan.n_users, plan.n_books, plan.log_file) == (3, 2, None)
    summary = plan.summary()
    assert (summary["users_requested"], summary["books_requested"], summary["shards"]) == (3, 2, 2)
    assert (summary["model_file"], summary["k"], summary["runner"]) == ("model_int8.pt", 7, "DirectRunner")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.options.k = 3  # type: ignore[misc]
    assert sorted(tmp_path.iterdir()) == files  # planning wrote nothing: no output, no temp folder

    # Without --verbose, Beam's log goes into the run's temp folder; each plan is a run of its own.
    argv = [a for a in argv if a != "--verbose"]
    quiet = plan_job(argv)
    assert quiet.log_file == Path(quiet.spec.temp_dir) / "_batch.log" and quiet.spec.run_id != spec.run_id

    # A bad flag: one line on stderr, exit 2, before anything is planned.
    with pytest.raises(BatchUsageError, match="--block-users must be at least 1, got 0"):
        plan_job([*argv, "--block-users", "0"])
    assert main([*argv, "--threads", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["python -m batch: error: --threads must be at least 1, got 0"]
    (tmp_path / "users.txt").write_text("user_id\n12\nnot-a-number\n")
    assert main(argv) == 2
    message = f"--users {tmp_path / 'users.txt'} line 3: 'not-a-number' is not a valid user_id"
    assert capsys.readouterr().err.splitlines() == [f"python -m batch: error: {message}"]
