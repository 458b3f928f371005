"""Top-K evaluation: the lists a reader would see, for the model and the baselines, on the protocols
of ``train.evaluation.protocols`` (warm, cold-user, cold-book).

Baselines (popularity, item-kNN, ALS, EASE) are fitted on the same training interactions as the
retrieval model and fold in the same history, so every row of a table answers the same question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from model.catalog import Catalog
from model.recommend import TwoStageRecommender
from train.evaluation.metrics import recall_at_k, topk_report
from train.evaluation.protocols import (
    RankingTask,
    clean,
    cold_book_task,
    cold_user_task,
    sample_task,
    warm_task,
)
from train.evaluation.topk_baselines import (
    ALS,
    EASE,
    BaselineSkipped,
    ItemKNN,
    MostPopular,
    interaction_matrix,
    recommend_top_k,
)

log = logging.getLogger("bookrec.topk")

DEPTH = 100  # longest list evaluated (recall@100)
USER_BLOCK = 1024


def model_top_k(
    recommender: TwoStageRecommender, task: RankingTask, k: int = DEPTH, progress: bool = False
) -> np.ndarray:
    """[U, k] book-set positions from the two-stage path (the one serving and batch use)."""
    out = np.full((len(task), k), -1, np.int64)
    for s in tqdm(range(0, len(task), USER_BLOCK), desc=f"top-{k} {task.name}", leave=False, disable=not progress):
        sl = slice(s, s + USER_BLOCK)
        recs = recommender.recommend(task.feats[sl], task.history[sl], k, task.exclude[sl])
        out[s : s + recs.rows.shape[0], : recs.rows.shape[1]] = recs.rows.cpu().numpy()
    return out


def rating_only_top_k(recommender: TwoStageRecommender, task: RankingTask, k: int = DEPTH) -> np.ndarray:
    """[U, k] by predicted rating alone over the whole book set (how ``recommend`` ranked before)."""
    out = np.full((len(task), k), -1, np.int64)
    for s in range(0, len(task), USER_BLOCK):
        sl = slice(s, s + USER_BLOCK)
        _, rows = recommender.scorer.top_k(task.feats[sl], k, task.exclude[sl])
        out[s : s + rows.shape[0], : rows.shape[1]] = rows.numpy()
    return out


def _csr(lists: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    users = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
    flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    return interaction_matrix(users, flat, len(lists), n_items)


def baselines(cfg_ease_max_items: int, seed: int) -> list:
    return [
        MostPopular(),
        ItemKNN(),
        ALS(seed=seed),
        EASE(max_items=cfg_ease_max_items),
    ]


def evaluate_top_k(
    recommender: TwoStageRecommender,
    catalog: Catalog,
    ratings: pd.DataFrame,
    reveal: int,
    seed: int,
    ease_max_items: int,
    cache_dir: Path | None = None,
    progress: bool = True,
    rating_only_max_pairs: int = 1_000_000_000,
) -> dict:
    """Every protocol's table: ``{"warm": {model: report}, "cold-user": ..., "cold-book": ...}``.

    The baselines depend on the split alone, not on the model, so with ``cache_dir`` their reports
    are kept under a hash of the training interactions and the protocols' users, and a rerun on the
    same split (a new model, another seed of the towers) does not refit them."""
    n_items = len(catalog.books)
    bounds = catalog.rated_bounds
    train = interaction_matrix(np.repeat(np.arange(len(bounds) - 1), np.diff(bounds)), catalog.rated_books,
                               len(bounds) - 1, n_items)  # fmt: skip
    popularity = np.asarray(train.sum(axis=0)).ravel()
    warm = warm_task(catalog, ratings, "test")
    cold_user = cold_user_task(catalog, ratings, reveal, seed)
    results: dict[str, dict] = {"warm": {}, "cold-user": {}, "cold-book": {}}
    timings: dict[str, float] = {}

    def report(task: RankingTask, top: np.ndarray) -> dict:
        return topk_report(top, clean(task.relevant), clean(task.liked), popularity, n_items)

    start = time.perf_counter()
    for task in (warm, cold_user):
        results[task.name][MODEL_NAME] = report(task, model_top_k(recommender, task, progress=progress))
    timings[MODEL_NAME] = time.perf_counter() - start
    start = time.perf_counter()
    sampled = sample_task(warm, max(1, rating_only_max_pairs // max(n_items, 1)), seed)
    results["warm"][RATING_ONLY_NAME] = report(sampled, rating_only_top_k(recommender, sampled))
    if len(sampled) < len(warm):
        results["warm"][RATING_ONLY_NAME]["note"] = (
            f"a seeded sample of {len(sampled):,} of the {len(warm):,} warm users: it scores every book "
            f"for every user, capped at eval.rating_only_max_pairs = {rating_only_max_pairs:,} pairs"
        )
    timings[RATING_ONLY_NAME] = time.perf_counter() - start

    cached = BaselineCache(cache_dir, train, (warm, cold_user), ease_max_items, seed)
    for name, (reports, seconds) in cached.results(progress).items():
        for protocol, rep in reports.items():
            results[protocol][name] = rep
        timings[name] = seconds
        if "recall@10" in reports["warm"]:
            log.info("%s: warm recall@10 %.4f", name, reports["warm"]["recall@10"])

    results["cold-book"] = cold_book_results(recommender, catalog, ratings)
    return {"results": results, "seconds": {k: round(v, 1) for k, v in timings.items()}}


class BaselineCache:
    """Top-K baseline reports for one split and protocol set, computed once and kept on disk."""

    def __init__(
        self,
        folder: Path | None,
        train: sp.csr_matrix,
        tasks: tuple[RankingTask, ...],
        ease_max_items: int,
        seed: int,
    ):
        self.folder, self.train, self.tasks = folder, train, tasks
        self.models = baselines(ease_max_items, seed)
        digest = hashlib.sha256()
        for array in (train.indptr, train.indices):
            digest.update(np.ascontiguousarray(array, np.int64).tobytes())
        for task in tasks:
            digest.update(task.name.encode())
            for lists in (task.history, task.exclude, task.relevant, task.liked):
                for x in lists:
                    digest.update(np.ascontiguousarray(x, np.int64).tobytes() + b"|")
        digest.update(json.dumps([m.name for m in self.models] + ["popularity fallback"]).encode())
        self.key = digest.hexdigest()[:24]

    def results(self, progress: bool) -> dict[str, tuple[dict, float]]:
        """``{baseline name: ({protocol: report}, seconds)}``, from the cache when it has them."""
        path = self.folder / f"{self.key}.json" if self.folder else None
        if path is not None and path.is_file():
            log.info("top-K baselines from the cache %s (same split and protocols)", path)
            return {name: (rep, sec) for name, (rep, sec) in json.loads(path.read_text()).items()}
        out = {}
        n_items = self.train.shape[1]
        popularity = np.asarray(self.train.sum(axis=0)).ravel()
        # Each protocol's history and exclusion matrices, built once for every baseline.
        inputs = {task.name: (_csr(task.history, n_items), _csr(task.exclude, n_items)) for task in self.tasks}
        popular = MostPopular().fit(self.train)
        fallback = {name: recommend_top_k(popular, *matrices, DEPTH) for name, matrices in inputs.items()}
        for model in tqdm(self.models, desc="top-K baselines", leave=False, disable=not progress):
            start = time.perf_counter()
            try:
                model.fit(self.train)
            except BaselineSkipped as err:
                log.warning("%s skipped: %s", model.name, err)
                out[model.name] = ({task.name: {"skipped": str(err)} for task in self.tasks}, 0.0)
                continue
            reports = {}
            for task in self.tasks:
                top = recommend_top_k(model, *inputs[task.name], DEPTH)
                # A reader with no history gets nothing from item-item or factor models (every score
                # is 0); like any deployed recommender, they fall back to the most popular books.
                empty = np.array([len(h) == 0 for h in task.history], bool)
                top[empty] = fallback[task.name][empty]
                reports[task.name] = topk_report(top, clean(task.relevant), clean(task.liked), popularity, n_items)
            out[model.name] = (reports, round(time.perf_counter() - start, 1))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1) + "\n")
        return out


MODEL_NAME = "two-stage (retrieval + rating rerank)"
RATING_ONLY_NAME = "rating MLP alone"


def cold_book_results(recommender: TwoStageRecommender, catalog: Catalog, ratings: pd.DataFrame) -> dict:
    """recall@10 among the cold books, for the two-stage path restricted to them and for random."""
    task, candidates = cold_book_task(catalog, ratings)
    if len(task) == 0 or len(candidates) == 0:
        return {}
    sub = recommender.subset(candidates)
    top = model_top_k(sub, task, k=10)
    relevant = clean(task.relevant)
    return {
        MODEL_NAME: {
            "recall@10": recall_at_k(top, relevant, 10),
            "users": len(task),
            "cold_books": len(candidates),
        },
        "random": {"recall@10": min(10, len(candidates)) / len(candidates), "users": len(task)},
    }


def choose_blend(
    recommender: TwoStageRecommender, task: RankingTask, grid: list[float], k: int = 10, min_gain: float = 0.0
) -> tuple[float, dict]:
    """The rerank weight of the predicted rating with the best recall@k on ``task`` (validation);
    candidates are retrieved once and reordered for every weight. Ties go to the smaller weight, and
    a non-zero weight must beat weight 0 by more than ``min_gain`` (a non-zero weight makes every
    request rate all its candidates instead of the k it returns)."""
    found: dict[float, list[np.ndarray]] = {blend: [] for blend in grid}
    for s in range(0, len(task), USER_BLOCK):
        sl = slice(s, s + USER_BLOCK)
        cands = recommender.candidates(task.feats[sl], task.history[sl], task.exclude[sl])
        for blend in grid:
            found[blend].append(recommender.rerank(cands, k, blend).rows.cpu().numpy())
    relevant = clean(task.relevant)
    table = {blend: recall_at_k(np.concatenate(tops), relevant, k) for blend, tops in found.items()}
    best = max(sorted(table), key=lambda b: (table[b], -b))
    if 0.0 in table and table[best] - table[0.0] <= min_gain:
        best = 0.0
    return best, {f"{b:g}": round(v, 5) for b, v in table.items()}


TABLE_COLUMNS = [
    ("recall@10", "recall@10"),
    ("recall@100", "recall@100"),
    ("ndcg@10", "NDCG@10"),
    ("liked_recall@10", "liked recall@10"),
    ("liked_ndcg@10", "liked NDCG@10"),
    ("coverage@10", "coverage@10"),
    ("top1_share", "top-1 share"),
    ("mean_popularity@10", "mean popularity@10"),
]


def topk_markdown(topk: dict) -> str:
    """The warm and cold-user tables (one row per model) and the cold-book comparison, in Markdown."""
    parts = []
    for protocol in ("warm", "cold-user"):
        rows = topk["results"][protocol]
        header = ["model", *(label for _, label in TABLE_COLUMNS), "users"]
        lines = [f"**{protocol}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, rep in rows.items():
            if "skipped" in rep:
                lines.append(f"| {name} | skipped: {rep['skipped']} |" + " |" * (len(header) - 2))
                continue
            cells = [
                f"{rep[key]:.4f}" if key != "mean_popularity@10" else f"{rep[key]:.1f}" for key, _ in TABLE_COLUMNS
            ]
            lines.append("| " + " | ".join([name, *cells, str(rep["users"])]) + " |")
        notes = [f"{name}: {rep['note']}." for name, rep in rows.items() if "note" in rep]
        parts.append("\n".join(lines + (["", *notes] if notes else [])))
    cold = topk["results"].get("cold-book") or {}
    if cold:
        model, rand = cold[MODEL_NAME], cold["random"]
        parts.append(
            f"**cold-book**: {model['users']} users rank the {model['cold_books']} cold books: recall@10 "
            f"{model['recall@10']:.4f} against {rand['recall@10']:.4f} for a random order "
            f"({model['recall@10'] / rand['recall@10']:.1f}x)."
        )
    return "\n\n".join(parts)


def plot_top_k(topk: dict, path) -> None:
    """Warm recall@10 and NDCG@10 (left) and coverage@10 (right) of every model, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: rep for name, rep in topk["results"]["warm"].items() if "skipped" not in rep}
    names = [n.split(" (")[0] for n in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for i, (key, label) in enumerate([("recall@10", "recall@10"), ("ndcg@10", "NDCG@10")]):
        left.bar([x + i * 0.4 for x in range(len(rows))], [rep[key] for rep in rows.values()], 0.4, label=label)
    left.set_xticks([x + 0.2 for x in range(len(rows))], names, rotation=20, ha="right")
    left.set_ylabel("warm test (higher is better)")
    left.legend()
    right.bar(range(len(rows)), [rep["coverage@10"] for rep in rows.values()], 0.6, color="tab:green")
    right.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    right.set_ylabel("catalog coverage of the top-10 lists")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
