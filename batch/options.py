"""Command line of the batch job: its own flags, plus any Apache Beam pipeline option.

Every check that can fail before the pipeline starts happens here, with a message naming the flag
(``BatchUsageError``; the CLI turns it into exit code 2 without a traceback): unknown flags
(ours or Beam's), an unknown mode, ``--k`` < 1, a model path without a model, an output that
cannot be written or holds foreign files, id lists that do not parse.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    _BeamArgumentParser,
)

from batch.io import COMPRESSIONS, is_local
from model.layout import MODEL_FILES

MODES = ("all", "topk")
DEVICES = ("auto", "cpu", "cuda")
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner", "DaskRunner")


class BatchUsageError(ValueError):
    """A bad flag or input found before any work started."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class BatchArgs:
    """The job's own flags (Beam's live in ``beam_args``)."""

    model: str
    output: str
    mode: str = "all"
    k: int = 10
    exclude_rated: bool = False
    users: str | None = None
    books: str | None = None
    max_users: int | None = None
    user_features: str | None = None
    book_features: str | None = None
    variant: str = "scripted"
    num_shards: int | None = None
    block_users: int | None = None
    compression: str = "zstd"
    device: str = "cpu"
    precision: str = "fp32"
    kernel: str = "auto"
    threads: int | None = None
    workers: int | None = None
    progress: bool = True
    verbose: bool = False
    beam_args: list[str] = field(default_factory=list)


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
    p.add_argument("--mode", choices=MODES, default="all", help="all: every pair (default); topk: best K per user")
    p.add_argument("--k", type=int, default=None, help="books per user in --mode topk (default 10)")
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


def parse(argv: list[str] | None = None) -> BatchArgs:
    """Parse and check the command line; ``BatchUsageError`` on anything wrong."""
    parser = build_parser()
    try:
        ns, rest = parser.parse_known_args(argv)
    except SystemExit as err:  # argparse already printed usage and the message
        raise BatchUsageError("") from err
    bad = _unknown_beam_flags(rest)
    if bad:
        raise BatchUsageError(f"unknown flag(s): {' '.join(bad)} (see --help; Beam options use underscores)")
    stray = [a for a in rest if not a.startswith("-") and a not in _flag_values(rest)]
    if stray:
        raise BatchUsageError(f"unexpected argument(s): {' '.join(stray)}")
    args = BatchArgs(**{k: v for k, v in vars(ns).items()}, beam_args=rest)
    if args.k is not None and args.mode != "topk":
        raise BatchUsageError("--k applies to --mode topk only")
    args.k = 10 if args.k is None else args.k
    for name in ("k", "max_users", "num_shards", "block_users", "threads", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BatchUsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("users", "books", "user_features", "book_features"):
        path = getattr(args, name)
        if path is not None and is_local(path) and not Path(path).is_file():
            raise BatchUsageError(f"--{name.replace('_', '-')} {path}: no such file")
    if args.device == "cuda" and is_local_runner(args) and not _cuda_available():
        raise BatchUsageError("--device cuda: no CUDA device on this machine (local runner)")
    return args


def _flag_values(rest: list[str]) -> set[str]:
    """Tokens that are the value of a preceding ``--flag value`` pair."""
    return {rest[i + 1] for i in range(len(rest) - 1) if rest[i].startswith("--") and "=" not in rest[i]}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def runner_name(args: BatchArgs) -> str:
    return PipelineOptions(args.beam_args).view_as(StandardOptions).runner or "DirectRunner"


def is_local_runner(args: BatchArgs) -> bool:
    return runner_name(args).split(".")[-1] in LOCAL_RUNNERS


def local_workers(args: BatchArgs) -> int:
    """Worker processes of a local runner (1 for a remote one: workers are the cluster's business)."""
    if not is_local_runner(args):
        return 1
    direct = PipelineOptions(args.beam_args).view_as(DirectOptions)
    if runner_name(args) != "DaskRunner" and any(a.startswith("--direct_num_workers") for a in args.beam_args):
        return max(1, direct.direct_num_workers)
    return args.workers or cores()


def pipeline_options(args: BatchArgs) -> PipelineOptions:
    """Beam options with this job's defaults: the DirectRunner runs multi-process on every core
    (explicitly, so Beam never tries to download the Prism runner)."""
    extra: list[str] = []
    flags = " ".join(args.beam_args)
    if runner_name(args) in ("DirectRunner", "SwitchingDirectRunner"):
        if "--direct_running_mode" not in flags:
            extra.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in flags and "in_memory" not in flags:
            extra.append(f"--direct_num_workers={local_workers(args)}")
        if "--default_sdk_harness_log_level" not in flags:
            extra.append("--default_sdk_harness_log_level=WARNING")
    return PipelineOptions([*args.beam_args, *extra])


def scoring_threads(args: BatchArgs, options: PipelineOptions) -> int:
    """Threads per worker: the cores a local worker has to itself; 1 on clusters (one SDK process
    per core there) and on GPUs."""
    if args.threads:
        return args.threads
    if args.device != "cpu" or not is_local_runner(args):
        return 1
    if runner_name(args) in ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner"):
        direct = options.view_as(DirectOptions)
        workers = 1 if direct.direct_running_mode == "in_memory" else max(1, direct.direct_num_workers)
        return max(1, cores() // workers)
    return max(1, cores() // local_workers(args))


def read_id_list(path: str, column: str, kind: type) -> list:
    """Ids from a Parquet file (``column``) or a text file (one per line; blank lines and a header
    equal to ``column`` skipped). Raises ``BatchUsageError`` naming the first bad line."""
    from batch.io import _local

    local = _local(path) if is_local(path) else None
    data = local.read_bytes() if local is not None else _read_remote(path)
    if data[:4] == b"PAR1":
        table = pq.read_table(pa.BufferReader(data))
        if column not in table.column_names:
            raise BatchUsageError(f"{path}: Parquet file without a {column!r} column")
        values = table[column].to_pylist()
        if any(v is None for v in values):
            raise BatchUsageError(f"{path}: null {column}")
        return [kind(v) for v in values]
    out = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        token = line.strip().split(",")[0].strip()
        if not token or (n == 1 and token == column):
            continue
        try:
            out.append(kind(token))
        except ValueError:
            raise BatchUsageError(f"{path} line {n}: {token!r} is not a valid {column}") from None
    return out


def _read_remote(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as fh:
        return fh.read()
