"""Hyper-parameter sweep of the rating MLP with Optuna, on validation RMSE.

    python -m train sweep --config configs/bookcrossing.yaml --trials 20

The data and feature steps run once (or are reused from the run folder when its saved config has
the same data, split, encoder and shrinkage settings); every trial only builds and trains an MLP on
the same feature tables, with the config's seed, so trials differ by their hyper-parameters alone.
Searched: learning rate, weight decay (log scale), dropout, hidden sizes (width of the first layer,
number of layers, each one half the width of the one before). Trial 0 is the config as given, so
the table says whether the sweep beats it.

Writes into ``--out`` (default ``RUN_DIR/sweep``): ``trials.csv``, ``trials.md``, ``sweep.png``,
``best_config.yaml`` (the full config with the best trial's values) and ``sweep.json``. With
``train.wandb: true`` every trial is a W&B run (group ``sweep-<time>``), plus one summary run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from model import layout
from model.catalog import Catalog
from train.config import Config, load_config
from train.experiments import tracking

log = logging.getLogger("bookrec.sweep")

# The search space (the defaults in train/config.py lie inside it).
LR = (1e-4, 1e-2)
WEIGHT_DECAY = (1e-6, 1e-2)
DROPOUT = (0.0, 0.5)
FIRST_WIDTH = (64, 128, 256, 512)
LAYERS = (1, 2, 3)
# Config sections that decide the data and features a sweep reuses.
FEATURE_SECTIONS = ("data", "split", "encoder", "distill")


def hidden_sizes(first: int, layers: int) -> list[int]:
    """``layers`` widths, each half the one before (at least 8)."""
    return [max(8, first >> i) for i in range(layers)]


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with a trial's values."""
    out = copy.deepcopy(cfg)
    out.train.lr = float(params["lr"])
    out.train.weight_decay = float(params["weight_decay"])
    out.model.dropout = float(params["dropout"])
    out.model.hidden = hidden_sizes(int(params["first_width"]), int(params["layers"]))
    return out


def params_of(cfg: Config) -> dict[str, Any]:
    """The searched values of a config (its hidden sizes read as first width + layer count)."""
    return {
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "dropout": cfg.model.dropout,
        "first_width": cfg.model.hidden[0],
        "layers": len(cfg.model.hidden),
    }


def search_space(cfg: Config) -> dict[str, tuple]:
    """The ranges above, widened to hold the given config (trial 0) where it lies outside."""
    given = params_of(cfg)

    def span(bounds: tuple[float, float], value: float) -> tuple[float, float]:
        return min(bounds[0], value), max(bounds[1], value)

    return {
        "lr": span(LR, given["lr"]),
        "weight_decay": span(WEIGHT_DECAY, max(given["weight_decay"], 1e-8)),
        "dropout": span(DROPOUT, given["dropout"]),
        "first_width": tuple(sorted({*FIRST_WIDTH, given["first_width"]})),
        "layers": tuple(sorted({*LAYERS, given["layers"]})),
    }


def _same_features(cfg: Config, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds data + features made with ``cfg``'s data, split and encoder settings."""
    saved = run_dir / layout.CONFIG_FILE
    if not (saved.is_file() and (run_dir / layout.DATA_DIR / layout.DATA_RATINGS).is_file()):
        return False
    if not (run_dir / layout.catalog_path(layout.SPEC_FILE)).is_file():
        return False
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.to_dict()
    same = all(old.get(section) == new[section] for section in FEATURE_SECTIONS)
    return same and old.get("model", {}).get("shrinkage") == cfg.model.shrinkage


def prepare_features(cfg: Config, progress: bool = True) -> Path:
    """The run folder with data and features for ``cfg``: reused when they match, else made."""
    from train.data.step import step_data
    from train.features.distill.step import step_distill
    from train.features.step import step_features
    from train.run_context import RunContext
    from train.run_folder import removed_if_failed
    from train.run_record import record_step

    run_dir = Path(cfg.run_dir)
    if _same_features(cfg, run_dir):
        log.info("sweep: reusing data and features of %s", run_dir)
        return run_dir
    run = RunContext(cfg, run_dir)
    with removed_if_failed(run_dir):  # a run folder made here goes if the data step fails
        run_dir.mkdir(parents=True, exist_ok=True)
        step_data(run, progress)
        record_step("data", cfg, run_dir)
    # Each step's record only once it is done: _same_features trusts the saved config to describe them.
    for name, step in (("distill", step_distill), ("features", step_features)):
        step(run, progress)  # distill: a no-op unless the encoder is a distilled student
        record_step(name, cfg, run_dir)
    return run_dir


def train_trial(cfg: Config, catalog: Catalog, data: Any, epochs: int | None) -> dict[str, Any]:
    """Train one MLP with ``cfg``; its best validation RMSE, best epoch and time."""
    from model.artifacts import resolve_device
    from train.rating.fit import fit
    from train.rating.step import new_model

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = new_model(cfg, catalog.spec)
    model.set_standardisation(data.user_table, data.book_table)
    model.to(resolve_device(cfg.train.device))
    result = fit(model, data, cfg.train, epochs=epochs, progress=False)
    return {
        "val_rmse": result.best_val_rmse,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.epochs),
        "seconds": round(result.seconds, 1),
    }


def run_sweep(
    cfg: Config,
    trials: int,
    out: Path | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``trials`` trials (the first is ``cfg`` itself) and write the sweep's files."""
    import optuna

    from train.rating.dataset import load_training_data

    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    start = time.perf_counter()
    run_dir = prepare_features(cfg, progress)
    out = Path(out) if out is not None else run_dir / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    catalog, _, data = load_training_data(cfg, run_dir)
    log.info("sweep: features ready in %.1f s; %d trials", time.perf_counter() - start, trials)

    group = f"sweep-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    space = search_space(cfg)
    given = params_of(cfg)
    given["weight_decay"] = max(given["weight_decay"], 1e-8)  # log scale: 0 is not a value
    study.enqueue_trial(given)  # trial 0: the config as given
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=trials, desc="sweep", unit="trial", disable=not progress)

    def objective(trial: optuna.Trial) -> float:
        params = {
            "lr": trial.suggest_float("lr", *space["lr"], log=True),
            "weight_decay": trial.suggest_float("weight_decay", *space["weight_decay"], log=True),
            "dropout": trial.suggest_float("dropout", *space["dropout"]),
            "first_width": trial.suggest_categorical("first_width", space["first_width"]),
            "layers": trial.suggest_categorical("layers", space["layers"]),
        }
        # Trial 0 trains the config exactly as given (its hidden sizes need not halve).
        trial_cfg = copy.deepcopy(cfg) if trial.number == 0 else apply_params(cfg, params)
        run = None
        if cfg.train.wandb:
            run = tracking.start_run(
                trial_cfg,
                "sweep-trial",
                name=f"{group}-trial-{trial.number}",
                group=group,
                project=cfg.train.wandb_project,
                extra={"trial": {"number": trial.number, **params}},
            )
        result = train_trial(trial_cfg, catalog, data, epochs)
        if run is not None:
            run.summary.update({"val_rmse": result["val_rmse"], "best_epoch": result["best_epoch"]})
            run.finish()
        row = {"trial": trial.number, **params, "hidden": trial_cfg.model.hidden, **result}
        rows.append(row)
        pd.DataFrame(rows).to_csv(out / "trials.csv", index=False)  # so far, should the sweep be stopped
        bar.update(1)
        bar.set_postfix(best=f"{min(r['val_rmse'] for r in rows):.4f}")
        return result["val_rmse"]

    try:
        study.optimize(objective, n_trials=trials)
    finally:
        bar.close()
    summary = write_results(cfg, rows, out, epochs, seed, time.perf_counter() - start)
    if cfg.train.wandb:
        log_sweep_summary(cfg, group, rows, out, summary)
    return summary


def write_results(
    cfg: Config, rows: list[dict[str, Any]], out: Path, epochs: int | None, seed: int, seconds: float
) -> dict[str, Any]:
    """trials.csv/md, sweep.png, best_config.yaml and sweep.json; returns the summary."""
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "trials.csv", index=False)
    best = frame.loc[frame["val_rmse"].idxmin()]
    baseline = frame.loc[frame["trial"] == 0].iloc[0]
    best_cfg = cfg if int(best["trial"]) == 0 else apply_params(cfg, best.to_dict())
    best_cfg.save(out / "best_config.yaml")
    (out / "trials.md").write_text(markdown_table(frame))
    plot_trials(frame, float(baseline["val_rmse"]), out / "sweep.png")
    summary = {
        "trials": len(frame),
        "epoch_cap": epochs or cfg.train.epochs,
        "patience": cfg.train.patience,
        "sampler": f"optuna TPE (seed {seed})",
        "baseline": {"params": params_of(cfg), "val_rmse": float(baseline["val_rmse"])},
        "best": {
            "trial": int(best["trial"]),
            "params": {**params_of(best_cfg), "hidden": best_cfg.model.hidden},
            "val_rmse": float(best["val_rmse"]),
            "best_epoch": int(best["best_epoch"]),
        },
        "improvement": float(baseline["val_rmse"] - best["val_rmse"]),
        "seconds": round(seconds, 1),
        "files": ["trials.csv", "trials.md", "sweep.png", "best_config.yaml"],
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def markdown_table(frame: pd.DataFrame) -> str:
    """The trials sorted by validation RMSE, trial 0 (the given config) marked."""
    lines = [
        "| rank | trial | lr | weight decay | dropout | hidden | best epoch | val RMSE |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for rank, row in enumerate(frame.sort_values("val_rmse").itertuples(), 1):
        name = f"{row.trial} (config)" if row.trial == 0 else str(row.trial)
        lines.append(
            f"| {rank} | {name} | {row.lr:.2e} | {row.weight_decay:.1e} | {row.dropout:.2f} | "
            f"{list(row.hidden)} | {row.best_epoch} | {row.val_rmse:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_trials(frame: pd.DataFrame, baseline: float, path: Path) -> None:
    """Validation RMSE per trial (with the running best) and against each searched value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ax = axes[0]
    ax.plot(frame["trial"], frame["val_rmse"], "o", label="trial")
    ax.plot(frame["trial"], frame["val_rmse"].cummin(), "-", label="best so far")
    ax.axhline(baseline, ls="--", color="grey", label="config as given (trial 0)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation RMSE")
    ax.legend(fontsize=8)
    colors = frame["layers"].map({1: "tab:blue", 2: "tab:orange", 3: "tab:green"})
    for ax, column, log_x in zip(axes[1:], ("lr", "weight_decay", "dropout"), (True, True, False), strict=True):
        ax.scatter(frame[column], frame["val_rmse"], c=colors, s=18 + frame["first_width"] / 8)
        ax.set_xlabel(column.replace("_", " ") + (" (log)" if log_x else ""))
        if log_x:
            ax.set_xscale("log")
    axes[1].set_title("colour: layers 1/2/3 (blue/orange/green); size: first width", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_sweep_summary(cfg: Config, group: str, rows: list[dict[str, Any]], out: Path, summary: dict) -> None:
    """One W&B run holding the trials table, the plot and the best config."""
    import wandb

    run = tracking.start_run(cfg, "sweep", name=f"{group}-summary", group=group, project=cfg.train.wandb_project)
    frame = pd.DataFrame(rows).assign(hidden=lambda f: f["hidden"].map(str))
    run.log({"trials": wandb.Table(dataframe=frame), "sweep": wandb.Image(str(out / "sweep.png"))})
    run.summary.update(
        {"best_val_rmse": summary["best"]["val_rmse"], "baseline_val_rmse": summary["baseline"]["val_rmse"]}
    )
    artifact = wandb.Artifact(f"{group}-best-config", type="config", metadata=summary)
    artifact.add_file(str(out / "best_config.yaml"))
    run.log_artifact(artifact)
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (missing keys take defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20; trial 0 is the config)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap per trial (default: train.epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/sweep)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="a traceback with every error")
    args = parser.parse_args(argv)
    if args.trials < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--trials and --epochs must be at least 1")
    from train.cli import CONFIG_ERRORS, config_problem, fail

    try:
        cfg = load_config(args.config, args.set)
    except CONFIG_ERRORS as err:
        return fail(f"bad config: {config_problem(err, args.config)}", args.verbose)
    from train.data.download import DatasetUnavailable
    from train.data.ingest import DataError
    from train.features.encoders import EncoderUnavailable

    try:
        summary = run_sweep(cfg, args.trials, args.out, args.epochs, args.seed, progress=not args.quiet)
    except (DatasetUnavailable, DataError, EncoderUnavailable) as err:
        return fail(err, args.verbose)
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["apply_params", "hidden_sizes", "params_of", "run_sweep"]
