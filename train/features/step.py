"""The ``features`` step: every catalog book and user embedded with the run's encoder (cached), and
the catalog the model serves from."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from model import layout
from model.catalog import write_catalog
from model.encoder import TextEncoder
from model.features import FeatureSpec
from model.text import book_texts, user_texts
from train.config import Config
from train.data.tables import load_tables
from train.features.distill.step import configured_encoder
from train.features.embed import EmbeddingCache
from train.run_folder import write_json

log = logging.getLogger("bookrec.pipeline")


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
