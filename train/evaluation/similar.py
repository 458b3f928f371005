"""The "similar books" protocol: do readers of a book also read the books it is shown next to?

From a split's ratings, every reader with at least two distinct books of that split gives one pair
(a seeded choice): a **query** book and a **held-out** book. Recall@10 is the share of pairs whose
held-out book is among the query's 10 most similar books (the query itself never counts). Test
pairs report; validation pairs choose settings, so nothing is tuned on test:

- the model's lists (``model/similar.py``): the fusion's weights and offset, from ``FUSION_GRID``;
- item-kNN and RP3beta item-item lists: the rows of the very models of the top-K baselines
  (``train.evaluation.topk_baselines``: a history of one book scores that book's row), over the same
  grids (``eval.topk_tuning``), fitted on the training interactions, the best on validation pairs kept;
- the most read books (the query left out), for scale.

Every method answers the same pairs from the same training interactions.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from model.candidates import history_matrix
from model.catalog import Catalog
from model.similar import SimilarIndex, SimilarSettings, fuse
from train.config import TopKTuning
from train.evaluation.topk_baselines import MostPopular, TopKBaseline, recommend_top_k
from train.evaluation.tuning import fitted, settings

log = logging.getLogger("bookrec.similar")

K = 10
QUERY_BLOCK = 1024
# The fusion's grid: weights of the towers, author and popular sources (the graph's is 1) and the
# rank offset. The graph, the book vectors and the author always take part (a list about the book,
# and a new book's only sources besides the popular one); the popular source may be off.
FUSION_GRID = {
    "towers": [0.25, 0.5, 1.0],
    "author": [0.5, 1.0, 2.0],
    "popular": [0.0, 0.5, 1.0],
    "offset": [10.0, 30.0],
}
BASELINES = ("item-kNN", "RP3β")
FUSED = "similar: fused (towers, graph, author, popular)"


@dataclass
class Pairs:
    """One (query, held-out) pair of catalog rows per reader."""

    split: str
    query: np.ndarray  # [N]
    held_out: np.ndarray  # [N]

    def __len__(self) -> int:
        return len(self.query)

    def recall(self, lists: dict[int, np.ndarray] | np.ndarray) -> float:
        """Share of pairs whose held-out book is in its query's list (``lists[i]``: the list of the
        ``i``-th unique query, as ``queries`` orders them)."""
        _, inverse = np.unique(self.query, return_inverse=True)
        top = np.asarray(lists)[inverse, :K]
        return float((top == self.held_out[:, None]).any(axis=1).mean()) if len(self) else 0.0

    @property
    def queries(self) -> np.ndarray:
        return np.unique(self.query)


def pairs(catalog: Catalog, ratings: pd.DataFrame, split: str, seed: int) -> Pairs:
    """The seeded (query, held-out) pair of every reader with at least two distinct books in ``split``."""
    part = ratings.loc[ratings["split"] == split, ["user_id", "isbn"]].drop_duplicates()
    part = part[part["isbn"].isin(catalog.book_index)]
    shuffled = part.sample(frac=1.0, random_state=seed)
    two = shuffled.groupby("user_id", sort=True).head(2).sort_values("user_id", kind="stable")
    two = two[two.groupby("user_id")["isbn"].transform("size") == 2]  # a reader's two rows, in turn
    rows = two["isbn"].map(catalog.book_index).to_numpy(np.int64).reshape(-1, 2)
    return Pairs(split, rows[:, 0], rows[:, 1])


def similar_lists(index: SimilarIndex, queries: np.ndarray, settings: list[SimilarSettings]) -> list[np.ndarray]:
    """[Q, K] lists of ``queries`` under each fusion setting; the sources are ranked once per block."""
    out = [np.full((len(queries), K), -1, np.int64) for _ in settings]
    for s in range(0, len(queries), QUERY_BLOCK):
        rows = queries[s : s + QUERY_BLOCK]
        parts = _sources(index, rows)
        for n, setting in enumerate(settings):
            out[n][s : s + len(rows)] = fuse(parts, setting, K).rows
    return out


def _sources(index: SimilarIndex, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every source's lists of catalog queries, whatever the index's own weights."""
    vectors = index.vectors[torch.from_numpy(rows)].float()
    return (
        index.towers_rows(vectors, rows),
        index.graph_rows(rows),
        index.author_rows(index.authors.author[rows], rows),
        index.popular_rows(rows),
    )


def item_item_lists(model: TopKBaseline, queries: np.ndarray, n_items: int) -> np.ndarray:
    """[Q, K] a top-K baseline's list for a reader of one book: that book's row of the model."""
    one = history_matrix([np.array([q]) for q in queries], n_items)
    return recommend_top_k(model, one, one, K)


def fusion_grid() -> list[SimilarSettings]:
    names, values = zip(*FUSION_GRID.items(), strict=True)
    return [SimilarSettings(**dict(zip(names, combo, strict=True))) for combo in itertools.product(*values)]


def evaluate_similar(
    index: SimilarIndex,
    train: sp.csr_matrix,
    catalog: Catalog,
    ratings: pd.DataFrame,
    tuning: TopKTuning,
    seed: int,
) -> dict[str, Any]:
    """Validation-tuned test recall@10 of the model's similar books and of the item-item baselines:
    ``{"pairs": {split: n}, "results": {name: {"val_recall@10", "test_recall@10", "params"}}, "grid": ...}``."""
    val, test = pairs(catalog, ratings, "val", seed), pairs(catalog, ratings, "test", seed)
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}

    start = time.perf_counter()
    grid = fusion_grid()
    val_recalls = [val.recall(lists) for lists in similar_lists(index, val.queries, grid)]
    best = grid[int(np.argmax(val_recalls))]
    # The chosen fusion, the best without the popular source, and each source alone.
    no_popular = [n for n, s in enumerate(grid) if s.popular == 0]
    alone = SimilarSettings(towers=0.0, graph=0.0, author=0.0, popular=0.0, offset=best.offset)
    ablations = {
        FUSED: best,
        "similar: fused without the popular source": grid[
            no_popular[int(np.argmax([val_recalls[n] for n in no_popular]))]
        ],
        "similar: graph row alone": replace(alone, graph=1.0),
        "similar: towers (book vectors) alone": replace(alone, towers=1.0),
        "similar: author alone": replace(alone, author=1.0),
        "similar: most read books alone": replace(alone, popular=1.0),
    }
    chosen = list(ablations.values())
    val_lists = similar_lists(index, val.queries, chosen)
    test_lists = similar_lists(index, test.queries, chosen)
    for (name, setting), v, t in zip(ablations.items(), val_lists, test_lists, strict=True):
        results[name] = _row(val.recall(v), test.recall(t), asdict(setting))
    timings["similar"] = time.perf_counter() - start
    fusion_rows = [
        {"params": asdict(s), f"val_recall@{K}": round(r, 5)} for s, r in zip(grid, val_recalls, strict=True)
    ]

    n_items = train.shape[1]
    popular = MostPopular().fit(train)
    results["most read books"] = _row(
        val.recall(item_item_lists(popular, val.queries, n_items)),
        test.recall(item_item_lists(popular, test.queries, n_items)),
        {},
    )
    tuned: dict[str, Any] = {}
    for method in BASELINES:
        start = time.perf_counter()
        params = settings(method, tuning)
        best_recall, best_model, best_params, rows = -1.0, None, None, []
        for setting, model in zip(params, fitted(method, train, params, seed, 0), strict=True):
            recall = val.recall(item_item_lists(model, val.queries, n_items))
            rows.append({"params": setting, "name": model.name, f"val_recall@{K}": round(recall, 5)})
            log.info("%s: validation similar-books recall@%d %.4f", model.name, K, recall)
            if recall > best_recall:  # the earlier setting on a tie, as the top-K tuning does
                best_recall, best_model, best_params = recall, model, setting
            del model
        assert best_model is not None
        name = f"{method} item-item ({best_model.name})"
        results[name] = _row(best_recall, test.recall(item_item_lists(best_model, test.queries, n_items)), best_params)
        tuned[method] = {"params": best_params, "grid": rows}
        timings[method] = time.perf_counter() - start
    return {
        "pairs": {"val": len(val), "test": len(test)},
        "results": results,
        "fusion_grid": fusion_rows,
        "baseline_tuning": tuned,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def _row(val_recall: float, test_recall: float, params: dict[str, Any]) -> dict[str, Any]:
    return {f"val_recall@{K}": round(val_recall, 5), f"test_recall@{K}": round(test_recall, 5), "params": params}


def similar_markdown(report: dict[str, Any]) -> str:
    """The protocol's table: one row per method, validation and test recall@10."""
    lines = [f"| method | val recall@{K} | test recall@{K} |", "|---|---|---|"]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row[f'val_recall@{K}']:.4f} | {row[f'test_recall@{K}']:.4f} |")
    return "\n".join(lines)
