"""Top-K evaluation: the lists a reader would see, for the model and the baselines, on the protocols
of ``train.evaluation.protocols`` (warm, cold-user, cold-book, new-author).

Baselines (popularity; item-kNN, RP3beta, ALS and EASE each tuned on validation by
``train.evaluation.tuning``) are fitted on the same training interactions as the retrieval model and
fold in the same history, so every row of a table answers the same question. The cold-book
protocols, where no collaborative baseline can score a book, compare the model with a content
baseline (same author first) and a random order.
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

from batch.all_pairs import AllPairsScorer
from model.candidates import history_matrix, interaction_matrix
from model.catalog import Catalog
from model.recommend import Recommender
from model.topk import top_k_excluding
from train.config import EvalConfig, TopKTuning
from train.evaluation.protocols import (
    RankingTask,
    clean,
    cold_book_task,
    cold_user_task,
    sample_task,
    warm_task,
)
from train.evaluation.topk_baselines import (
    SCORE_BUDGET,
    BaselineSkipped,
    MostPopular,
    SameAuthor,
    TopKBaseline,
    recommend_top_k,
)
from train.evaluation.tuning import METHODS, Validation, tune
from train.metrics import recall_at_k, topk_report

log = logging.getLogger("bookrec.topk")

DEPTH = 100  # longest list evaluated (recall@100)
USER_BLOCK = 1024


def model_top_k(recommender: Recommender, task: RankingTask, k: int = DEPTH, progress: bool = False) -> np.ndarray:
    """[U, k] book-set positions from the recommender (the one serving and batch use)."""
    out = np.full((len(task), k), -1, np.int64)
    for s in tqdm(range(0, len(task), USER_BLOCK), desc=f"top-{k} {task.name}", leave=False, disable=not progress):
        sl = slice(s, s + USER_BLOCK)
        recs = recommender.recommend(task.feats[sl], task.history[sl], k, task.exclude[sl])
        out[s : s + recs.rows.shape[0], : recs.rows.shape[1]] = recs.rows.cpu().numpy()
    return out


def rating_only_top_k(recommender: Recommender, task: RankingTask, k: int = DEPTH) -> np.ndarray:
    """[U, k] by predicted rating alone over the whole book set (how ``recommend`` ranked before)."""
    out = np.full((len(task), k), -1, np.int64)
    all_pairs = AllPairsScorer(recommender.scorer)
    for s in range(0, len(task), USER_BLOCK):
        sl = slice(s, s + USER_BLOCK)
        _, rows = all_pairs.top_k(task.feats[sl], k, task.exclude[sl])
        out[s : s + rows.shape[0], : rows.shape[1]] = rows.numpy()
    return out


def evaluate_top_k(
    recommender: Recommender,
    catalog: Catalog,
    ratings: pd.DataFrame,
    settings: EvalConfig,
    seed: int,
    progress: bool = True,
) -> dict:
    """Every protocol's table: ``{"results": {"warm": {model: report}, "cold-user": ..., "cold-book":
    ..., "new-author": ...}, "tuning": {method: choice}, "seconds": {model: s}}``.

    The baselines depend on the split alone, not on the model, so with ``settings.baseline_cache``
    their tuning and reports are kept under a hash of the training interactions, the protocols'
    users and the grids, and a rerun on the same split (a new model, another seed of the towers)
    neither retunes nor refits them."""
    n_items = len(catalog.books)
    train = training_matrix(catalog)
    popularity = np.asarray(train.sum(axis=0)).ravel()
    warm = warm_task(catalog, ratings, "test")
    cold_user = cold_user_task(catalog, ratings, settings.cold_user_reveal, seed)
    results: dict[str, dict] = {"warm": {}, "cold-user": {}, "cold-book": {}, "new-author": {}}
    timings: dict[str, float] = {}

    def report(task: RankingTask, top: np.ndarray) -> dict:
        return topk_report(top, clean(task.relevant), clean(task.liked), popularity, n_items)

    start = time.perf_counter()
    for task in (warm, cold_user):
        results[task.name][MODEL_NAME] = report(task, model_top_k(recommender, task, progress=progress))
    timings[MODEL_NAME] = time.perf_counter() - start
    start = time.perf_counter()
    max_pairs = settings.rating_only_max_pairs
    sampled = sample_task(warm, max(1, max_pairs // max(n_items, 1)), seed)
    results["warm"][RATING_ONLY_NAME] = report(sampled, rating_only_top_k(recommender, sampled))
    if len(sampled) < len(warm):
        results["warm"][RATING_ONLY_NAME]["note"] = (
            f"a seeded sample of {len(sampled):,} of the {len(warm):,} warm users: it scores every book "
            f"for every user, capped at eval.rating_only_max_pairs = {max_pairs:,} pairs"
        )
    timings[RATING_ONLY_NAME] = time.perf_counter() - start

    folder = Path(settings.baseline_cache) if settings.baseline_cache else None
    cached = BaselineCache(
        folder,
        train,
        (warm, cold_user),
        warm_task(catalog, ratings, "val"),
        settings.topk_tuning,
        settings.ease_max_items,
        seed,
    )
    baselines = cached.results(progress)
    for name, (reports, seconds) in baselines["baselines"].items():
        for protocol, rep in reports.items():
            results[protocol][name] = rep
        timings[name] = seconds
        if "recall@10" in reports["warm"]:
            log.info("%s: warm recall@10 %.4f", name, reports["warm"]["recall@10"])

    start = time.perf_counter()
    results.update(cold_book_results(recommender, catalog, ratings, train, seed))
    timings["cold-book protocols"] = time.perf_counter() - start
    return {
        "results": results,
        "tuning": baselines["tuning"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def training_matrix(catalog: Catalog) -> sp.csr_matrix:
    """The catalog's training interactions (rated or implicit) as a binary CSR [users, books]."""
    bounds = catalog.rated_bounds
    users = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    return interaction_matrix(users, catalog.rated_books, len(bounds) - 1, len(catalog.books))


class BaselineCache:
    """The top-K baselines of one split, tuned on validation and scored on the test protocols,
    computed once and kept on disk."""

    VERSION = 3  # bump when what is cached changes meaning (3: item-kNN and RP3β cut heavy readers as the graph)

    def __init__(
        self,
        folder: Path | None,
        train: sp.csr_matrix,
        tasks: tuple[RankingTask, ...],
        validation: RankingTask,
        tuning: TopKTuning,
        ease_max_items: int,
        seed: int,
    ):
        self.folder, self.train, self.tasks, self.validation = folder, train, tasks, validation
        self.tuning, self.ease_max_items, self.seed = tuning, ease_max_items, seed
        digest = hashlib.sha256()
        for array in (train.indptr, train.indices):
            digest.update(np.ascontiguousarray(array, np.int64).tobytes())
        for task in (*tasks, validation):
            digest.update(task.name.encode())
            for lists in (task.history, task.exclude, task.relevant, task.liked):
                for x in lists:
                    digest.update(np.ascontiguousarray(x, np.int64).tobytes() + b"|")
        setup = [self.VERSION, METHODS, tuning.model_dump(), ease_max_items, seed, "popularity fallback"]
        digest.update(json.dumps(setup).encode())
        self.key = digest.hexdigest()[:24]

    @property
    def path(self) -> Path | None:
        return self.folder / f"{self.key}.json" if self.folder else None

    def results(self, progress: bool) -> dict[str, dict]:
        """``{"baselines": {name: ({protocol: report}, seconds)}, "tuning": {method: choice}}``, from
        the cache when it has them."""
        path = self.path
        if path is not None and path.is_file():
            log.info("top-K baselines from the cache %s (same split, protocols and grids)", path)
            cached = json.loads(path.read_text())
            return {"baselines": {n: tuple(v) for n, v in cached["baselines"].items()}, "tuning": cached["tuning"]}
        out: dict[str, dict] = {"baselines": {}, "tuning": {}}
        n_items = self.train.shape[1]
        popularity = np.asarray(self.train.sum(axis=0)).ravel()
        # Each protocol's history and exclusion matrices, built once for every baseline.
        inputs = {t.name: (history_matrix(t.history, n_items), history_matrix(t.exclude, n_items)) for t in self.tasks}
        popular = MostPopular().fit(self.train)
        start = time.perf_counter()
        # Its lists are also the fallback of every other baseline for readers with no history.
        fallback = {name: recommend_top_k(popular, *matrices, DEPTH) for name, matrices in inputs.items()}

        def reports(model: TopKBaseline) -> dict[str, dict]:
            found = {}
            for task in self.tasks:
                top = fallback[task.name] if model is popular else recommend_top_k(model, *inputs[task.name], DEPTH)
                # A reader with no history gets nothing from item-item or factor models (every score
                # is 0); like any deployed recommender, they fall back to the most popular books.
                empty = np.array([len(h) == 0 for h in task.history], bool)
                top[empty] = fallback[task.name][empty]
                found[task.name] = topk_report(top, clean(task.relevant), clean(task.liked), popularity, n_items)
            return found

        out["baselines"][popular.name] = (reports(popular), round(time.perf_counter() - start, 1))
        validation = Validation(self.validation, self.train)
        for method in tqdm(METHODS, desc="top-K baselines", leave=False, disable=not progress):
            start = time.perf_counter()
            try:
                chosen = tune(method, self.train, validation, self.tuning, self.seed, self.ease_max_items)
            except BaselineSkipped as err:
                log.warning("%s skipped: %s", method, err)
                out["baselines"][method] = ({task.name: {"skipped": str(err)} for task in self.tasks}, 0.0)
                continue
            log.info("%s tuned on validation: %s (recall@10 %.4f)", method, chosen.model.name, chosen.val_recall)
            out["baselines"][chosen.model.name] = (reports(chosen.model), round(time.perf_counter() - start, 1))
            out["tuning"][method] = chosen.report()
            del chosen
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1) + "\n")
        return out


MODEL_NAME = "two-stage (retrieval, candidate sources, ranker)"
RATING_ONLY_NAME = "rating MLP alone"
CONTENT_NAME = SameAuthor.name
COLD_PROTOCOLS = {"cold-book": False, "new-author": True}  # protocol: only books of new authors


def content_top_k(model: SameAuthor, task: RankingTask, candidates: np.ndarray, k: int) -> np.ndarray:
    """[U, k] candidate positions by the same-author baseline, scored from each reader's history."""
    history = history_matrix(task.history, model.n_items or 0)
    out = np.empty((len(task), k), np.int64)
    block = max(1, SCORE_BUDGET // max(len(candidates), 1))
    for s in range(0, len(task), block):
        scores = model.score(history[s : s + block], candidates)
        out[s : s + scores.shape[0]] = top_k_excluding(scores, None, k)[1].numpy()
    return out


def cold_book_results(
    recommender: Recommender, catalog: Catalog, ratings: pd.DataFrame, train: sp.csr_matrix, seed: int
) -> dict[str, dict]:
    """recall@10 among the cold books (``cold-book``) and among the cold books of authors with no
    book in training (``new-author``): the recommender restricted to them, the same-author
    baseline and a random order."""
    content = SameAuthor(catalog.group_code_columns()[0].numpy(), seed).fit(train)
    out: dict[str, dict] = {}
    for protocol, new_authors in COLD_PROTOCOLS.items():
        task, candidates = cold_book_task(catalog, ratings, new_authors_only=new_authors)
        if len(task) == 0 or len(candidates) == 0:
            out[protocol] = {}
            continue
        relevant = clean(task.relevant)
        top = model_top_k(recommender.subset(candidates), task, k=10)
        out[protocol] = {
            MODEL_NAME: {
                "recall@10": recall_at_k(top, relevant, 10),
                "users": len(task),
                "cold_books": len(candidates),
            },
            CONTENT_NAME: {
                "recall@10": recall_at_k(content_top_k(content, task, candidates, 10), relevant, 10),
                "users": len(task),
            },
            "random": {"recall@10": min(10, len(candidates)) / len(candidates), "users": len(task)},
        }
    return out


def choose_blend(
    recommender: Recommender, task: RankingTask, grid: list[float], k: int = 10, min_gain: float = 0.0
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


COLD_TITLES = {"cold-book": "cold books", "new-author": "cold books whose author has no book in training"}


def topk_markdown(topk: dict) -> str:
    """The warm and cold-user tables (one row per model), the cold-book comparisons and the choices
    of the tuned baselines, in Markdown."""
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
    tuning = topk.get("tuning") or {}
    if tuning:
        chosen = [
            f"{method}: {len(t['grid'])} settings, chose {t['name']} (validation recall@10 {t['val_recall']:.4f})"
            for method, t in tuning.items()
        ]
        parts.append("Baselines tuned on validation recall@10, fitted on training only: " + "; ".join(chosen) + ".")
    for protocol, title in COLD_TITLES.items():
        cold = topk["results"].get(protocol)
        if cold is None:
            continue
        if not cold:
            parts.append(f"**{protocol}**: this split has no reader of {title}.")
            continue
        model, content, rand = cold[MODEL_NAME], cold[CONTENT_NAME], cold["random"]
        parts.append(
            f"**{protocol}**: {model['users']} users rank the {model['cold_books']} {title}: recall@10 "
            f"{model['recall@10']:.4f} for the two-stage path ({model['recall@10'] / rand['recall@10']:.1f}x random), "
            f"{content['recall@10']:.4f} for {CONTENT_NAME} ({content['recall@10'] / rand['recall@10']:.1f}x), "
            f"{rand['recall@10']:.4f} for a random order."
        )
    return "\n\n".join(parts)


def plot_top_k(topk: dict, path) -> None:
    """Warm recall@10 and NDCG@10 (left), coverage@10 (middle) of every model, and recall@10 among
    the cold books of the cold-book and new-author protocols (right), as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: rep for name, rep in topk["results"]["warm"].items() if "skipped" not in rep}
    names = [n.split(" (")[0] for n in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]})
    for i, (key, label) in enumerate([("recall@10", "recall@10"), ("ndcg@10", "NDCG@10")]):
        left.bar([x + i * 0.4 for x in range(len(rows))], [rep[key] for rep in rows.values()], 0.4, label=label)
    left.set_xticks([x + 0.2 for x in range(len(rows))], names, rotation=20, ha="right")
    left.set_ylabel("warm test (higher is better)")
    left.legend()
    middle.bar(range(len(rows)), [rep["coverage@10"] for rep in rows.values()], 0.6, color="tab:green")
    middle.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    middle.set_ylabel("catalog coverage of the top-10 lists")
    cold = {p: topk["results"].get(p) or {} for p in COLD_TITLES}
    models = (MODEL_NAME, CONTENT_NAME, "random")
    for i, model in enumerate(models):
        values = [cold[p][model]["recall@10"] if cold[p] else 0.0 for p in cold]
        right.bar([x + i * 0.27 for x in range(len(cold))], values, 0.27, label=model.split(" (")[0])
    right.set_xticks([x + 0.27 for x in range(len(cold))], list(cold))
    right.set_ylabel("recall@10 among the cold books")
    right.set_ylim(0, 1.5 * max(right.get_ylim()[1], 1e-3))  # room for the legend above the bars
    right.legend(fontsize="small", loc="upper left")
    for ax in (left, middle, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
