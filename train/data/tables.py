"""The data step's tables read back from a run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from model import layout
from train.config import SplitConfig

COLD_BOOK_SPLITS = ("cold_book", "cold_both")


def cold_test_books(ratings: pd.DataFrame) -> np.ndarray:
    """ISBNs of the cold-test books (every explicit rating of them is in a cold-book split)."""
    return ratings.loc[ratings["split"].isin(COLD_BOOK_SPLITS), "isbn"].unique()


def catalog_ratings(ratings: pd.DataFrame, split: SplitConfig) -> pd.DataFrame:
    """The split ratings the steps after ``features`` read: all of them, or, with
    ``split.hold_out_cold_books``, none of a cold-test book (held out of the catalog)."""
    if not split.hold_out_cold_books:
        return ratings
    return ratings[~ratings["isbn"].isin(cold_test_books(ratings))].reset_index(drop=True)


def load_tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, books, ratings with their split) as the data step wrote them."""
    folder = Path(run_dir) / layout.DATA_DIR
    names = (layout.DATA_USERS, layout.DATA_BOOKS, layout.DATA_RATINGS)
    return tuple(pq.read_table(folder / name).to_pandas() for name in names)
