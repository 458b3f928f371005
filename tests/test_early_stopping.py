"""EarlyStopping: the best epoch's weights come back, in either direction, after `patience` flat epochs."""

from __future__ import annotations

import torch
from torch import nn

from train.rating.fit import EarlyStopping


def _run(values: list[float], higher_is_better: bool, patience: int = 2) -> tuple[EarlyStopping, nn.Linear, int]:
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(model, patience, higher_is_better=higher_is_better)
    last = 0
    for epoch, value in enumerate(values, start=1):
        model.weight.data.fill_(float(epoch))  # the weights say which epoch they come from
        last = epoch
        if stopper.update(value, epoch):
            break
    stopper.restore()
    return stopper, model, last


def test_lower_is_better_keeps_the_lowest_epoch_and_stops_after_patience() -> None:
    stopper, model, last = _run([3.0, 2.0, 2.5, 2.1, 1.0], higher_is_better=False)
    assert (stopper.best, stopper.best_epoch, last) == (2.0, 2, 4)  # epoch 5 never runs
    assert model.weight.item() == 2.0 and not model.training


def test_higher_is_better_keeps_the_highest_epoch() -> None:
    stopper, model, last = _run([0.1, 0.3, 0.3000001, 0.2, 0.25], higher_is_better=True)
    assert (stopper.best, stopper.best_epoch, last) == (0.3, 2, 4)  # +1e-7 is no improvement
    assert model.weight.item() == 2.0


def test_no_epoch_leaves_the_initial_weights() -> None:
    model = nn.Linear(1, 1, bias=False)
    before = model.weight.detach().clone()
    stopper = EarlyStopping(model, 3)
    model.weight.data.add_(1.0)
    stopper.restore()
    assert stopper.best_epoch == 0 and torch.equal(model.weight, before)
