"""The ``features`` step: every catalog book and user embedded with the run's encoder (cached), and
the catalog the model serves from (``train/features/catalog.py``)."""

from __future__ import annotations

from train.features.catalog import embed_catalog
from train.run_context import RunContext


def step_features(run: RunContext, progress: bool = True) -> dict:
    """Embed every catalog book and user with the configured encoder (cached) and write the catalog."""
    return embed_catalog(run, progress=progress)
