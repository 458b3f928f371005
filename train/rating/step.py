"""The ``train`` step: the rating MLP fitted with early stopping (after the optional encoder
fine-tuning stage)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from model import layout
from model.artifacts import resolve_device
from model.checkpoint import save_checkpoint
from model.encoder import load_saved_encoder
from model.features import FeatureSpec
from model.network import RatingMLP
from train.config import Config
from train.features.catalog import embed_catalog
from train.rating.finetune import fine_tune
from train.rating.fit import fit, plot_learning_curve
from train.run_context import RunContext
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


def step_train(run: RunContext, progress: bool = True) -> dict:
    """Train the MLP with early stopping; write the fp32 checkpoint, JSONL log and learning curve."""
    cfg, run_dir = run.cfg, run.dir
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    summary: dict = {"device": str(device)}
    if cfg.train.fine_tune_encoder:
        summary["fine_tune"] = fine_tune_stage(run, device, progress)
    catalog, data = run.catalog(), run.training_data()
    model = new_model(cfg, catalog.spec)
    model.set_standardisation(data.user_table, data.book_table)
    model.to(device)
    log_path = run_dir / layout.METRICS_LOG
    log_path.unlink(missing_ok=True)
    result = fit(model, data, cfg.train, log_path, progress=progress)
    save_checkpoint(model.cpu(), run_dir / layout.MODEL_FILES["fp32"])
    # The compress step reads the checkpoint back: the file, not this module (its dropout stays
    # behind), is the fp32 model every later use sees.
    run.drop("rating:fp32")
    plot_learning_curve(result.epochs, run_dir / layout.LEARNING_CURVE)
    summary.update(best_epoch=result.best_epoch, best_val_rmse=result.best_val_rmse, seconds=round(result.seconds, 1))
    write_json(run_dir / layout.TRAIN_REPORT, summary)
    return summary


def fine_tune_stage(run: RunContext, device: torch.device, progress: bool) -> dict:
    """Fine-tune the encoder with a throwaway MLP, then rewrite encoder and catalog with it."""
    cfg = run.cfg
    catalog, data = run.catalog(), run.training_data()
    encoder = load_saved_encoder(run.dir / layout.ENCODER_DIR)
    encoder.model.to(device)
    model = new_model(cfg, catalog.spec)
    model.set_standardisation(data.user_table, data.book_table)
    summary = fine_tune(encoder, model.to(device), catalog, data, cfg.train, progress)
    encoder.model.cpu()
    encoder.source += f"+fine-tuned:{cfg.train.fine_tune_steps}x{cfg.train.fine_tune_batch_size}"
    embed_catalog(run, encoder, progress)
    return summary
