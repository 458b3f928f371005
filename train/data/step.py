"""The ``data`` step: ingest, clean and split Book-Crossing into the run folder's Parquet tables."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model import layout, schemas
from train.config import Config
from train.data.download import ENV_VAR, DatasetUnavailable, resolve_data_dir
from train.data.ingest import DataError, RawTables, read_bookcrossing
from train.data.sample import write_sample
from train.data.split import assign_splits
from train.run_context import RunContext
from train.run_folder import data_fingerprint, write_json

log = logging.getLogger("bookrec.pipeline")

SAMPLE_DIR = "sample-csv"  # in the run folder: the generated sample, where it stood in for the data


def _write_parquet(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> pd.DataFrame:
    """Write ``frame`` as ``schema`` says; returns the table as reading the file back gives it."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path)
    return table.to_pandas()


def locate_data(cfg: Config, run_dir: Path) -> Path:
    """The CSV folder to read; with ``data.sample_if_missing`` the generated sample as a last resort.

    The sample stands in only when no data was named at all (no ``data.source``, no ``$BOOKREC_DATA``)
    and the download failed: a named folder that is missing or unusable is an error, never the sample.
    """
    try:
        return resolve_data_dir(cfg.data.source, cfg.data.url, Path(cfg.data.download_dir))
    except DatasetUnavailable as err:
        if not cfg.data.sample_if_missing or cfg.data.source or os.environ.get(ENV_VAR):
            raise
        folder = run_dir / SAMPLE_DIR
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


def _require_training_rows(ratings: pd.DataFrame, raw: RawTables) -> None:
    """Refuse a split that leaves nothing to train on (all ratings implicit, or the split settings)."""
    if (ratings["split"] == "train").any():
        return
    explicit = int((ratings["rating"] > 0).sum())
    why = "every kept rating is implicit (0)" if not explicit else f"the split leaves none of {explicit:,} explicit"
    splits = ratings["split"].value_counts().to_dict()
    raise DataError(f"{raw.files['ratings']}: no training ratings: {why} (splits: {splits})")


@contextmanager
def _replaced_folder(folder: Path) -> Iterator[Path]:
    """A new folder beside ``folder`` that takes its place when the block succeeds; removed if it fails."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{folder.name}-new-", dir=folder.parent))
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = new.with_name(new.name.replace("-new-", "-old-"))
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def step_data(run: RunContext, progress: bool = True) -> dict:
    """Ingest, clean and split Book-Crossing; write Parquet tables and the data fingerprint.

    A dataset that leaves a table or the training split empty is a :class:`DataError`. The tables
    are written to a new folder that replaces ``data/`` only once all are written, and the
    fingerprint after it: a failed step leaves the previous data and fingerprint as they were.
    """
    cfg, run_dir = run.cfg, run.dir
    source = locate_data(cfg, run_dir)
    generated = source == run_dir / SAMPLE_DIR
    raw = read_bookcrossing(source, progress=progress)
    ratings = assign_splits(raw.ratings, cfg.split)
    _require_training_rows(ratings, raw)
    fingerprint = data_fingerprint(source, {"users": raw.users, "books": raw.books, "ratings": ratings})
    with _replaced_folder(run_dir / layout.DATA_DIR) as out:
        written = (
            _write_parquet(raw.users, schemas.USERS, out / layout.DATA_USERS),
            _write_parquet(raw.books, schemas.BOOKS, out / layout.DATA_BOOKS),
            _write_parquet(ratings, schemas.RATINGS_SPLIT, out / layout.DATA_RATINGS),
        )
        # The evaluation's report says which data it measured: the real data or the stand-in sample.
        write_json(out / layout.INGEST_REPORT, {**raw.report.to_dict(), "generated_sample": generated})
    run.keep("tables", written)
    partial = run_dir / f".{layout.FINGERPRINT_FILE}.new"
    write_json(partial, fingerprint)
    partial.replace(run_dir / layout.FINGERPRINT_FILE)
    summary = {
        "source": str(source),
        "layout": raw.report.layout,
        "generated_sample": generated,
        "splits": ratings["split"].value_counts().to_dict(),
    }
    log.info("data: %s", summary)
    print(raw.report.summary())
    return summary
