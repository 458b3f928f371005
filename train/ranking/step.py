"""The ``ranking`` step: build the item graph, featurise the val readers' merged candidates, fit the
ranker, compare it with the towers' order on held-out val readers, and ship what serving needs.

Writes ``item_graph.npz``, ``ranker_scripted.pt`` (pruned, int8 and penalised as
``train/ranking/compress.py`` chose) and ``ranking_settings.json`` (whether the ranker is enabled,
how many candidates each source adds), which the archive ships, and the report ``ranking.json``
(the compression report and the validation comparison) into the run folder.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp
import torch

from model import layout
from model.candidates import ItemGraph, history_matrix
from model.catalog import Catalog
from model.ranker import RankingSettings
from train.evaluation.protocols import warm_task
from train.ranking.compress import compress_ranker
from train.ranking.fit import collect, fit_ranker, quality, source_recall, towers_scores
from train.ranking.graph import rp3beta_graph
from train.rating.compress import script_model
from train.run_context import RunContext

log = logging.getLogger("bookrec.ranking")

# Feature groups held constant one at a time by ``ranking.ablation``.
ABLATIONS = {
    "predicted rating": ("predicted_rating",),
    "graph scores": ("graph_score", "graph_log_score", "graph_rank", "graph_missing"),
    "author / publisher": ("author_rank", "author_missing", "author_overlap", "publisher_overlap"),
    "towers scores": ("towers_logit", "towers_rank", "towers_missing"),
    "popularity": ("log_popularity",),
    "history length, year": ("log_history", "year", "year_missing"),
}


def training_history(catalog: Catalog) -> sp.csr_matrix:
    """Binary [users, books] of the catalog's training history (rated and implicit reads)."""
    bounds = catalog.rated_bounds
    per_user = [catalog.rated_books[bounds[u] : bounds[u + 1]] for u in range(len(bounds) - 1)]
    return history_matrix(per_user, len(catalog.books))


def split_users(n: int, cfg, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (fit, stop, report) index sets of ``n`` readers."""
    order = np.random.default_rng(seed).permutation(n)
    n_stop, n_report = round(n * cfg.stop_frac), round(n * cfg.report_frac)
    return np.sort(order[n_stop + n_report :]), np.sort(order[:n_stop]), np.sort(order[n_stop : n_stop + n_report])


def step_ranking(run: RunContext, progress: bool = True) -> dict:
    cfg, run_dir = run.cfg, run.dir
    rc = cfg.ranking
    start = time.perf_counter()
    # A stale ranker must not be loaded below.
    for name in (layout.RANKER_FILE, layout.RANKING_SETTINGS, layout.RANKING_REPORT):
        (run_dir / name).unlink(missing_ok=True)
    run.drop("ranking_settings")
    run.keep("ranker", None)
    folder = run.folder
    catalog = run.catalog()
    ratings = run.ratings()
    graph = rp3beta_graph(training_history(catalog), rc.graph_alpha, rc.graph_beta, rc.graph_neighbours)
    graph.save(run_dir / layout.ITEM_GRAPH)
    run.keep("item_graph", ItemGraph.load(run_dir / layout.ITEM_GRAPH))  # as served: float32 weights
    graph_seconds = time.perf_counter() - start
    log.info("item graph: %d books, %d edges (%.0f s)", graph.n_books, graph.weights.nnz, graph_seconds)

    settings = RankingSettings(True, rc.graph_candidates, rc.author_candidates, rc.per_author)
    loaded = folder.load(cfg.train.device if cfg.train.device != "auto" else "cpu")
    recommender = loaded.recommender
    recommender.ranking = folder.ranking_stage(catalog, device=recommender.device, settings=settings)

    task = warm_task(catalog, ratings, "val")
    index = np.arange(len(task))
    if len(index) > rc.max_users:
        index = np.sort(np.random.default_rng(rc.seed).choice(index, rc.max_users, replace=False))
    relevant = [task.relevant[i][task.relevant[i] >= 0] for i in index]
    data = collect(recommender, task.feats[torch.from_numpy(index)], [task.history[i] for i in index], relevant)
    collect_seconds = time.perf_counter() - start - graph_seconds
    fit_idx, stop_idx, report_idx = split_users(len(data), rc, rc.seed)
    fit, stop, report = data.take(fit_idx), data.take(stop_idx), data.take(report_idx)
    fp32, history = fit_ranker(fit, stop, rc)
    model, compression = compress_ranker(fp32, fit, stop, rc)
    with torch.no_grad():
        ranked = quality(report, model(report.features))
        ranked_fp32 = quality(report, fp32(report.features))
    towers = quality(report, towers_scores(report))
    gain = ranked["recall@10"] - towers["recall@10"]
    enabled = rc.enabled and (gain > rc.min_gain or not rc.require_gain)
    run.keep("ranker", script_model(model, run_dir / layout.RANKER_FILE))

    summary = {
        "val_report_users": len(report),
        "val_fit_users": len(fit),
        "val_stop_users": len(stop),
        "towers": towers,
        "ranker": ranked,
        "ranker_fp32_unpenalised": ranked_fp32,
        "compression": compression,
        "recall_by_source": source_recall(report),
        "graph_edges": int(graph.weights.nnz),
        "best_epoch": history["best_epoch"],
    }
    settings = RankingSettings(enabled, rc.graph_candidates, rc.author_candidates, rc.per_author)
    settings.save(run_dir / layout.RANKING_SETTINGS)
    run.keep("ranking_settings", settings)

    def save() -> None:
        summary["seconds"] = {
            "graph": round(graph_seconds, 1),
            "features": round(collect_seconds, 1),
            "total": round(time.perf_counter() - start, 1),
        }
        run.write_report(layout.RANKING_REPORT, {"enabled": enabled, **summary, "epochs": history["epochs"]})

    save()  # before the ablation refits, which take a while
    if rc.ablation:
        summary["ablation"] = {}
        for name, drop in ABLATIONS.items():
            ablated, _ = fit_ranker(fit, stop, rc, drop)
            with torch.no_grad():
                summary["ablation"][f"without {name}"] = quality(report, ablated(report.features))
            log.info("ranking ablation without %s: %s", name, summary["ablation"][f"without {name}"])
        save()
    log.info("ranking: val recall@10 towers %s, ranker %s, enabled %s", towers, ranked, enabled)
    return {"enabled": enabled, **summary}
