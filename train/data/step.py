"""The ``data`` step: ingest, clean and split Book-Crossing into the run folder's Parquet tables."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model import layout, schemas
from model.config import Config
from train.data.download import DatasetUnavailable, resolve_data_dir
from train.data.ingest import read_bookcrossing
from train.data.sample import write_sample
from train.data.split import assign_splits
from train.run_context import RunContext
from train.run_folder import data_fingerprint, write_json

log = logging.getLogger("bookrec.pipeline")


def _write_parquet(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> pd.DataFrame:
    """Write ``frame`` as ``schema`` says; returns the table as reading the file back gives it."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path)
    return table.to_pandas()


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


def step_data(run: RunContext, progress: bool = True) -> dict:
    """Ingest, clean and split Book-Crossing; write Parquet tables and the data fingerprint."""
    cfg, run_dir = run.cfg, run.dir
    source = locate_data(cfg, run_dir)
    raw = read_bookcrossing(source, progress=progress)
    ratings = assign_splits(raw.ratings, cfg.split)
    out = run_dir / layout.DATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = (
        _write_parquet(raw.users, schemas.USERS, out / layout.DATA_USERS),
        _write_parquet(raw.books, schemas.BOOKS, out / layout.DATA_BOOKS),
        _write_parquet(ratings, schemas.RATINGS_SPLIT, out / layout.DATA_RATINGS),
    )
    run.keep("tables", written)
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
