"""Experiment tracking with Weights & Biases, used only when ``train.wandb: true``.

One W&B run per training job (``python -m train run``): it starts before the first step with the
full config, the training loop logs every epoch into it (``train/...``, ``prune-finetune/...``), and
at the end the run gets the evaluation tables, the learning curve and the shipped model (scripted
MLP + its config, evaluation and compression report) as a ``model`` artifact. A step run alone
(``python -m train train``) or a sweep trial gets a run of its own.

``WANDB_MODE=offline`` works without an account or network: the run lands under ``$WANDB_DIR`` and
``wandb sync`` uploads it later. wandb is optional (``pip install wandb``); with it missing and
``train.wandb`` on, the job stops with a clear message before any work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from model import layout
from train.config import Config

log = logging.getLogger("bookrec.tracking")

MODEL_ARTIFACT = "bookrec-model"
# What the model artifact carries (those present): the shipped model and what describes it.
SHIPPED_MODEL = layout.MODEL_FILES[layout.SHIPPED_VARIANT]
ARTIFACT_FILES = (
    SHIPPED_MODEL,
    layout.CONFIG_FILE,
    layout.EVALUATION_REPORT,
    layout.EVALUATION_TABLE,
    layout.COMPRESSION_REPORT,
    layout.TRAIN_REPORT,
    layout.FINGERPRINT_FILE,
)


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError("train.wandb is on but wandb is not installed: pip install wandb") from err
    return wandb


def active_run() -> Any:
    """The W&B run in progress in this process, or None (also when wandb is not installed)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def start_run(
    cfg: Config | dict[str, Any],
    job_type: str,
    name: str | None = None,
    group: str | None = None,
    project: str = "bookrec",
    extra: dict[str, Any] | None = None,
) -> Any:
    """A new W&B run with ``cfg`` (the full config, or a section as a dict) as its config."""
    wandb = _wandb()
    config = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    run = wandb.init(
        project=project,
        job_type=job_type,
        name=name,
        group=group,
        config={**config, **(extra or {})},
        reinit="finish_previous",
    )
    log.info("W&B run %s (%s) in %s", run.id, job_type, getattr(run.settings, "mode", "online"))
    return run


def require_tracking(cfg: Config) -> None:
    """Stop before any work when ``train.wandb`` is on and wandb cannot be imported."""
    if cfg.train.wandb:
        _wandb()


def start_training_run(cfg: Config, run_dir: Path) -> Any:
    """The run of a whole training job, or None when ``train.wandb`` is off."""
    if not cfg.train.wandb:
        return None
    return start_run(cfg, "train", name=Path(run_dir).name, project=cfg.train.wandb_project)


def log_epoch(run: Any, row: dict[str, Any]) -> None:
    """One epoch row of ``fit``: metrics under ``<stage>/``, each stage on its own epoch axis."""
    stage = row["stage"]
    run.define_metric(f"{stage}/epoch")
    run.define_metric(f"{stage}/*", step_metric=f"{stage}/epoch")
    run.log({f"{stage}/{key}": value for key, value in row.items() if key != "stage"})


def finish_training_run(run: Any, run_dir: Path) -> None:
    """Evaluation tables, learning curve and the shipped model as an artifact; then close the run."""
    if run is None:
        return
    wandb = _wandb()
    run_dir = Path(run_dir)
    evaluation = run_dir / layout.EVALUATION_REPORT
    if evaluation.is_file():
        results = json.loads(evaluation.read_text())["results"]
        for split, table in evaluation_tables(results).items():
            run.log({f"evaluation/{split}": wandb.Table(columns=table["columns"], data=table["rows"])})
        shipped = results.get("MLP TorchScript (shipped)", {})
        for split, values in shipped.items():
            for metric, value in values.items():
                run.summary[f"shipped/{split}/{metric}"] = value
    for image in (layout.LEARNING_CURVE, "evaluation.png"):
        if (run_dir / image).is_file():
            run.log({image.removesuffix(".png"): wandb.Image(str(run_dir / image))})
    log_model_artifact(run, run_dir)
    run.finish()


def evaluation_tables(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, list]]:
    """``evaluation.json`` results as one table per split: a row per model, a column per metric."""
    tables: dict[str, dict[str, list]] = {}
    for model, splits in results.items():
        for split, values in splits.items():
            table = tables.setdefault(split, {"columns": ["model"], "rows": []})
            for metric in values:
                if metric not in table["columns"]:
                    table["columns"].append(metric)
            table["rows"].append((model, values))
    for table in tables.values():
        table["rows"] = [[model] + [values.get(c) for c in table["columns"][1:]] for model, values in table["rows"]]
    return tables


def log_model_artifact(run: Any, run_dir: Path) -> None:
    """The shipped model and what describes it, as the ``bookrec-model`` artifact of ``run``."""
    wandb = _wandb()
    files = [run_dir / name for name in ARTIFACT_FILES if (run_dir / name).is_file()]
    if not any(f.name == SHIPPED_MODEL for f in files):
        log.warning("no %s in %s: no model artifact logged", SHIPPED_MODEL, run_dir)
        return
    meta: dict[str, Any] = {}
    if (run_dir / layout.TRAIN_REPORT).is_file():
        meta["train"] = json.loads((run_dir / layout.TRAIN_REPORT).read_text())
    artifact = wandb.Artifact(MODEL_ARTIFACT, type="model", metadata=meta)
    for path in files:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)
