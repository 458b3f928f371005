"""The training job's steps, in order: data -> distill -> features -> train -> compress -> retrieval -> ranking
-> evaluate.

``distill`` does work only when ``encoder.name`` is ``distilled``.

The one list of steps: ``python -m train STEP`` runs one, ``python -m train run`` (``run_all``)
runs them all, and dvc.yaml has a stage per step. Every step takes the run's ``RunContext``
(``train/run_context.py``): ``run_all`` passes one to all of them, so each step starts from what the
previous ones built in memory; a step run alone gets a fresh one, which reads the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from model import layout
from train.config import Config
from train.data.step import step_data
from train.evaluation.step import step_evaluate
from train.experiments import tracking
from train.features.distill.step import step_distill
from train.features.step import step_features
from train.ranking.step import step_ranking
from train.rating.compress import step_compress
from train.rating.step import step_train
from train.retrieval.step import step_retrieval
from train.run_context import RunContext
from train.run_folder import refresh_manifest, removed_if_failed, write_json
from train.run_record import OWNS, check_config, record_step

log = logging.getLogger("bookrec.pipeline")

Step = Callable[[RunContext, bool], dict]
STEPS: dict[str, Step] = {
    "data": step_data,
    "distill": step_distill,
    "features": step_features,
    "train": step_train,
    "compress": step_compress,
    "retrieval": step_retrieval,
    "ranking": step_ranking,
    "evaluate": step_evaluate,
}
# The steps that write model files: the manifest is refreshed after each of them.
MODEL_STEPS = ("features", "train", "compress", "retrieval", "ranking")
assert tuple(OWNS) == tuple(STEPS), "train/run_record.py's OWNS lists the steps in order"


# What a step run alone reads first, and the step that writes it: a folder without it is refused
# before anything is created there.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "distill": ((f"{layout.DATA_DIR}/{layout.DATA_RATINGS}", "data"),),
    "features": ((f"{layout.DATA_DIR}/{layout.DATA_RATINGS}", "data"),),
    "train": ((layout.catalog_path(layout.SPEC_FILE), "features"),),
    "compress": ((layout.MODEL_FILES["fp32"], "train"),),
    "retrieval": ((layout.catalog_path(layout.SPEC_FILE), "features"),),
    "ranking": ((layout.RETRIEVAL_FILE, "retrieval"),),
    "evaluate": (
        (layout.catalog_path(layout.SPEC_FILE), "features"),
        (layout.MODEL_FILES[layout.SHIPPED_VARIANT], "compress"),
        (layout.RETRIEVAL_FILE, "retrieval"),
    ),
}


class StepNotReady(Exception):
    """A step run alone on a folder that lacks what an earlier step writes."""


def run_step(name: str, cfg: Config, progress: bool = True) -> dict:
    """One step on the configured run folder, starting from what the folder holds. A folder lacking what
    the step reads is ``StepNotReady``, and a config that differs from the run's in what earlier steps
    made is ``ConfigDiffers``: both leave the folder untouched. The step's part of the run's record
    (``train/run_record.py``) is written once it succeeded, so a failed step leaves the record of what
    the folder still holds; a step that writes model files refreshes the manifest."""
    run_dir = Path(cfg.run_dir)
    check_ready(name, run_dir)
    check_config(name, cfg, run_dir)
    with removed_if_failed(run_dir):  # a failed first step leaves no empty run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        if name in MODEL_STEPS:  # a step that fails half-way must not leave the old manifest vouching for it
            (run_dir / layout.MANIFEST_FILE).unlink(missing_ok=True)
        result = STEPS[name](RunContext(cfg, run_dir), progress)
    record_step(name, cfg, run_dir)
    if name in MODEL_STEPS:
        refresh_manifest(run_dir)
    return result


def check_ready(name: str, run_dir: Path) -> None:
    """Raise ``StepNotReady`` when ``run_dir`` lacks what step ``name`` reads, naming the step to run first."""
    missing = _missing(name, run_dir)
    if missing:
        needed, first = missing
        raise StepNotReady(
            f"{run_dir} has no {needed} for `{name}`: run `python -m train {first}` and the steps after it "
            f"first, or `python -m train run`"
        )


def _missing(name: str, run_dir: Path) -> tuple[str, str] | None:
    """(the file ``name`` lacks, the earliest step that must run to make it), or None when ready."""
    for needed, writer in NEEDS.get(name, ()):
        if not (run_dir / needed).is_file():
            return needed, (_missing(writer, run_dir) or (needed, writer))[1]
    return None


def run_all(cfg: Config, progress: bool = True, run: RunContext | None = None) -> dict:
    """Every step in order, handing each other what they build through one ``RunContext`` (``run``
    where the caller holds one); returns each step's summary and its wall time. Each step's part of
    the record is written once it succeeded (as ``run_step`` does), the manifest once the last model
    step did."""
    tracking.require_tracking(cfg)  # before any work, as the tracker itself starts after the data step
    run = run or RunContext(cfg, Path(cfg.run_dir))
    run_dir = run.dir
    with removed_if_failed(run_dir):  # a run folder this run made goes if its data step fails
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / layout.MANIFEST_FILE).unlink(missing_ok=True)  # vouches for no file until the model is rewritten
        out = _timed("data", run, progress)
    tracker = tracking.start_training_run(cfg, run_dir)  # None unless train.wandb
    for name in list(STEPS)[1:]:
        out.update(_timed(name, run, progress))
    write_json(run_dir / layout.TIMINGS_FILE, {k: v for k, v in out.items() if k.endswith("_seconds")})
    tracking.finish_training_run(tracker, run_dir)
    return out


def _timed(name: str, run: RunContext, progress: bool) -> dict:
    """Step ``name`` of ``run_all``: its summary and wall time; its record, and the manifest once the
    last model step wrote the model's final files."""
    start = time.perf_counter()
    result = STEPS[name](run, progress)
    record_step(name, run.cfg, run.dir)
    if name == MODEL_STEPS[-1]:
        refresh_manifest(run.dir)
    seconds = round(time.perf_counter() - start, 1)
    log.info("step %s done in %.1f s", name, seconds)
    return {name: result, f"{name}_seconds": seconds}
