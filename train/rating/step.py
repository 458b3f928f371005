"""The ``train`` step: the rating MLP fitted with early stopping (after the optional encoder
fine-tuning stage)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from model import layout
from model.artifacts import resolve_device
from model.checkpoint import save_checkpoint
from model.encoder import load_saved_encoder
from model.features import FeatureSpec
from model.network import RatingMLP
from train.config import Config
from train.features.step import step_features
from train.rating.dataset import load_training_data
from train.rating.finetune import fine_tune
from train.rating.fit import fit, plot_learning_curve
from train.run_folder import write_json

log = logging.getLogger("bookrec.pipeline")


def new_model(cfg: Config, spec: FeatureSpec) -> RatingMLP:
    return RatingMLP(
        spec.user_dim,
        spec.book_dim,
        cfg.model.hidden,
        cfg.model.dropout,
        spec.global_mean,
    )


def step_train(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """Train the MLP with early stopping; write the fp32 checkpoint, JSONL log and learning curve."""
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    summary: dict = {"device": str(device)}
    if cfg.train.fine_tune_encoder:
        summary["fine_tune"] = fine_tune_stage(cfg, run_dir, device, progress)
    catalog, _, data = load_training_data(cfg, run_dir)
    model = new_model(cfg, catalog.spec)
    model.set_standardisation(data.user_table, data.book_table)
    model.to(device)
    log_path = run_dir / layout.METRICS_LOG
    log_path.unlink(missing_ok=True)
    result = fit(model, data, cfg.train, log_path, progress=progress)
    save_checkpoint(model.cpu(), run_dir / layout.MODEL_FILES["fp32"])
    plot_learning_curve(result.epochs, run_dir / layout.LEARNING_CURVE)
    summary.update(best_epoch=result.best_epoch, best_val_rmse=result.best_val_rmse, seconds=round(result.seconds, 1))
    write_json(run_dir / layout.TRAIN_REPORT, summary)
    return summary


def fine_tune_stage(cfg: Config, run_dir: Path, device: torch.device, progress: bool) -> dict:
    """Fine-tune the encoder with a throwaway MLP, then rewrite encoder and catalog with it."""
    catalog, _, data = load_training_data(cfg, run_dir)
    encoder = load_saved_encoder(run_dir / layout.ENCODER_DIR)
    encoder.model.to(device)
    model = new_model(cfg, catalog.spec)
    model.set_standardisation(data.user_table, data.book_table)
    summary = fine_tune(encoder, model.to(device), catalog, data, cfg.train, progress)
    encoder.model.cpu()
    encoder.source += f"+fine-tuned:{cfg.train.fine_tune_steps}x{cfg.train.fine_tune_batch_size}"
    step_features(cfg, run_dir, progress, encoder=encoder)
    return summary
