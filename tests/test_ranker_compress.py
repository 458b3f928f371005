"""Shipping the ranker: pruning, int8, the popularity penalty and their choice on the stop readers."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from model.network import Int8Linear
from model.ranker import FEATURES, RankerMLP
from train.config import RankingConfig
from train.ranking.compress import choose_penalty, prune_ranker, quantize_ranker
from train.ranking.fit import RankingData, quality

POP = FEATURES.index("log_popularity")


def _ranker(seed: int = 0) -> RankerMLP:
    torch.manual_seed(seed)
    model = RankerMLP(len(FEATURES), [8, 4]).eval()
    model.mean.normal_()
    model.std.uniform_(0.5, 2.0)
    return model


def _script_roundtrip(model: nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_pruning_removes_the_weakest_hidden_units_whole() -> None:
    model = _ranker()
    pruned = prune_ranker(model, 0.25)
    assert pruned.shape() == [len(FEATURES), 6, 3, 1]
    # The same function as the original with the cut units silenced (weights and bias at 0).
    silenced = copy.deepcopy(model)
    layers = silenced.linears()
    with torch.no_grad():
        for layer, nxt in itertools.pairwise(layers):
            norms = layer.weight.norm(dim=1)
            cut = torch.argsort(norms)[: round(0.25 * len(norms))]
            layer.weight[cut] = 0.0
            layer.bias[cut] = 0.0
            nxt.weight[:, cut] = 0.0
    x = torch.randn(3, 7, len(FEATURES))
    torch.testing.assert_close(pruned(x), silenced(x))
    assert prune_ranker(model, 0.0).shape() == model.shape()


def test_int8_ranker_is_close_scripts_and_keeps_its_standardisation() -> None:
    model = _ranker(1)
    q = quantize_ranker(model)
    assert all(isinstance(m, Int8Linear) for m in q.linears())
    assert all(m.weight_q.dtype == torch.int8 for m in q.linears())
    x = torch.randn(4, 9, len(FEATURES))
    torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)
    assert not torch.equal(q(x), model(x))  # it is quantized, not a copy
    torch.testing.assert_close(_script_roundtrip(q)(x), q(x))


def test_the_popularity_penalty_is_taken_off_the_score_and_survives_scripting() -> None:
    model = _ranker(2)
    x = torch.randn(2, 5, len(FEATURES))
    before = model(x)
    model.penalty.fill_(0.3)
    torch.testing.assert_close(model(x), before - 0.3 * x[..., POP])
    torch.testing.assert_close(_script_roundtrip(model)(x), model(x))


def _lists(n_users: int, seed: int) -> RankingData:
    """Readers with the same 12 candidates: book 0, by far the most popular (log popularity 11
    against 1), scores 3.0, each reader's read book 2.5 and the rest under 1."""
    rng = np.random.default_rng(seed)
    m = 12
    rows = np.tile(np.arange(m), (n_users, 1))
    feats = torch.zeros(n_users, m, len(FEATURES))
    feats[..., POP] = 1.0
    feats[:, 0, POP] = 11.0
    read = rng.integers(1, m, n_users)
    feats[..., 0] = torch.from_numpy(rng.random((n_users, m)).astype(np.float32))
    feats[np.arange(n_users), read, 0] = 2.5
    feats[:, 0, 0] = 3.0
    label = rows == read[:, None]
    return RankingData(rows, feats, np.ones((n_users, m, 3), bool), label, [np.array([r]) for r in read])


class _FirstFeature(RankerMLP):
    """A ranker whose net reads the first feature as the score."""

    def __init__(self) -> None:
        super().__init__(len(FEATURES), [1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 0] - self.penalty * x[..., POP]


def test_the_penalty_is_the_smallest_that_meets_the_top1_target_within_the_recall_budget() -> None:
    data = _lists(200, 0)
    model = _FirstFeature()
    assert quality(data, model(data.features))["top1_share"] == 1.0
    cfg = RankingConfig(max_top1_share=0.5, popularity_penalties=[0.5, 0.02, 0.1], max_recall_loss=0.0)
    report: dict = {}
    # 0.02: book 0 at 3.0 - 0.22 still first; 0.1: 3.0 - 1.1 < 2.5 - 0.1, each reader's own book
    # first and book 0 second (recall@10 unchanged); 0.5 would push book 0 to the bottom.
    assert choose_penalty(model, data, cfg, report) == pytest.approx(0.1)
    assert [r["penalty"] for r in report["penalties"]] == [0.0, 0.02, 0.1, 0.5]
    assert report["penalties"][2]["top1_share"] < 0.2
    assert float(model.penalty) == 0.0  # the caller sets what it ships


def test_a_penalty_that_costs_recall_is_not_taken() -> None:
    data = _lists(200, 1)
    data.label[:] = False
    data.label[:, 0] = True  # everyone read book 0: only 0.5 drops it out of the top 10
    data.relevant[:] = [np.array([0])] * len(data)
    model = _FirstFeature()
    cfg = RankingConfig(max_top1_share=0.5, popularity_penalties=[0.02, 0.5], max_recall_loss=0.0)
    report: dict = {}
    assert choose_penalty(model, data, cfg, report) == 0.0
    assert report["penalties"][2]["recall@10"] == 0.0
