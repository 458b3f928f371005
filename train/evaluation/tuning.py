"""Top-K baselines tuned on validation: each method's grid (``eval.topk_tuning``) is fitted on the
training interactions only and read on the validation protocol (warm users' validation books),
never on test; the setting with the best validation recall@10 is the one the test tables report.

The grids are full products of the config's lists. EASE's lambdas share one Gram matrix, so each
costs only its dense inverse; item-kNN's settings of one shrink share the similarity and RP3β's of
one (alpha, beta) the walk, so a neighbour count is only a mask; ALS refits per setting.
Validation users with no training history get the most-popular list under every setting, so only
the others are scored per setting (their fallback lists are computed once).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from model.candidates import history_matrix
from train.config import TopKTuning
from train.evaluation.protocols import RankingTask, clean
from train.evaluation.topk_baselines import (
    ALS,
    EASE,
    ItemKNN,
    MostPopular,
    RP3beta,
    TopKBaseline,
    recommend_top_k,
)
from train.metrics import recall_at_k

log = logging.getLogger("bookrec.tuning")

K = 10  # the tuning metric is recall@K on validation
METHODS = ("item-kNN", "RP3β", "ALS", "EASE")


def settings(method: str, tuning: TopKTuning) -> list[dict[str, Any]]:
    """Every setting of ``method``'s grid, as constructor keywords, in the grid's order."""
    grids = {
        # neighbours last: the settings of one similarity (one walk for RP3β) come together
        "item-kNN": {"shrink": tuning.knn_shrink, "neighbours": tuning.knn_neighbours},
        "RP3β": {"alpha": tuning.rp3_alpha, "beta": tuning.rp3_beta, "neighbours": tuning.rp3_neighbours},
        "ALS": {"factors": tuning.als_factors, "regularization": tuning.als_regularization, "alpha": tuning.als_alpha},
        "EASE": {"lam": tuning.ease_lambda},
    }
    if method not in grids:
        raise ValueError(f"unknown top-K baseline {method!r}; known: {', '.join(METHODS)}")
    names, values = zip(*grids[method].items(), strict=True)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def fitted(
    method: str, train: sp.csr_matrix, grid: list[dict[str, Any]], seed: int, ease_max_items: int
) -> Iterator[TopKBaseline]:
    """The models of ``grid`` fitted on ``train``, one at a time (EASE's from one Gram matrix).
    Raises :class:`BaselineSkipped` where the method cannot run on this data."""
    if method == "EASE":
        yield from EASE.grid(train, [p["lam"] for p in grid], ease_max_items)
    elif method == "item-kNN":
        yield from ItemKNN.grid(train, grid, seed=seed)
    elif method == "RP3β":
        yield from RP3beta.grid(train, grid)
    else:
        for params in grid:
            yield ALS(**params, seed=seed).fit(train)


class Validation:
    """The validation protocol's inputs, built once for every setting of every method."""

    def __init__(self, task: RankingTask, train: sp.csr_matrix):
        n_items = train.shape[1]
        self.task = task
        self.relevant = clean(task.relevant)
        self.active = np.flatnonzero([len(h) > 0 for h in task.history])
        self.history = history_matrix([task.history[i] for i in self.active], n_items)
        self.exclude = history_matrix([task.exclude[i] for i in self.active], n_items)
        idle = np.setdiff1d(np.arange(len(task)), self.active)
        self.fallback = np.full((len(task), K), -1, np.int64)
        if idle.size:
            idle_history = history_matrix([task.history[i] for i in idle], n_items)
            idle_exclude = history_matrix([task.exclude[i] for i in idle], n_items)
            self.fallback[idle] = recommend_top_k(MostPopular().fit(train), idle_history, idle_exclude, K)

    def recall(self, model: TopKBaseline) -> float:
        """Validation recall@K of ``model``, readers without history on the most-popular list."""
        top = self.fallback.copy()
        if self.active.size:
            top[self.active] = recommend_top_k(model, self.history, self.exclude, K)
        return recall_at_k(top, self.relevant, K)


@dataclass
class Tuned:
    """A method's chosen, fitted model and what the grid showed on validation."""

    method: str
    model: TopKBaseline
    params: dict[str, Any]
    val_recall: float
    grid: list[dict[str, Any]] = field(default_factory=list)  # params, name, val recall@K, seconds
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """The JSON-ready record (the model itself left out)."""
        out = asdict(self) | {"name": self.model.name}
        del out["model"]
        return out


def tune(
    method: str, train: sp.csr_matrix, validation: Validation, tuning: TopKTuning, seed: int, ease_max_items: int
) -> Tuned:
    """``method`` fitted on ``train`` for every setting of its grid; the best by validation
    recall@K is kept (the earlier setting on a tie, so a grid's order states its preference)."""
    grid = settings(method, tuning)
    start = time.perf_counter()
    best: Tuned | None = None
    rows = []
    tick = start
    for params, model in zip(grid, fitted(method, train, grid, seed, ease_max_items), strict=True):
        recall = validation.recall(model)
        now = time.perf_counter()
        rows.append(
            {"params": params, "name": model.name, f"val_recall@{K}": round(recall, 5), "seconds": round(now - tick, 1)}
        )
        log.info("%s: validation recall@%d %.4f (%.1f s)", model.name, K, recall, now - tick)
        tick = now
        if best is None or recall > best.val_recall:
            best = Tuned(method, model, params, recall)
        del model  # only the best so far stays alive (EASE's is a dense item x item matrix)
    assert best is not None
    best.grid, best.seconds = rows, round(time.perf_counter() - start, 1)
    return best
