"""What the steps of one run hand each other in memory: the split tables, the catalog, the training
tensors, the model folder's pieces and the steps' reports.

``python -m train run`` makes one ``RunContext`` and passes it to every step; a step run alone
(``python -m train STEP``) gets a fresh one. A piece is read from the run folder the first time a
step asks for it, unless an earlier step of the run handed it over (``keep``); a step that rewrites
a file hands over the new piece or drops the old one, and what was built from it goes with it.
What a step hands over is what reading its files back gives, so the next step computes the same
whichever way the piece came.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from model import layout
from model.artifacts import ModelFolder, resolve_device
from model.book_index import BookIndex
from model.candidates import ItemGraph
from model.catalog import Catalog
from model.ranker import RankingSettings
from model.recommend import RetrievalSettings
from train.config import Config
from train.data.tables import catalog_ratings, load_tables
from train.rating.dataset import TrainingData, build_training_data
from train.run_folder import write_json

# Every piece a run's steps hand each other. "rating:VARIANT" is a rating-model variant; the modules
# are the CPU ones (a step that asks for another device reads the file).
PIECES = frozenset(
    {
        "tables",
        "catalog",
        "training_data",
        *(f"rating:{v}" for v in layout.MODEL_FILES),
        "towers",
        "book_vectors",
        "book_index",
        "retrieval_settings",
        "item_graph",
        "ranker",
        "ranking_settings",
    }
)
# Pieces built in memory from others: replacing one of the others drops them.
BUILT_FROM = {"training_data": ("tables", "catalog")}


class _Later:
    """A piece handed over unbuilt: built on first use."""

    def __init__(self, build: Callable[[], Any]):
        self.build = build


def _on_cpu(device: str | torch.device) -> bool:
    return resolve_device(device).type == "cpu"


@dataclass(frozen=True)
class RunFolder(ModelFolder):
    """The run folder as a model folder whose pieces (CPU modules, catalog, settings) are read once
    and then shared by the run's steps."""

    kept: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # How often each piece was read from the folder or built here (what a handed-over piece saves).
    made: Counter[str] = field(default_factory=Counter, compare=False, repr=False)

    def piece(self, name: str, read: Callable[[], Any]) -> Any:
        """Piece ``name``: kept, or ``read()`` now and kept."""
        if name not in PIECES:
            raise KeyError(f"unknown piece {name!r}")
        if name not in self.kept:
            self.kept[name] = read()
            self.made[name] += 1
        elif isinstance(self.kept[name], _Later):
            self.kept[name] = self.kept[name].build()
        return self.kept[name]

    def keep(self, name: str, value: Any) -> None:
        """Hand over piece ``name`` (a step wrote its file); what was built from the old one goes."""
        self.drop(name)
        self.kept[name] = value

    def keep_later(self, name: str, build: Callable[[], Any]) -> None:
        """As ``keep``, for a piece ``build()`` makes on first use (no cost to a step run alone)."""
        self.keep(name, _Later(build))

    def drop(self, *names: str) -> None:
        """Forget pieces (a step rewrote or removed their files) and what was built from them."""
        for name in names:
            if name not in PIECES:
                raise KeyError(f"unknown piece {name!r}")
            self.kept.pop(name, None)
            self.drop(*(built for built, sources in BUILT_FROM.items() if name in sources))

    # The model folder's readers, each through ``piece``.
    def load_catalog(self) -> Catalog:
        return self.piece("catalog", super().load_catalog)

    def load_rating_model(self, variant: str = layout.SHIPPED_VARIANT, device: str | torch.device = "cpu"):
        if not _on_cpu(device):
            return super().load_rating_model(variant, device)
        return self.piece(f"rating:{variant}", partial(super().load_rating_model, variant))

    def load_towers(self, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
        if not _on_cpu(device):
            return super().load_towers(device)
        return self.piece("towers", super().load_towers)

    def book_vectors(self) -> torch.Tensor:
        return self.piece("book_vectors", super().book_vectors)

    def book_index(self) -> BookIndex | None:
        return self.piece("book_index", super().book_index)

    def retrieval_settings(self) -> RetrievalSettings:
        return self.piece("retrieval_settings", super().retrieval_settings)

    def ranking_settings(self) -> RankingSettings:
        return self.piece("ranking_settings", super().ranking_settings)

    def item_graph(self) -> ItemGraph:
        return self.piece("item_graph", super().item_graph)

    def load_ranker(self, device: str | torch.device = "cpu") -> torch.jit.ScriptModule | None:
        if not _on_cpu(device):
            return super().load_ranker(device)
        return self.piece("ranker", super().load_ranker)


class RunContext:
    """One run's config, run folder and the pieces its steps hand each other."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.folder = RunFolder(self.dir)
        self.reports: dict[str, dict] = {}

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(users, books, ratings with their split), as the data step wrote them."""
        return self.folder.piece("tables", partial(load_tables, self.dir))

    def ratings(self) -> pd.DataFrame:
        """The split ratings of the catalog's books (``catalog_ratings``): what the steps after
        ``features`` train and evaluate on."""
        return catalog_ratings(self.tables()[2], self.cfg.split)

    def catalog(self) -> Catalog:
        return self.folder.load_catalog()

    def training_data(self) -> TrainingData:
        """The training tensors of the catalog and the split ratings (``train/rating/dataset.py``)."""
        return self.folder.piece(
            "training_data",
            lambda: build_training_data(self.catalog(), self.ratings(), self.cfg.split.folds, self.cfg.split.seed),
        )

    def keep(self, name: str, value: Any) -> None:
        self.folder.keep(name, value)

    def keep_later(self, name: str, build: Callable[[], Any]) -> None:
        self.folder.keep_later(name, build)

    def drop(self, *names: str) -> None:
        self.folder.drop(*names)

    def write_report(self, name: str, payload: dict) -> None:
        """Write the JSON report ``name`` into the run folder and keep it for later steps."""
        write_json(self.dir / name, payload)
        self.reports[name] = payload

    def report(self, name: str) -> dict:
        """A step's JSON report: kept, or read from the run folder."""
        if name not in self.reports:
            self.reports[name] = json.loads((self.dir / name).read_text())
        return self.reports[name]
