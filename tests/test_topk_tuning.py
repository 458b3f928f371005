"""Grid tuning of the top-K baselines on validation (train.evaluation.tuning), on a hand-made matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.candidates import interaction_matrix
from train.config import ConfigError, TopKTuning, load_config
from train.evaluation.protocols import RankingTask
from train.evaluation.tuning import Validation, settings, tune

N_ITEMS = 40
H, T, X = 20, 30, 31  # history book, the book the validation reader goes on to read, T's usual companion


def co_reads() -> tuple:
    """Ten readers read T with X, one reads H with T, and the validation reader has read H.

    For target T, X is by far the most similar item (cosine 0.95 against H's 0.21), so item-kNN
    keeping one neighbour per item drops H -> T and cannot find T from H; keeping 50 finds it first."""
    users = [u for u in range(10) for _ in (0, 1)] + [10, 10, 11]
    items = [T, X] * 10 + [H, T, H]
    train = interaction_matrix(users, items, 12, N_ITEMS)
    one = np.array([T])
    task = RankingTask("val", np.array([11]), torch.zeros(1, 1), [np.array([H])], [np.array([H])], [one], [one])
    return train, task


def test_the_grid_picks_the_setting_best_on_validation() -> None:
    train, task = co_reads()
    grid = TopKTuning(knn_neighbours=[1, 50], knn_shrink=[0.0])
    chosen = tune("item-kNN", train, Validation(task, train), grid, seed=0, ease_max_items=100)
    assert chosen.params == {"neighbours": 50, "shrink": 0.0} and chosen.val_recall == 1.0
    assert [row["val_recall@10"] for row in chosen.grid] == [0.0, 1.0]  # the first setting lost
    assert chosen.model.neighbours == 50 and chosen.report()["name"] == chosen.model.name
    # A tie keeps the earlier setting: the grid's order states its preference.
    tied = tune(
        "item-kNN",
        train,
        Validation(task, train),
        TopKTuning(knn_neighbours=[50, 100], knn_shrink=[0.0]),
        seed=0,
        ease_max_items=100,
    )
    assert tied.params["neighbours"] == 50


def test_validation_readers_without_history_get_the_popular_list() -> None:
    train, _ = co_reads()
    one = np.array([X])
    empty = np.zeros(0, np.int64)
    task = RankingTask("val", np.array([11]), torch.zeros(1, 1), [empty], [empty], [one], [one])
    chosen = tune("EASE", train, Validation(task, train), TopKTuning(ease_lambda=[1.0, 10.0]), 0, 100)
    assert chosen.val_recall == 1.0  # X and T are the two most read books: in the top-10 of everyone


def test_grids_are_products_of_the_config_lists_and_checked_at_load() -> None:
    grid = TopKTuning(rp3_alpha=[0.5, 1.0], rp3_beta=[0.0, 0.3, 0.5], rp3_neighbours=[100])
    assert len(settings("RP3β", grid)) == 6 and settings("RP3β", grid)[0] == {
        "alpha": 0.5,
        "beta": 0.0,
        "neighbours": 100,
    }
    assert settings("EASE", TopKTuning(ease_lambda=[100.0]))[0] == {"lam": 100.0}
    with pytest.raises(ValueError, match="unknown top-K baseline"):
        settings("SVD", grid)
    cfg = load_config(None, ["eval.topk_tuning.ease_lambda=[50, 100]"])
    assert cfg.eval.topk_tuning.ease_lambda == [50.0, 100.0]
    with pytest.raises(ConfigError, match=r"eval\.topk_tuning\.knn_neighbours"):
        load_config(None, ["eval.topk_tuning.knn_neighbours=[]"])
    with pytest.raises(ConfigError, match=r"eval\.topk_tuning\.rp3_beta"):
        load_config(None, ["eval.topk_tuning.rp3_beta=[-1]"])
