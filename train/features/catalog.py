"""The catalog the model serves from: every catalog book and user embedded with an encoder (cached)
and written with the training history and the feature spec. The features step makes it with the
configured encoder; the fine-tuning stage of the train step remakes it with the tuned one."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from model import layout
from model.catalog import write_catalog
from model.encoder import TextEncoder
from model.features import FeatureSpec
from model.text import book_texts, user_texts
from train.data.tables import cold_test_books
from train.features.distill.step import configured_encoder
from train.features.embed import EmbeddingCache
from train.features.scripted import save_scripted
from train.run_context import RunContext

log = logging.getLogger("bookrec.pipeline")


def training_history(ratings: pd.DataFrame) -> pd.DataFrame:
    """What the catalog knows of each reader: training ratings plus implicit reads, except those of
    cold-test users and books, whose whole history stays unseen."""
    cold = ratings["split"].isin(["cold_book", "cold_user", "cold_both"])
    cold_users = ratings.loc[ratings["split"].isin(["cold_user", "cold_both"]), "user_id"].unique()
    cold_books = cold_test_books(ratings)
    implicit = (ratings["split"] == "implicit") & ~cold
    implicit &= ~ratings["user_id"].isin(cold_users) & ~ratings["isbn"].isin(cold_books)
    return ratings[(ratings["split"] == "train") | implicit]


def embed_catalog(run: RunContext, encoder: TextEncoder | None = None, progress: bool = True) -> dict:
    """Embed every catalog book and user with ``encoder`` (None: the configured one; cached), write
    the encoder, the catalog and ``features.json``, and hand the catalog to the run's later steps."""
    cfg = run.cfg
    users, books, ratings = run.tables()
    # Every book of the books file is in the catalog, rated or not: a new arrival is recommendable
    # from its text and metadata. Users are those who read anything.
    users = users[users["user_id"].isin(ratings["user_id"])].reset_index(drop=True)
    if cfg.split.hold_out_cold_books:  # users stay: the same catalog rows as a run that keeps the books
        books = books[~books["isbn"].isin(cold_test_books(ratings))].reset_index(drop=True)
    btexts, utexts = book_texts(books), user_texts(users)

    if encoder is None:
        encoder = configured_encoder(cfg, run.dir, corpus=btexts + utexts)
    cache = EmbeddingCache(Path(cfg.encoder.cache_dir))
    book_emb, book_stats = cache.embed(encoder, btexts, cfg.encoder.batch_size, progress)
    user_emb, user_stats = cache.embed(encoder, utexts, cfg.encoder.batch_size, progress)
    encoder.save(run.dir / layout.ENCODER_DIR)
    save_scripted(encoder, run.dir / layout.ENCODER_DIR)

    train = ratings[ratings["split"] == "train"]
    spec = FeatureSpec(
        emb_dim=encoder.dim,
        global_mean=float(train["rating"].mean()),
        shrinkage=cfg.model.shrinkage,
    )
    catalog = write_catalog(run.dir, books, book_emb, users, user_emb, training_history(ratings), spec)
    run.keep_later("catalog", lambda: catalog)
    summary = {
        "encoder": encoder.source,
        "pooling": encoder.pooling,
        "books": len(books),
        "users": len(users),
        "book_embedding": book_stats,
        "user_embedding": user_stats,
    }
    run.write_report(layout.FEATURES_REPORT, summary)
    log.info("features: %s", summary)
    return summary
