"""The first training steps: data (ingest, clean, split), features (embed, catalog), train (MLP).

Each step reads what the previous one wrote into the run folder, so steps can be rerun alone;
``train/steps.py`` lists every step in order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model import layout, schemas
from model.artifacts import code_identity, resolve_device
from model.catalog import write_catalog
from model.checkpoint import save_checkpoint
from model.config import Config
from model.encoder import TextEncoder, load_saved_encoder
from model.features import FeatureSpec
from model.network import RatingMLP
from model.text import book_texts, user_texts
from train.dataset import load_tables, load_training_data
from train.distill.step import configured_encoder
from train.download import DatasetUnavailable, resolve_data_dir
from train.embed import EmbeddingCache
from train.finetune import fine_tune
from train.fit import fit, plot_learning_curve
from train.ingest import read_bookcrossing
from train.run_info import data_fingerprint, machine, versions
from train.sample import write_sample
from train.split import assign_splits

log = logging.getLogger("bookrec.pipeline")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _write_parquet(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    pq.write_table(
        pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False),
        path,
    )


def locate_data(cfg: Config, run_dir: Path) -> Path:
    """The CSV folder to read; with ``data.sample_if_missing`` the generated sample as a last resort."""
    try:
        return resolve_data_dir(cfg.data.source, cfg.data.url, Path(cfg.data.download_dir))
    except DatasetUnavailable as err:
        if not cfg.data.sample_if_missing:
            raise
        folder = run_dir / "sample-csv"
        write_sample(
            folder,
            n_users=cfg.data.sample_users,
            n_books=cfg.data.sample_books,
            n_ratings=cfg.data.sample_ratings,
            seed=cfg.split.seed,
        )
        log.warning(
            "%s\n-> no real data reachable: using the generated sample in %s",
            err,
            folder,
        )
        return folder


def step_data(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """Ingest, clean and split Book-Crossing; write Parquet tables and the data fingerprint."""
    source = locate_data(cfg, run_dir)
    raw = read_bookcrossing(source, progress=progress)
    ratings = assign_splits(raw.ratings, cfg.split)
    out = run_dir / layout.DATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    _write_parquet(raw.users, schemas.USERS, out / layout.DATA_USERS)
    _write_parquet(raw.books, schemas.BOOKS, out / layout.DATA_BOOKS)
    _write_parquet(ratings, schemas.RATINGS_SPLIT, out / layout.DATA_RATINGS)
    write_json(out / layout.INGEST_REPORT, raw.report.to_dict())
    fingerprint = data_fingerprint(source, {"users": raw.users, "books": raw.books, "ratings": ratings})
    write_json(run_dir / layout.FINGERPRINT_FILE, fingerprint)
    summary = {
        "source": str(source),
        "layout": raw.report.layout,
        "splits": ratings["split"].value_counts().to_dict(),
    }
    log.info("data: %s", summary)
    print(raw.report.summary())
    return summary


def training_history(ratings: pd.DataFrame) -> pd.DataFrame:
    """What the catalog knows of each reader: training ratings plus implicit reads, except those of
    cold-test users and books, whose whole history stays unseen."""
    cold = ratings["split"].isin(["cold_book", "cold_user", "cold_both"])
    cold_users = ratings.loc[ratings["split"].isin(["cold_user", "cold_both"]), "user_id"].unique()
    cold_books = ratings.loc[ratings["split"].isin(["cold_book", "cold_both"]), "isbn"].unique()
    implicit = (ratings["split"] == "implicit") & ~cold
    implicit &= ~ratings["user_id"].isin(cold_users) & ~ratings["isbn"].isin(cold_books)
    return ratings[(ratings["split"] == "train") | implicit]


def step_features(cfg: Config, run_dir: Path, progress: bool = True, encoder: TextEncoder | None = None) -> dict:
    """Embed every catalog book and user with the encoder (cached) and write the catalog.

    ``encoder`` replaces the configured one (the fine-tuning stage passes its tuned encoder)."""
    users, books, ratings = load_tables(run_dir)
    # Every book of the books file is in the catalog, rated or not: a new arrival is recommendable
    # from its text and metadata. Users are those who read anything.
    users = users[users["user_id"].isin(ratings["user_id"])].reset_index(drop=True)
    btexts, utexts = book_texts(books), user_texts(users)

    if encoder is None:
        encoder = configured_encoder(cfg, run_dir, corpus=btexts + utexts)
    cache = EmbeddingCache(Path(cfg.encoder.cache_dir))
    book_emb, book_stats = cache.embed(encoder, btexts, cfg.encoder.batch_size, progress)
    user_emb, user_stats = cache.embed(encoder, utexts, cfg.encoder.batch_size, progress)
    encoder.save(run_dir / layout.ENCODER_DIR)

    train = ratings[ratings["split"] == "train"]
    spec = FeatureSpec(
        emb_dim=encoder.dim,
        global_mean=float(train["rating"].mean()),
        shrinkage=cfg.model.shrinkage,
    )
    write_catalog(run_dir, books, book_emb, users, user_emb, training_history(ratings), spec)
    summary = {
        "encoder": encoder.source,
        "pooling": encoder.pooling,
        "books": len(books),
        "users": len(users),
        "book_embedding": book_stats,
        "user_embedding": user_stats,
    }
    write_json(run_dir / layout.FEATURES_REPORT, summary)
    log.info("features: %s", summary)
    return summary


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


def prepare_run(cfg: Config) -> Path:
    """Create the run folder with the config, versions, machine and code identity beside it."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / layout.CONFIG_FILE)
    write_json(run_dir / layout.VERSIONS_FILE, {**versions(), "machine": machine(), "code": code_identity()})
    return run_dir
