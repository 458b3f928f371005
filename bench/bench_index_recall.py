"""The shipped lists with the book index against exhaustive retrieval, on a finished run.

    nice .venv/bin/python bench/bench_index_recall.py RUN_COPY --ef-search 200 400 800

Builds the run's book index when it has none (whatever the catalog size: the threshold is not
consulted, so a catalog below it can be compared too; pass a copy of the run, the index files are
written into it), then for the evaluation's warm and cold-user protocols (``train/evaluation``,
the run's split seed and ``eval.cold_user_reveal``) computes the product's top-10 lists
(``model_top_k``: towers, ranking stage, exclusions) with exhaustive retrieval and with the index
at each efSearch: recall@10 / NDCG@10 of each, the share of users whose list is identical, the
recall of the towers' exact top-N candidates, and the seconds each pass took.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import layout  # noqa: E402
from model.artifacts import ModelFolder  # noqa: E402
from model.book_index import BookIndex, IndexSettings  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data.tables import load_tables  # noqa: E402
from train.evaluation.protocols import RankingTask, clean, cold_user_task, warm_task  # noqa: E402
from train.evaluation.topk import model_top_k, training_matrix  # noqa: E402
from train.metrics import topk_report  # noqa: E402


def candidate_recall(rec, task, exact: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The towers' top-N rows of every task user, and their recall of ``exact`` (the same with no
    index)."""
    out = []
    for s in range(0, len(task), 512):
        sl = slice(s, s + 512)
        users = rec.user_vectors(task.feats[sl], task.history[sl])
        _, rows = rec._top_n(users, task.exclude[sl], rec.settings.candidates)
        out.append(rows.cpu().numpy())
    rows = np.concatenate(out)
    if exact is None:
        return rows, 1.0
    return rows, float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(rows, exact, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a copy of a finished run folder")
    p.add_argument("--ef-search", type=int, nargs="+", default=[IndexSettings.ef_search])
    p.add_argument("--m", type=int, default=IndexSettings.m)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = ModelFolder(args.run)
    if not folder.has_index():
        start = time.perf_counter()
        index = BookIndex.build(folder.book_vectors().numpy(), IndexSettings(m=args.m))
        index.save(folder / layout.BOOK_INDEX, folder / layout.BOOK_INDEX_SETTINGS)
        print(f"built the index of {index.n_books} books in {time.perf_counter() - start:.1f} s", flush=True)
    cfg = load_config(folder / layout.CONFIG_FILE)
    loaded = folder.load()
    rec, catalog = loaded.recommender, loaded.catalog
    assert rec is not None and rec.index is not None
    index = rec.index
    ratings = load_tables(folder.path)[2]
    popularity = np.asarray(training_matrix(catalog).sum(axis=0)).ravel()
    tasks = (
        warm_task(catalog, ratings, "test"),
        cold_user_task(catalog, ratings, cfg.eval.cold_user_reveal, cfg.split.seed),
    )

    def timed_lists(task: RankingTask, through: BookIndex | None) -> tuple[np.ndarray, float, dict]:
        """The product's top-K lists of ``task`` searched through ``through`` (None: exhaustively),
        the seconds they took and their report."""
        rec.index = through
        start = time.perf_counter()
        top = model_top_k(rec, task)
        seconds = time.perf_counter() - start
        return top, seconds, topk_report(top, clean(task.relevant), clean(task.liked), popularity, len(catalog.books))

    rows = []
    for task in tasks:
        reference, seconds, base = timed_lists(task, None)
        exact_cands, _ = candidate_recall(rec, task, None)
        row = {"protocol": task.name, "users": len(task), "method": "exhaustive", "recall@10": base["recall@10"],
               "ndcg@10": base["ndcg@10"], "seconds": round(seconds, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        for ef in args.ef_search:
            index.settings = dataclasses.replace(index.settings, ef_search=ef)
            top, seconds, got = timed_lists(task, index)
            _, cand_recall = candidate_recall(rec, task, exact_cands)
            row = {
                "protocol": task.name,
                "users": len(task),
                "method": f"HNSW{index.settings.m} efSearch {ef}",
                "recall@10": got["recall@10"],
                "ndcg@10": got["ndcg@10"],
                "recall@10 - exhaustive": round(got["recall@10"] - base["recall@10"], 5),
                "same top-10 list": round(float(np.mean((top == reference).all(axis=1))), 4),
                "candidate recall": round(cand_recall, 4),
                "seconds": round(seconds, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
