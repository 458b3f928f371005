"""The run's evaluation on one split: the rating table (baselines and every compression step of the
rating MLP) and the top-K tables (the recommender against popularity and item-kNN, RP3beta,
ALS and EASE tuned on validation; among the cold books, against same author first and random)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from model import layout
from model.artifacts import ModelFolder
from train.config import Config
from train.evaluation.rating_baselines import SVD_GRID, BiasBaseline, GlobalMean, SurpriseSVD, tune
from train.evaluation.topk import evaluate_top_k, plot_top_k, topk_markdown
from train.metrics import mae, ndcg_at_k, rmse
from train.rating.dataset import TrainingData
from train.rating.fit import predict
from train.run_context import RunContext
from train.run_folder import machine

log = logging.getLogger("bookrec.evaluate")

TEST_SPLITS = ("test", "cold_book", "cold_user")
COLUMNS = [
    ("test", "rmse", "warm RMSE"),
    ("test", "mae", "warm MAE"),
    ("test", "ndcg", "warm NDCG@{k}"),
    ("cold_book", "rmse", "cold-book RMSE"),
    ("cold_book", "mae", "cold-book MAE"),
    ("cold_user", "rmse", "cold-user RMSE"),
    ("cold_user", "mae", "cold-user MAE"),
]


def score_split(data: TrainingData, split: str, pred: np.ndarray, k: int) -> dict:
    rows = data.splits[split]
    y = rows.rating.numpy()
    out = {"rmse": rmse(y, pred), "mae": mae(y, pred), "n": len(y)}
    if split == "test":
        out["ndcg"] = ndcg_at_k(rows.user_id, y, pred, k=k)
    return out


def scored_splits(data: TrainingData) -> list[str]:
    """The test splits with ratings (a run with ``split.hold_out_cold_books`` has no cold-book one)."""
    return [s for s in TEST_SPLITS if len(data.splits[s])]


def _triple(data: TrainingData, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = data.splits[split]
    return rows.user_id, rows.isbn.astype(object), rows.rating.numpy()


def evaluate_baselines(data: TrainingData, cfg: Config) -> dict[str, dict]:
    """Global mean, user+item bias and Surprise SVD (grid-tuned on validation), fit on train."""
    train, val = _triple(data, "train"), _triple(data, "val")
    grid = cfg.eval.svd_grid or SVD_GRID
    params, val_rmse = tune(lambda p: SurpriseSVD(**p, random_state=cfg.split.seed), grid, train, val)
    log.info("Surprise SVD tuned on validation: %s (val RMSE %.4f)", params, val_rmse)
    models = {
        "global mean": GlobalMean(),
        "user+item bias": BiasBaseline(),
        f"Surprise SVD ({', '.join(f'{k}={v}' for k, v in params.items())})": SurpriseSVD(
            **params, random_state=cfg.split.seed
        ),
    }
    out = {}
    for name, model in models.items():
        model.fit(*train)
        out[name] = {
            s: score_split(data, s, model.predict(*_triple(data, s)[:2]), cfg.eval.ndcg_k) for s in scored_splits(data)
        }
    return out


# Each rating-model variant's row in the table.
VARIANT_NAMES = {
    "fp32": "MLP fp32",
    "pruned": "MLP pruned",
    "int8": "MLP pruned+int8",
    "scripted": "MLP TorchScript (shipped)",
}


def load_variants(folder: ModelFolder) -> dict[str, torch.nn.Module]:
    """Every rating-model variant the run wrote, by its name in the table."""
    return {VARIANT_NAMES[v]: model for v, model in folder.rating_models().items()}


def markdown_table(results: dict[str, dict], k: int) -> str:
    header = ["model"] + [label.format(k=k) for _, _, label in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, splits in results.items():
        cells = [f"{splits[s][m]:.4f}" if s in splits else "n/a" for s, m, _ in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: RMSE of every model on the warm, cold-book and cold-user tests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    splits = [s for s in TEST_SPLITS if all(s in results[n] for n in names)]
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        values = [results[n][split]["rmse"] for n in names]
        ax.bar(
            [x + i * width for x in range(len(names))],
            values,
            width,
            label={"test": "warm test"}.get(split, split.replace("_", "-")),
        )
    low = min(results[n][s]["rmse"] for n in names for s in splits)
    ax.set_ylim(low - 0.1, None)
    ax.set_xticks([x + width for x in range(len(names))], [n.split(" (")[0] for n in names], rotation=25, ha="right")
    ax.set_ylabel("RMSE (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def data_line(run_dir: Path) -> str:
    """What the run was trained and measured on, from the data step's records: the CSV folder, or
    the generated sample where it stood in for Book-Crossing."""
    source = json.loads((run_dir / layout.FINGERPRINT_FILE).read_text())["source"]
    report = json.loads((run_dir / layout.DATA_DIR / layout.INGEST_REPORT).read_text())
    if report.get("generated_sample"):
        return f"Data: the generated Book-Crossing sample ({source}), standing in for the unreachable real data."
    return f"Data: {source}."


def step_evaluate(run: RunContext, progress: bool = True) -> dict:
    """Print and write ``evaluation.json`` / ``evaluation.md`` for the run."""
    cfg, run_dir = run.cfg, run.dir
    start = time.perf_counter()
    loaded = run.folder.load()
    catalog, ratings, data = loaded.catalog, run.ratings(), run.training_data()
    results = evaluate_baselines(data, cfg)
    for name, model in load_variants(run.folder).items():
        results[name] = {
            s: score_split(
                data,
                s,
                predict(model, data.user_table, data.book_table, data.splits[s]),
                cfg.eval.ndcg_k,
            )
            for s in scored_splits(data)
        }
    features = run.report(layout.FEATURES_REPORT)
    meta = {
        "data": data_line(run_dir),
        "encoder": features["encoder"],
        "pooling": features["pooling"],
        "machine": machine(),
        "split_sizes": {s: len(data.splits[s]) for s in ("train", "val", *TEST_SPLITS)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    table = markdown_table(results, cfg.eval.ndcg_k)
    topk = evaluate_top_k(loaded.recommender, catalog, ratings, cfg.eval, cfg.split.seed, progress)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    meta["catalog"] = {"books": len(catalog.books), "users": len(catalog.users)}
    payload = {"meta": meta, "results": results, "topk": topk}
    (run_dir / layout.EVALUATION_REPORT).write_text(json.dumps(payload, indent=2) + "\n")
    md = (
        f"{meta['data']}\n\n"
        f"Encoder: {meta['encoder']} ({meta['pooling']} pooling). Machine: {meta['machine']}.\n\n"
        f"Rating prediction (RMSE / MAE, lower is better):\n\n{table}\n\n"
        f"Top-K recommendation ({len(catalog.books)} books in the catalog):\n\n{topk_markdown(topk)}\n"
    )
    (run_dir / layout.EVALUATION_TABLE).write_text(md)
    plot_results(results, run_dir / "evaluation.png")
    plot_top_k(topk, run_dir / "topk.png")
    print(md)
    return {"table": layout.EVALUATION_TABLE, **meta}
