"""Build and run the batch scoring job (driver side), from its plan (``batch/plan.py``).

The driver only reads ids (users, books) and the feature spec; features and the model are loaded
on the workers. It proves the output is writable, runs the pipeline, shows a progress bar (one tick
per committed shard), and finally checks that the runner really produced the output (``_SUCCESS``)
before reporting success.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from tqdm.auto import tqdm

from batch import io
from batch.console import quiet_stderr
from batch.model_source import ModelError
from batch.options import BatchUsageError
from batch.plan import JobPlan
from batch.signals import Interrupted
from batch.transforms import ScoreCatalog

log = logging.getLogger("bookrec.batch")


class JobFailed(RuntimeError):
    """The runner finished without producing the committed output."""


def _make_runner(plan: JobPlan, options: PipelineOptions, stack: ExitStack) -> Any:
    """The runner object, or None to let Beam pick it from ``--runner``.

    DirectRunner: Beam's default first tries the Prism runner, which downloads a binary; here the
    FnApiRunner (what the DirectRunner falls back to for batch jobs) is used directly, with the
    running mode from the options. DaskRunner without ``--dask_client_address``: a loopback
    ``LocalCluster`` with one single-threaded worker process per core, closed afterwards.
    """
    name = plan.runner.name
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
                    n_workers=plan.runner.workers,
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


def run(plan: JobPlan) -> dict[str, Any]:
    """Run the job of ``plan``; returns the ``_SUCCESS`` summary (plus Beam metrics when the runner
    has them).

    Raises ``BatchUsageError`` when the output cannot be written, ``JobFailed`` when the runner
    ends without the committed output (its temp folder keeps the runner's log), ``Interrupted``
    when stopped by a signal (the temp folder goes whole). First removes the temp folders that
    dead runs left beside the output."""
    spec, log_file = plan.spec, plan.log_file
    stale = io.remove_stale_temp_dirs(spec.output)
    if stale:
        log.info("removed %d temp folder(s) of earlier runs that did not finish: %s", len(stale), ", ".join(stale))
    try:
        lock = io.prepare_temp_dir(spec.temp_dir)
    except io.OutputError as err:
        raise BatchUsageError(str(err)) from None
    summary = plan.summary()
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
    ok = False
    try:
        with quiet_stderr(log_file) as console, ExitStack() as stack:
            ticker = threading.Thread(
                target=_progress,
                args=(spec.temp_dir, spec.num_shards, stop, finished, plan.options.progress, console),
                daemon=True,
            )
            options = plan.pipeline_options()
            runner = _make_runner(plan, options, stack)
            ticker.start()
            try:
                pipeline = beam.Pipeline(runner=runner, options=options)
                _ = pipeline | "ScoreCatalog" >> ScoreCatalog(spec, list(plan.blocks), summary)
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
    except Interrupted as err:
        # Stopped on purpose: nothing of the run is worth keeping, its log included.
        log_file = None
        done = io.read_summary(spec.output) or {}
        err.detail = f"{spec.output} was committed" if done.get("run_id") == spec.run_id else _untouched(spec.output)
        raise
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
        io.release_temp_dir(spec.temp_dir, lock)


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
