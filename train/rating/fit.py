"""The training loop: mini-batch MSE, early stopping on validation RMSE, per-epoch JSONL log."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from model.network import RatingMLP
from train.config import TrainConfig
from train.experiments.tracking import active_run, log_epoch, start_run
from train.metrics import rmse
from train.rating.dataset import SplitRows, TrainingData

log = logging.getLogger("bookrec.fit")


@dataclass
class FitResult:
    best_epoch: int
    best_val_rmse: float
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class EarlyStopping:
    """Keeps the weights of the best epoch so far and says when ``patience`` epochs in a row brought
    no improvement of more than ``min_delta`` (lower is better unless ``higher_is_better``)."""

    def __init__(self, model: nn.Module, patience: int, higher_is_better: bool = False, min_delta: float = 1e-5):
        self.model, self.patience, self.min_delta = model, patience, min_delta
        self.sign = 1.0 if higher_is_better else -1.0
        self.best = -self.sign * math.inf
        self.best_epoch, self.stale = 0, 0
        self.state = copy.deepcopy(model.state_dict())

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's validation figure; True when training should stop."""
        if self.sign * value > self.sign * self.best + self.min_delta:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.state = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self) -> None:
        """Load the best epoch's weights into the model, in eval mode."""
        self.model.load_state_dict(self.state)
        self.model.eval()


@torch.no_grad()
def predict(
    model: nn.Module,
    user_table: torch.Tensor,
    book_table: torch.Tensor,
    rows: SplitRows,
    batch_size: int = 16384,
) -> np.ndarray:
    """Clipped predictions for every row of a split, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(iter(model.buffers())).device
    out = []
    for start in range(0, len(rows), batch_size):
        u = user_table[rows.user_row[start : start + batch_size]].to(device)
        b = book_table[rows.book_row[start : start + batch_size]].to(device)
        out.append(model(u, b).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def rmse_of(model: nn.Module, data: TrainingData, split: str) -> float:
    rows = data.splits[split]
    return rmse(rows.rating.numpy(), predict(model, data.user_table, data.book_table, rows))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")


def fit(
    model: RatingMLP,
    data: TrainingData,
    cfg: TrainConfig,
    log_path: Path | None = None,
    epochs: int | None = None,
    progress: bool = True,
    stage: str = "train",
) -> FitResult:
    """Train ``model`` in place; keeps the weights of the epoch with the best validation RMSE."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(iter(model.buffers())).device
    optimizer = make_optimizer(model.parameters(), cfg)
    train = data.splits["train"]
    n_epochs = cfg.epochs if epochs is None else epochs
    tracker, own_tracker = _wandb_run(cfg, stage)

    stopper = EarlyStopping(model, cfg.patience)
    result = FitResult(0, math.inf)
    start = time.perf_counter()
    for epoch in range(1, n_epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total, seen = 0.0, 0
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"{stage} epoch {epoch}",
            leave=False,
            disable=not progress,
        )
        for begin in bar:
            idx = order[begin : begin + cfg.batch_size]
            u = data.user_table[train.user_row[idx]].to(device)
            b = data.book_table[train.book_row[idx]].to(device)
            y = train.rating[idx].to(device)
            loss = nn.functional.mse_loss(model(u, b), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        val_rmse = rmse_of(model, data, "val")
        row = {
            "stage": stage,
            "epoch": epoch,
            "train_rmse": math.sqrt(total / max(seen, 1)),
            "val_rmse": val_rmse,
            "seconds": round(time.perf_counter() - start, 2),
        }
        result.epochs.append(row)
        if log_path is not None:
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if tracker is not None:
            log_epoch(tracker, row)
        log.info(
            "%s epoch %d: train RMSE %.4f, val RMSE %.4f",
            stage,
            epoch,
            row["train_rmse"],
            val_rmse,
        )
        if stopper.update(val_rmse, epoch):
            break
    stopper.restore()
    if own_tracker:
        tracker.summary["best_val_rmse"] = stopper.best
        tracker.finish()
    result.best_epoch, result.best_val_rmse = stopper.best_epoch, stopper.best
    result.seconds = time.perf_counter() - start
    return result


def _wandb_run(cfg: TrainConfig, stage: str) -> tuple[Any, bool]:
    """(W&B run to log epochs into, whether this call started it) when ``train.wandb`` is on.

    Inside a tracked job (``python -m train run``, a sweep trial) the epochs go into that job's run;
    a step run alone gets a run of its own, closed when the fit ends."""
    if not cfg.wandb:
        return None, False
    run = active_run()
    if run is not None:
        return run, False
    return start_run({"train": cfg.model_dump()}, stage, project=cfg.wandb_project), True


def plot_learning_curve(epochs: list[dict], path: Path) -> None:
    """Train and validation RMSE per epoch, one line per stage, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    stages = dict.fromkeys(row["stage"] for row in epochs)
    offset = 0
    for stage in stages:
        rows = [r for r in epochs if r["stage"] == stage]
        x = [offset + r["epoch"] for r in rows]
        ax.plot(x, [r["train_rmse"] for r in rows], "o--", label=f"{stage}: training RMSE (dropout on)")
        ax.plot(x, [r["val_rmse"] for r in rows], "o-", label=f"{stage}: validation RMSE")
        offset = x[-1]
    ax.set_xlabel("epoch")
    ax.set_ylabel("RMSE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
