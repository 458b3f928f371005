"""Prune, quantize and script the trained MLP, measuring what each step costs.

- prune: structured L2 pruning of hidden units (``torch.nn.utils.prune``), made permanent, then
  the layers are physically shrunk and briefly fine-tuned to recover;
- quantize: weight-only int8 in plain tensor ops (``Int8Linear``), which runs on CPU and CUDA;
- script: ``torch.jit.script`` of the chosen variant; the file loads with ``torch.jit.load`` alone.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from model import layout
from model.checkpoint import load_scripted, save_checkpoint
from model.network import RatingMLP, quantize_int8
from train.metrics import mae, rmse
from train.rating.dataset import TrainingData
from train.rating.fit import fit, plot_learning_curve, predict
from train.run_context import RunContext

log = logging.getLogger("bookrec.compress")

REPORT_SPLITS = ("val", "test", "cold_book", "cold_user")


def shrink_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A smaller copy of ``layer`` keeping output ``rows`` and input ``cols``."""
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach()[rows] if rows is not None else layer.bias.detach())
    return out


def prune_structured(model: RatingMLP, amount: float) -> RatingMLP:
    """Remove ``amount`` of the hidden units of every hidden layer (lowest L2 norm first).

    Masks come from ``torch.nn.utils.prune``; after ``prune.remove`` makes them permanent the zeroed
    units are cut out of their layer and out of the next layer's inputs.
    """
    model = copy.deepcopy(model).cpu().eval()
    if amount <= 0:
        return model
    # First hidden layer: its units live in both halves, so both get the user half's mask.
    prune.ln_structured(model.user_in, "weight", amount=amount, n=2, dim=0)
    unit_mask = model.user_in.weight_mask[:, 0].clone()
    prune.custom_from_mask(model.book_in, "weight", mask=unit_mask[:, None].expand_as(model.book_in.weight))
    prune.custom_from_mask(model.user_in, "bias", mask=unit_mask)
    for module, name in (
        (model.user_in, "weight"),
        (model.user_in, "bias"),
        (model.book_in, "weight"),
    ):
        prune.remove(module, name)
    keep = unit_mask.nonzero().squeeze(1)
    model.user_in = shrink_linear(model.user_in, rows=keep)
    model.book_in = shrink_linear(model.book_in, rows=keep)

    prune_units(model.tail, amount, keep)
    return model


def prune_units(layers: nn.Sequential, amount: float, keep: torch.Tensor | None = None) -> None:
    """In place: remove ``amount`` of the units of every linear layer of ``layers`` but the last
    (lowest L2 norm first, ``torch.nn.utils.prune``), cutting them out of the next layer's inputs.
    ``keep``: the input units the first layer keeps (None: all)."""
    linear_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    for position, index in enumerate(linear_at):
        layer = shrink_linear(layers[index], cols=keep)
        if position < len(linear_at) - 1:  # the output layer keeps its single unit
            prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
            keep = layer.weight_mask[:, 0].nonzero().squeeze(1)
            prune.remove(layer, "weight")
            layer = shrink_linear(layer, rows=keep)
        layers[index] = layer


def time_in_turns(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds of ``repeats`` runs of each call, the calls taking turns run by run so that load from
    other processes hits all of them alike; the first ``warmup`` rounds (TorchScript profiles its
    first runs) are not kept."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + warmup):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def script_model(model: nn.Module, path: Path) -> torch.jit.ScriptModule:
    """TorchScript-compile ``model`` (eval mode) to ``path`` and return the reloaded module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(copy.deepcopy(model).cpu().eval()).save(str(path))
    return load_scripted(path)


def accuracy(model: nn.Module, data: TrainingData) -> dict:
    """RMSE and MAE of ``model`` on every evaluation split."""
    out: dict = {}
    for split in REPORT_SPLITS:
        rows = data.splits[split]
        if len(rows) == 0:
            continue
        pred, true = predict(model, data.user_table, data.book_table, rows), rows.rating.numpy()
        out[split] = {"rmse": rmse(true, pred), "mae": mae(true, pred)}
    return out


def latencies(models: dict[str, nn.Module], data: TrainingData, batch: int, repeats: int) -> dict[str, dict]:
    """CPU latency of one ``batch``-pair forward per model, p50/p95 and p50 ratio to the first model.

    The models take turns call by call, so load from other processes hits all of them alike.
    """
    users = data.user_table[torch.arange(batch) % data.user_table.shape[0]]
    books = data.book_table[torch.arange(batch) % data.book_table.shape[0]]
    with torch.inference_mode():
        times = time_in_turns({name: partial(model, users, books) for name, model in models.items()}, repeats)
    base = float(np.median(times[next(iter(models))]))
    return {
        name: {
            "batch": batch,
            "p50": 1e3 * float(np.median(t)),
            "p95": 1e3 * float(np.percentile(t, 95)),
            "p50_vs_fp32": float(np.median(t)) / base,
        }
        for name, t in times.items()
    }


def step_compress(run: RunContext, progress: bool = True) -> dict:
    """Write pruned, int8 and scripted artifacts and ``compression.json`` with their costs."""
    cfg, run_dir = run.cfg, run.dir
    data = run.training_data()
    files = layout.MODEL_FILES
    fp32 = run.folder.load_rating_model("fp32")

    pruned = prune_structured(fp32, cfg.compress.prune_amount)
    if cfg.compress.finetune_epochs > 0 and cfg.compress.prune_amount > 0:
        tune_cfg = cfg.train.replace(lr=cfg.train.lr / 4)
        result = fit(
            pruned,
            data,
            tune_cfg,
            run_dir / layout.METRICS_LOG,
            epochs=cfg.compress.finetune_epochs,
            progress=progress,
            stage="prune-finetune",
        )
        epochs = [json.loads(line) for line in (run_dir / layout.METRICS_LOG).read_text().splitlines()]
        plot_learning_curve(epochs, run_dir / layout.LEARNING_CURVE)
        log.info("pruned model fine-tuned: val RMSE %.4f", result.best_val_rmse)
    save_checkpoint(pruned, run_dir / files["pruned"])
    quantized = quantize_int8(pruned)
    save_checkpoint(quantized, run_dir / files["int8"])

    variants: dict[str, nn.Module] = {"fp32": fp32, "pruned": pruned, "int8": quantized}
    report: dict = {"variants": {}}
    for name, model in variants.items():
        report["variants"][name] = {
            **accuracy(model, data),
            "file": files[name],
            "bytes": (run_dir / files[name]).stat().st_size,
            "shapes": model.shapes(),
        }
    # Ship the smallest variant within the accuracy budget, scripted.
    base = report["variants"]["fp32"]["val"]["rmse"]
    choice = next(
        name
        for name in ("int8", "pruned", "fp32")
        if report["variants"][name]["val"]["rmse"] - base <= cfg.compress.max_rmse_loss
    )
    scripted = script_model(variants[choice], run_dir / files["scripted"])
    variants["scripted"] = scripted
    report["variants"]["scripted"] = {
        **accuracy(scripted, data),
        "file": files["scripted"],
        "bytes": (run_dir / files["scripted"]).stat().st_size,
        "scripted_from": choice,
    }
    timing = latencies(variants, data, cfg.compress.latency_batch, cfg.compress.latency_repeats)
    for name, entry in timing.items():
        report["variants"][name]["latency_ms"] = entry
    # Later steps score with these: each is what its file reads back as (eval mode, on the CPU).
    for name, model in variants.items():
        run.keep(f"rating:{name}", model.eval())
    report["shipped"] = {
        "file": files["scripted"],
        "from": choice,
        "val_rmse_loss_vs_fp32": report["variants"]["scripted"]["val"]["rmse"] - base,
    }
    (run_dir / layout.COMPRESSION_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "compression: shipped %s (%s), val RMSE loss %.4f",
        files["scripted"],
        choice,
        report["shipped"]["val_rmse_loss_vs_fp32"],
    )
    return report["shipped"]
