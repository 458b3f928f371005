"""Build and run the batch scoring job (driver side).

The driver only reads ids (users, books) and the feature spec; features and the model are loaded
on the workers. It plans the user blocks and shards, proves the output is writable, runs the
pipeline, shows a progress bar (one tick per committed shard), and finally checks that the runner
really produced the output (``_SUCCESS``) before reporting success.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions
from tqdm.auto import tqdm

from batch import io, schemas
from batch.console import quiet_stderr
from batch.context import JobSpec, catalog_ids, read_features
from batch.model_source import ModelError, resolve
from batch.options import (
    BatchArgs,
    BatchUsageError,
    is_local_runner,
    local_workers,
    pipeline_options,
    read_id_list,
    runner_name,
    scoring_threads,
)
from batch.transforms import ScoreCatalog, plan_blocks
from model import layout

log = logging.getLogger("bookrec.batch")

PAIRS_PER_BLOCK = 1 << 20  # ~1M pairs: a block's scores + record batch stay around 20-30 MB
# Top-k blocks hold k rows per user and score the book set in bounded slices (model/recommend.py),
# so their size need not shrink with the catalog: 512 users amortise each pass over the book vectors
# (4 users per block at 262k books read 134 MB of vectors per 4 users: 3.6x slower per user).
TOPK_BLOCK_USERS = 512


class JobFailed(RuntimeError):
    """The runner finished without producing the committed output."""


def plan(args: BatchArgs, options: PipelineOptions) -> tuple[JobSpec, list, dict[str, Any]]:
    """(worker spec, user blocks, summary skeleton) for ``args``; ``BatchUsageError`` on bad input."""
    try:
        folder = resolve(args.model, args.variant)
    except ModelError as err:
        raise BatchUsageError(str(err)) from None
    _check_dims(folder, args)

    if args.user_features:
        user_ids = [int(u) for u in _feature_ids(args.user_features, "user_id", pa.int64())]
    else:
        user_ids = catalog_ids(folder, "user")
    if args.users:
        user_ids = read_id_list(args.users, "user_id", int)
    user_ids = list(dict.fromkeys(user_ids))
    if args.max_users:
        user_ids = user_ids[: args.max_users]
    books = tuple(dict.fromkeys(read_id_list(args.books, "isbn", str))) if args.books else None
    if books is not None:
        n_books = len(books)
    elif args.book_features:
        n_books = len(_feature_ids(args.book_features, "isbn", pa.string()))
    else:
        n_books = len(catalog_ids(folder, "book"))

    workers = local_workers(args)
    local = is_local_runner(args)
    num_shards = args.num_shards or max(1, min(max(len(user_ids), 1), 4 * workers if local else 32))
    if args.block_users:
        block_users = args.block_users
    elif args.mode == "topk":
        block_users = TOPK_BLOCK_USERS
    else:
        block_users = max(1, PAIRS_PER_BLOCK // max(n_books, 1))
    run_id = io.new_run_id()
    output = io.absolute(args.output.rstrip("/"))
    # Workers start in folders of their own (a Dask worker, a Flink task manager): every path
    # they open is made absolute here, against the folder the command was run in.
    spec = JobSpec(
        model=io.absolute(args.model),
        output=output,
        temp_dir=io.temp_dir_for(output, run_id),
        run_id=run_id,
        mode=args.mode,
        k=args.k,
        exclude_rated=args.exclude_rated,
        variant=args.variant,
        books=books,
        user_features=None if args.user_features is None else io.absolute(args.user_features),
        book_features=None if args.book_features is None else io.absolute(args.book_features),
        num_shards=num_shards,
        block_users=block_users,
        compression=args.compression,
        device=args.device,
        precision=args.precision,
        kernel=args.kernel,
        threads=scoring_threads(args, options),
    )
    summary = {
        "mode": args.mode,
        "k": args.k if args.mode == "topk" else None,
        "exclude_rated": args.exclude_rated,
        "model": spec.model,
        "model_file": layout.MODEL_FILES[args.variant],
        "users_requested": len(user_ids),
        "books_requested": n_books,
        "shards": num_shards,
        "files": [io.shard_name(i, num_shards) for i in range(num_shards)],
        "compression": args.compression,
        "runner": runner_name(args),
        "run_id": run_id,
        "schema": str(schemas.output_schema(args.mode)),
    }
    return spec, plan_blocks(user_ids, num_shards, block_users), summary


def _feature_ids(path: str, column: str, id_type: pa.DataType) -> list:
    """Ids of an external features file, or ``BatchUsageError`` when it is not one."""
    try:
        return read_features(path, column, id_type)[0].tolist()
    except Exception as err:
        flag = "--user-features" if column == "user_id" else "--book-features"
        what = f"a Parquet file with {column!r} and 'features' columns"
        raise BatchUsageError(f"{flag} {path}: not {what} ({err})") from None


def _check_dims(folder: Path, args: BatchArgs) -> None:
    """The catalog's feature widths must be what the model takes (a whole-catalog mismatch is a
    wrong --model, not a bad row)."""
    from batch.model_source import model_dims
    from model.artifacts import ModelFolder
    from model.features import FeatureSpec

    user_dim, book_dim = model_dims(ModelFolder(folder).load_rating_model(args.variant))
    spec = FeatureSpec.load(folder / layout.catalog_path(layout.SPEC_FILE))
    if not args.user_features and spec.user_dim != user_dim:
        raise BatchUsageError(f"--model {args.model}: catalog user features ({spec.user_dim}) != model ({user_dim})")
    if not args.book_features and spec.book_dim != book_dim:
        raise BatchUsageError(f"--model {args.model}: catalog book features ({spec.book_dim}) != model ({book_dim})")


def _make_runner(args: BatchArgs, options: PipelineOptions, stack: ExitStack) -> Any:
    """The runner object, or None to let Beam pick it from ``--runner``.

    DirectRunner: Beam's default first tries the Prism runner, which downloads a binary; here the
    FnApiRunner (what the DirectRunner falls back to for batch jobs) is used directly, with the
    running mode from the options. DaskRunner without ``--dask_client_address``: a loopback
    ``LocalCluster`` with one single-threaded worker process per core, closed afterwards.
    """
    name = runner_name(args)
    if name in ("DirectRunner", "SwitchingDirectRunner"):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=info)
    if name == "DaskRunner":
        from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner

        dask = options.view_as(DaskOptions)
        if not dask.address:
            from dask.distributed import LocalCluster

            logging.getLogger("distributed").setLevel(logging.WARNING)

            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=local_workers(args),
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                )
            )
            dask.address = cluster.scheduler_address
        return DaskRunner()
    return None


def _progress(
    temp_dir: str, total: int, stop: threading.Event, finished: threading.Event, enabled: bool, console: IO[str]
) -> None:
    """One tick per finished shard (the workers drop a marker file per shard into the temp folder;
    the commit removes them, so a finished run fills the bar at the end)."""
    with tqdm(total=total, desc="shards", unit="shard", disable=not enabled, file=console) as bar:
        while not stop.wait(1.0):
            bar.update(max(0, io.progress_count(temp_dir) - bar.n))
        if finished.is_set():
            bar.update(total - bar.n)


def log_path(args: BatchArgs, temp_dir: str, run_id: str) -> Path | None:
    """Where Beam's chatter goes: ``_batch.log`` in the run's temp folder, which becomes the output
    (a local temp file for a remote output); None with ``--verbose``."""
    if args.verbose:
        return None
    if io.is_local(temp_dir):
        return Path(temp_dir) / io.RUN_LOG
    return Path(tempfile.gettempdir()) / f"bookrec-batch-{run_id}.log"


def run(args: BatchArgs) -> dict[str, Any]:
    """Run the job; returns the ``_SUCCESS`` summary (plus Beam metrics when the runner has them).

    Raises ``BatchUsageError`` for bad input found up front, ``JobFailed`` when the runner ends
    without the committed output."""
    options = pipeline_options(args)
    spec, blocks, summary = plan(args, options)
    if runner_name(args) == "DaskRunner":
        from apache_beam.runners.dask.dask_runner import DaskOptions

        dask = options.view_as(DaskOptions)
        # Dask bags default to 128 elements per partition: one partition, one worker, here.
        if not dask.npartitions and not dask.partition_size:
            dask.npartitions = spec.num_shards
    try:
        io.check_output(spec.output)
        io.prepare_temp_dir(spec.temp_dir)
    except io.OutputError as err:
        raise BatchUsageError(str(err)) from None
    summary["started_unix"] = time.time()
    log.info(
        "scoring %d users x %d books (%s) in %d shards of %d-user blocks on %s",
        summary["users_requested"],
        summary["books_requested"],
        spec.mode,
        spec.num_shards,
        spec.block_users,
        summary["runner"],
    )
    stop, finished = threading.Event(), threading.Event()
    log_file = log_path(args, spec.temp_dir, spec.run_id)
    ok = False
    try:
        with quiet_stderr(log_file) as console, ExitStack() as stack:
            ticker = threading.Thread(
                target=_progress,
                args=(spec.temp_dir, spec.num_shards, stop, finished, args.progress, console),
                daemon=True,
            )
            runner = _make_runner(args, options, stack)
            ticker.start()
            try:
                pipeline = beam.Pipeline(runner=runner, options=options)
                _ = pipeline | "ScoreCatalog" >> ScoreCatalog(spec, blocks, summary)
                try:
                    result = pipeline.run()
                    state = result.wait_until_finish()
                except Exception as err:
                    reason = io.failure_reason(err, (io.WriteError, ModelError))
                    if reason is None:
                        raise
                    raise JobFailed(f"{reason}; {_untouched(spec.output)}") from err
                if (io.read_summary(spec.output) or {}).get("run_id") == spec.run_id:
                    finished.set()
                metrics = _metrics(result)
                client = getattr(result, "client", None)  # DaskRunner: close before its cluster goes
                if client is not None:
                    client.close()
            finally:
                stop.set()
                ticker.join(timeout=5)
        done = io.read_summary(spec.output)
        if done is None or done.get("run_id") != spec.run_id:
            raise JobFailed(
                f"the {summary['runner']} finished ({state}) but {spec.output} has no committed output of this run"
            )
        ok = True
        done["seconds"] = round(time.time() - summary["started_unix"], 2)
        if metrics:
            done["metrics"] = metrics
        return done
    except Exception as err:
        if log_file is not None and log_file.is_file():
            # The runner's own messages are in the log: say where, and keep it.
            note = f"the runner's log: {log_file}"
            if isinstance(err, JobFailed):
                raise JobFailed(f"{err}; {note}") from None
            log.error("job failed; %s", note)
        raise
    finally:
        if not ok:
            _remove_all_but(spec.temp_dir, log_file)
        elif log_file is not None and not io.is_local(spec.temp_dir):
            log_file.unlink(missing_ok=True)


def _untouched(output: str) -> str:
    if io.read_summary(output) is not None:
        return f"the previous output {output} is unchanged"
    return f"nothing was written to {output}"


def _remove_all_but(temp_dir: str, keep: Path | None) -> None:
    """Delete the failed run's temp folder, except its log."""
    if keep is None or not keep.is_file() or not io.is_local(temp_dir) or keep.parent != Path(temp_dir):
        io.remove_tree(temp_dir)
        return
    for path in Path(temp_dir).iterdir():
        if path.is_dir():
            io.remove_tree(str(path))
        elif path != keep:
            path.unlink(missing_ok=True)


def _metrics(result: Any) -> dict[str, Any]:
    """Counters of this job, when the runner reports metrics (the DaskRunner does not)."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for c in counters:
        if c.key.metric.namespace == "bookrec.batch":
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + c.committed
    return out
