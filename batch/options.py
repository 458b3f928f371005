"""Command line of the batch job: its own flags, plus any Apache Beam pipeline option, into ``JobOptions``.

The flags are checked here, with a message naming the flag (``BatchUsageError``; the CLI turns it
into exit code 2 without a traceback): unknown flags (ours or Beam's), an unknown mode, ``--k`` < 1
or without ``--mode topk``, an input file that does not exist, ``--device cuda`` without a GPU on a
local runner. What needs the inputs read (a model path without a model, id lists that do not parse,
an output that holds foreign files) is checked by the plan (``batch/plan.py``), once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    _BeamArgumentParser,
)

from batch.io import COMPRESSIONS, is_local
from model.layout import MODEL_FILES

MODES = ("all", "topk", "similar")
DEVICES = ("auto", "cpu", "cuda")
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "DaskRunner")


class BatchUsageError(ValueError):
    """A bad flag or input found before any work started."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class RunnerOptions:
    """The Beam runner and how the job uses it, resolved from Beam's flags and ``--workers``/``--threads``."""

    name: str  # "DirectRunner" when no --runner is given
    local: bool  # runs on this machine (the DirectRunner, the FnApiRunner, the DaskRunner)
    workers: int  # worker processes of a local runner; 1 on a remote one (the cluster's business)
    threads: int  # scoring threads per worker
    flags: tuple[str, ...]  # Beam's pipeline options as given, plus this job's defaults


@dataclass(frozen=True)
class JobOptions:
    """The checked command line: the job's own flags, typed, and the runner's options."""

    model: str  # as given: a run folder or a .mar, local or remote
    output: str  # as given
    mode: str
    k: int
    exclude_rated: bool
    users: str | None  # --users file
    books: str | None  # --books file
    max_users: int | None
    user_features: str | None
    book_features: str | None
    variant: str
    num_shards: int | None  # None: chosen by the plan from the users and the runner
    block_users: int | None  # None: chosen by the plan from the mode and the book set
    compression: str
    device: str
    precision: str
    kernel: str
    progress: bool
    verbose: bool
    runner: RunnerOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batch",
        description="Score users x books of a trained bookrec model with Apache Beam into Parquet.",
        epilog="Any other --flag is an Apache Beam pipeline option, e.g. --runner=FlinkRunner "
        "--flink_master=HOST:8081, --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp "
        "(see docs/BATCH.md). Default runner: the DirectRunner, multi-process on every core, offline.",
        allow_abbrev=False,
    )
    p.add_argument("--model", required=True, help="training run folder or bookrec.mar (local or gs://...)")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem, e.g. gs://...)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="all",
        help="all: every pair (default); topk: best K per user; similar: the K books most like each book",
    )
    p.add_argument("--k", type=int, default=None, help="books per user (--mode topk) or per book (similar); default 10")
    p.add_argument("--exclude-rated", action="store_true", help="drop pairs the user rated in training")
    p.add_argument("--users", help="file of user ids to score (one per line, or Parquet with user_id)")
    p.add_argument("--books", help="file of ISBNs to score against (one per line, or Parquet with isbn)")
    p.add_argument("--max-users", type=int, help="score only the first N users of the user set")
    p.add_argument("--user-features", help="Parquet (user_id, features: list<float>) replacing catalog users")
    p.add_argument("--book-features", help="Parquet (isbn, features: list<float>) replacing catalog books")
    p.add_argument("--variant", choices=tuple(MODEL_FILES), default="scripted", help="model file (default: shipped)")
    p.add_argument("--num-shards", type=int, help="Parquet files to write (default: 4 per local worker, 32 remote)")
    p.add_argument(
        "--block-users", type=int, help="users scored per block (default: ~1M pairs per block; 512 users in topk mode)"
    )
    p.add_argument("--compression", choices=COMPRESSIONS, default="zstd", help="Parquet codec (default zstd)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="scoring device on the workers")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="tail matmul precision")
    p.add_argument(
        "--kernel",
        choices=("auto", "native", "torch"),
        default="auto",
        help="CPU head kernel: compiled AVX2 (native), torch ops, or native when available (default)",
    )
    p.add_argument("--threads", type=int, help="scoring threads per worker (default: cores / workers locally)")
    p.add_argument("--workers", type=int, help="local worker processes (DirectRunner/DaskRunner; default: cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Apache Beam's and the workers' own log lines (default: into _batch.log, kept with the output, "
        "or in the run's temp folder when the job fails)",
    )
    return p


def _unknown_beam_flags(args: list[str]) -> list[str]:
    """Flags no PipelineOptions class knows (Beam itself would only log and drop them)."""
    import apache_beam.runners.dask.dask_runner  # noqa: F401  registers DaskOptions

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(args)
    return [a for a in unknown if a.startswith("-")]


def parse(argv: list[str] | None = None) -> JobOptions:
    """Parse and check the command line; ``BatchUsageError`` on anything wrong. Reads nothing but
    whether the local files named exist (the model and the id lists are the plan's, batch/plan.py)."""
    parser = build_parser()
    try:
        ns, rest = parser.parse_known_args(argv)
    except SystemExit as err:  # argparse already printed usage and the message, or the help
        if not err.code:
            raise  # --help: done, exit 0
        raise BatchUsageError("") from err
    bad = _unknown_beam_flags(rest)
    if bad:
        raise BatchUsageError(f"unknown flag(s): {' '.join(bad)} (see --help; Beam options use underscores)")
    stray = [a for a in rest if not a.startswith("-") and a not in _flag_values(rest)]
    if stray:
        raise BatchUsageError(f"unexpected argument(s): {' '.join(stray)}")
    flags = vars(ns)
    if flags["k"] is not None and flags["mode"] == "all":
        raise BatchUsageError("--k applies to --mode topk and --mode similar only")
    if flags["mode"] == "similar":
        # The queries are books (--books, or the catalog's); no reader and no external features enter.
        for name in ("users", "max_users", "user_features", "book_features"):
            if flags[name] is not None:
                raise BatchUsageError(f"--{name.replace('_', '-')} does not apply to --mode similar")
        if flags["exclude_rated"]:
            raise BatchUsageError("--exclude-rated does not apply to --mode similar")
    flags["k"] = 10 if flags["k"] is None else flags["k"]
    for name in ("k", "max_users", "num_shards", "block_users", "threads", "workers"):
        value = flags[name]
        if value is not None and value < 1:
            raise BatchUsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("users", "books", "user_features", "book_features"):
        path = flags[name]
        if path is not None and is_local(path) and not Path(path).is_file():
            raise BatchUsageError(f"--{name.replace('_', '-')} {path}: no such file")
    runner = runner_options(rest, flags["device"], flags.pop("workers"), flags.pop("threads"))
    if flags["device"] == "cuda" and runner.local and not _cuda_available():
        raise BatchUsageError("--device cuda: no CUDA device on this machine (local runner)")
    return JobOptions(**flags, runner=runner)


def _flag_values(rest: list[str]) -> set[str]:
    """Tokens that are the value of a preceding ``--flag value`` pair."""
    return {rest[i + 1] for i in range(len(rest) - 1) if rest[i].startswith("--") and "=" not in rest[i]}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def runner_options(beam_args: list[str], device: str, workers: int | None, threads: int | None) -> RunnerOptions:
    """The runner named by Beam's flags, its worker processes and scoring threads, and its flags with
    this job's defaults: the DirectRunner runs multi-process on every core (explicitly, so Beam never
    tries to download the Prism runner)."""
    given = PipelineOptions(beam_args)
    name = given.view_as(StandardOptions).runner or "DirectRunner"
    local = name.split(".")[-1] in LOCAL_RUNNERS
    if not local:
        n_workers = 1
    elif name != "DaskRunner" and any(a.startswith("--direct_num_workers") for a in beam_args):
        n_workers = max(1, given.view_as(DirectOptions).direct_num_workers)
    else:
        n_workers = workers or cores()
    extra: list[str] = []
    joined = " ".join(beam_args)
    if name in ("DirectRunner", "SwitchingDirectRunner"):
        if "--direct_running_mode" not in joined:
            extra.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in joined and "in_memory" not in joined:
            extra.append(f"--direct_num_workers={n_workers}")
        if "--default_sdk_harness_log_level" not in joined:
            extra.append("--default_sdk_harness_log_level=WARNING")
    flags = (*beam_args, *extra)
    threads = _scoring_threads(name, local, n_workers, device, threads, flags)
    return RunnerOptions(name, local, n_workers, threads, flags)


def _scoring_threads(
    name: str, local: bool, workers: int, device: str, threads: int | None, flags: tuple[str, ...]
) -> int:
    """Threads per worker: the cores a local worker has to itself; 1 on clusters (one SDK process
    per core there) and on GPUs."""
    if threads:
        return threads
    if device != "cpu" or not local:
        return 1
    if name in ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner"):
        direct = PipelineOptions(list(flags)).view_as(DirectOptions)
        in_process = 1 if direct.direct_running_mode == "in_memory" else max(1, direct.direct_num_workers)
        return max(1, cores() // in_process)
    return max(1, cores() // workers)
