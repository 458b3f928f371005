"""The data step's tables read back from a run folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from model import layout


def load_tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, books, ratings with their split) as the data step wrote them."""
    folder = Path(run_dir) / layout.DATA_DIR
    names = (layout.DATA_USERS, layout.DATA_BOOKS, layout.DATA_RATINGS)
    return tuple(pq.read_table(folder / name).to_pandas() for name in names)
