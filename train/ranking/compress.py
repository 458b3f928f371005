"""Prune, quantize and choose the ranker to ship, as ``train/rating/compress.py`` does for the rating MLP.

- prune: structured L2 pruning of the hidden units (``torch.nn.utils.prune``), the layers shrunk,
  then a few recovery epochs on the fit readers (kept only where they help the stop readers);
- quantize: weight-only int8 (``model.network.Int8Linear``), CPU and CUDA, scriptable;
- choose: the smallest variant whose stop-reader recall@10 is within ``max_recall_loss`` of fp32;
- popularity penalty: the smallest of ``popularity_penalties`` that keeps the most common top-1
  book at or under ``max_top1_share`` of the stop readers, at a recall cost within the same budget.

Every choice is made on the stop readers; the report readers stay for the final comparison.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from functools import partial

import numpy as np
import torch
from torch import nn

from model.network import Int8Linear
from model.ranker import RankerMLP
from train.config import RankingConfig
from train.ranking.fit import RankingData, fit_ranker, quality
from train.rating.compress import prune_units, time_in_turns

log = logging.getLogger("bookrec.ranking")

VARIANTS = ("fp32", "pruned", "int8")


def prune_ranker(model: RankerMLP, amount: float) -> RankerMLP:
    """A copy of ``model`` with ``amount`` of every hidden layer's units removed (lowest L2 norm)."""
    model = copy.deepcopy(model).cpu().eval()
    if amount > 0:
        prune_units(model.net, amount)
    return model


def quantize_ranker(model: RankerMLP) -> RankerMLP:
    """A copy of ``model`` with every linear layer's weights in int8."""
    out = copy.deepcopy(model).cpu().eval()
    for i, layer in enumerate(out.net):
        if isinstance(layer, nn.Linear):
            out.net[i] = Int8Linear.from_linear(layer)
    return out


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    """``model`` compiled by TorchScript (eval mode), its deprecation warnings kept quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(copy.deepcopy(model).eval())


def file_bytes(module: torch.jit.ScriptModule) -> int:
    """Size of the TorchScript file ``module`` saves to."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], data: RankingData, blocks: dict[str, int], repeats: int) -> dict:
    """p50 ms of one forward per (scripted) model over ``blocks`` (name -> readers), and the ratio
    to the first model in the same loop (``train.rating.compress.time_in_turns``)."""
    out: dict[str, dict] = {name: {} for name in models}
    for block, users in blocks.items():
        x = data.features[: min(users, len(data))]
        times = time_in_turns({name: partial(model, x) for name, model in models.items()}, repeats)
        base = float(np.median(times[next(iter(models))]))
        for name, t in times.items():
            out[name][block] = {
                "readers": int(x.shape[0]),
                "candidates": int(x.shape[1]),
                "p50_ms": round(1e3 * float(np.median(t)), 4),
                "p50_vs_fp32": round(float(np.median(t)) / base, 3),
            }
    return out


def compress_ranker(
    model: RankerMLP, fit: RankingData, stop: RankingData, cfg: RankingConfig
) -> tuple[RankerMLP, dict]:
    """(the ranker to ship, a report of every variant and of the penalty grid)."""
    pruned = prune_ranker(model, cfg.prune_amount)
    if cfg.prune_amount > 0 and cfg.finetune_epochs > 0:
        pruned, _ = fit_ranker(fit, stop, cfg, start=pruned, epochs=cfg.finetune_epochs, lr=cfg.lr / 4)
    variants = {"fp32": model, "pruned": pruned, "int8": quantize_ranker(pruned)}
    compiled = {name: scripted(variant) for name, variant in variants.items()}
    report: dict = {"variants": {}}
    for name, variant in variants.items():
        with torch.no_grad():
            report["variants"][name] = {
                **quality(stop, variant(stop.features)),
                "shape": variant.shape(),
                "parameters": sum(int(t.numel()) for t in variant.state_dict().values()),
                "bytes": file_bytes(compiled[name]),
            }
    base = report["variants"]["fp32"]["recall@10"]
    choice = next(
        name
        for name in ("int8", "pruned", "fp32")
        if base - report["variants"][name]["recall@10"] <= cfg.max_recall_loss
    )
    timing = latencies(compiled, stop, {"one reader": 1, "512 readers": 512}, cfg.latency_repeats)
    for name, entry in timing.items():
        report["variants"][name]["latency"] = entry
    shipped = copy.deepcopy(variants[choice])
    penalty = choose_penalty(shipped, stop, cfg, report)
    shipped.penalty.fill_(penalty)
    report["shipped"] = {"from": choice, "penalty": penalty}
    log.info("ranker compression: shipped %s, popularity penalty %.3f", choice, penalty)
    return shipped, report


def choose_penalty(model: RankerMLP, stop: RankingData, cfg: RankingConfig, report: dict) -> float:
    """The smallest grid penalty that brings the stop readers' top-1 share within the target at a
    recall@10 cost within ``max_recall_loss``; failing that, the affordable one with the lowest
    share. Fills ``report["penalties"]`` with every one's figures."""
    rows = []
    for penalty in sorted({0.0, *cfg.popularity_penalties}):
        model.penalty.fill_(penalty)
        with torch.no_grad():
            rows.append({"penalty": penalty, **quality(stop, model(stop.features))})
    model.penalty.fill_(0.0)
    report["penalties"] = rows
    affordable = [r for r in rows if rows[0]["recall@10"] - r["recall@10"] <= cfg.max_recall_loss]
    within = [r for r in affordable if r["top1_share"] <= cfg.max_top1_share]
    return float((within[0] if within else min(affordable, key=lambda r: r["top1_share"]))["penalty"])
