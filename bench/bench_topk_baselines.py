"""Top-K baselines on the split ratings of a run: warm-test and cold-user recall, NDCG, coverage.

    nice -n 10 .venv/bin/python bench/bench_topk_baselines.py \\
        --ratings runs/bookcrossing/data/ratings.parquet --tune --out bench/topk_baselines.json

Protocol (the one ``train/evaluation/protocols.py`` defines for the models):

- items are every ISBN in the ratings file; every baseline is fitted on the ``train`` split only
  (1.0 per rated pair, the rating value is not used);
- **warm** (``test``, and ``val`` for tuning): every user with at least one row in the split gets the
  whole catalog minus their training books, ranked from their training books as history;
  relevant = their rows in the split, liked = those rated >= 8;
- **cold user**: every user with ``cold_user`` rows reveals up to ``--reveal`` of them (a seeded
  choice that always holds at least one out, so a user with a single rating reveals none); the
  revealed books are the history (fold-in) and are excluded; relevant = the rest.

``--tune`` adds a wider grid of item-kNN neighbours, EASE lambdas and ALS regularisations than the
evaluation's own (``eval.topk_tuning``, read by ``train/evaluation/tuning.py``). Every model is fitted
once; the grid is read on ``val``; the test and cold-user tables show the constructor defaults only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.candidates import interaction_matrix  # noqa: E402
from train.evaluation.topk import TABLE_COLUMNS as COLUMNS  # noqa: E402
from train.evaluation.topk_baselines import (  # noqa: E402
    ALS,
    EASE,
    BaselineSkipped,
    ItemKNN,
    MostPopular,
    TopKBaseline,
    recommend_top_k,
)
from train.metrics import topk_report  # noqa: E402

DEFAULT_RATINGS = REPO / "runs" / "bookcrossing" / "data" / "ratings.parquet"
LIKED = 8


@dataclass
class Protocol:
    """Users to rank for, their history (also excluded) and what they hold out."""

    name: str
    history: sp.csr_matrix
    relevant: list[np.ndarray]
    liked: list[np.ndarray]
    note: str


def _groups(users: np.ndarray, items: np.ndarray, n: int) -> list[np.ndarray]:
    """Item arrays per user 0..n-1 (users already 0-based positions)."""
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(n + 1))
    sorted_items = items[order]
    return [sorted_items[bounds[i] : bounds[i + 1]] for i in range(n)]


def warm_protocol(r: pd.DataFrame, split: str, train: sp.csr_matrix, user_ix: pd.Index, item_ix: pd.Index) -> Protocol:
    rows = r[r["split"] == split]
    who = np.sort(rows["user_id"].unique())
    pos = pd.Index(who).get_indexer(rows["user_id"])
    items = item_ix.get_indexer(rows["isbn"])
    liked = rows["rating"].to_numpy() >= LIKED
    history = train[user_ix.get_indexer(who)]
    n_hist = np.diff(history.indptr)
    return Protocol(
        split,
        history,
        _groups(pos, items, who.size),
        _groups(pos[liked], items[liked], who.size),
        f"{who.size:,} users, {len(rows):,} held-out ratings; history = training books "
        f"(median {np.median(n_hist):.0f}, {int((n_hist == 0).sum())} users with none)",
    )


def cold_user_protocol(r: pd.DataFrame, item_ix: pd.Index, reveal: int, seed: int) -> Protocol:
    rows = r[r["split"] == "cold_user"].reset_index(drop=True)
    who = np.sort(rows["user_id"].unique())
    pos = pd.Index(who).get_indexer(rows["user_id"])
    items = item_ix.get_indexer(rows["isbn"])
    # Seeded reveal: a random key per row, the lowest min(reveal, n-1) keys of each user are revealed.
    key = np.random.default_rng(seed).random(len(rows))
    order = np.lexsort((key, pos))
    n_per = np.bincount(pos, minlength=who.size)
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - np.repeat(np.cumsum(n_per) - n_per, n_per)
    shown = rank < np.minimum(reveal, n_per - 1)[pos]
    history = interaction_matrix(pos[shown], items[shown], who.size, len(item_ix))
    held = ~shown
    liked = held & (rows["rating"].to_numpy() >= LIKED)
    n_shown = np.bincount(pos[shown], minlength=who.size)
    return Protocol(
        "cold_user",
        history,
        _groups(pos[held], items[held], who.size),
        _groups(pos[liked], items[liked], who.size),
        f"{who.size:,} users, {int(held.sum()):,} held-out ratings; up to {reveal} revealed (seed {seed}): "
        f"{int((n_shown == 0).sum()):,} users reveal none, {int((n_shown > 0).sum()):,} reveal 1-{reveal}",
    )


def _als(reg: float, alpha: float) -> ALS:
    als = ALS(regularization=reg, alpha=alpha)
    als.name = f"ALS (64 factors, reg {reg:g}, alpha {alpha:g})"
    return als


def _knn(neighbours: int | None, shrink: float) -> ItemKNN:
    knn = ItemKNN(neighbours, shrink)
    knn.name = f"item-kNN (cosine, {neighbours or 'all'} neighbours, shrink {shrink:g})"
    return knn


def candidates(tune: bool) -> list[tuple[Callable[[], TopKBaseline], bool]]:
    """(model factory, is_default) pairs: the defaults first, then the grid, the slow EASE fits last.
    Factories, so only one fitted model lives at a time."""
    Factory = Callable[[], TopKBaseline]
    out: list[tuple[Factory, bool]] = [(MostPopular, True), (ItemKNN, True), (ALS, True), (EASE, True)]
    if tune:
        knn, ease, als = ItemKNN(), EASE(), ALS()
        out += [
            (partial(_knn, n, sh), False)
            for n, sh in [
                (20, 0.0),
                (50, 0.0),
                (100, 0.0),
                (200, 0.0),
                (500, 0.0),
                (None, 0.0),
                (100, 10.0),
                (100, 50.0),
            ]
            if (n, sh) != (knn.neighbours, knn.shrink)
        ]
        out += [
            (partial(_als, reg, alpha), False)
            for reg in (0.01, 1.0, 10.0)
            for alpha in (1.0, 10.0)
            if (reg, alpha) != (als.regularization, als.alpha)
        ]
        out += [(partial(EASE, lam), False) for lam in (100.0, 250.0, 1000.0) if lam != ease.lam]
    return out


def fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "nan" if np.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def table(results: list[dict[str, Any]], protocol: str, only_default: bool) -> str:
    head = "| model | " + " | ".join(c for _, c in COLUMNS) + " | fit s | score s |"
    lines = [head, "|---" + "|---:" * (len(COLUMNS) + 2) + "|"]
    for res in results:
        if only_default and not res["default"]:
            continue
        if res.get("skipped"):
            lines.append(f"| {res['name']} | skipped: {res['skipped']} |" + " |" * (len(COLUMNS) + 1))
            continue
        m = res["protocols"][protocol]
        cells = [fmt(m[key], 2 if key.startswith("mean_pop") else 4) for key, _ in COLUMNS]
        lines.append(f"| {res['name']} | " + " | ".join(cells) + f" | {res['fit_s']:.1f} | {m['score_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=Path, default=DEFAULT_RATINGS, help="split ratings.parquet of a run")
    ap.add_argument("--tune", action="store_true", help="also fit the kNN / EASE / ALS grid, read on val")
    ap.add_argument("--reveal", type=int, default=5, help="cold-user ratings revealed per user (at most)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cold-user reveal")
    ap.add_argument("--block", type=int, default=2048, help="users scored at a time")
    ap.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = ap.parse_args(argv)

    r = pd.read_parquet(args.ratings, columns=["user_id", "isbn", "rating", "split"])
    item_ix = pd.Index(np.sort(r["isbn"].unique()))
    user_ix = pd.Index(np.sort(r["user_id"].unique()))
    tr = r[r["split"] == "train"]
    train = interaction_matrix(
        user_ix.get_indexer(tr["user_id"]), item_ix.get_indexer(tr["isbn"]), len(user_ix), len(item_ix)
    )
    popularity = np.asarray(train.sum(axis=0)).ravel()
    n_items = len(item_ix)

    cold = cold_user_protocol(r, item_ix, args.reveal, args.seed)
    revealed = np.diff(cold.history.indptr) > 0
    protocols = [
        warm_protocol(r, "val", train, user_ix, item_ix),
        warm_protocol(r, "test", train, user_ix, item_ix),
        cold,
    ]
    print(
        f"# Top-K baselines\n\n{args.ratings}: {len(r):,} ratings, {n_items:,} items "
        f"({int((popularity > 0).sum()):,} with a training interaction), {len(user_ix):,} users, "
        f"{train.nnz:,} training interactions. torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}.\n",
        flush=True,
    )
    for p in protocols:
        print(f"- {p.name}: {p.note}", flush=True)
    print(f"- cold_user_revealed: the {int(revealed.sum()):,} cold users who reveal >= 1", flush=True)

    meta = {
        "ratings": str(args.ratings),
        "n_items": n_items,
        "n_users": len(user_ix),
        "train_interactions": int(train.nnz),
        "reveal": args.reveal,
        "seed": args.seed,
        "protocols": {p.name: p.note for p in protocols},
    }
    results: list[dict[str, Any]] = []
    for make, default in tqdm(candidates(args.tune), desc="baselines", file=sys.stderr):
        model = make()
        res: dict[str, Any] = {"name": model.name, "default": default, "protocols": {}}
        t0 = time.perf_counter()
        try:
            model.fit(train)
        except BaselineSkipped as e:
            res["skipped"] = str(e)
            results.append(res)
            continue
        res["fit_s"] = time.perf_counter() - t0
        for p in protocols:
            t0 = time.perf_counter()
            rec = recommend_top_k(model, p.history, p.history, 100, block=args.block)
            score_s = time.perf_counter() - t0
            res["protocols"][p.name] = {
                **topk_report(rec, p.relevant, p.liked, popularity, n_items),
                "score_s": score_s,
            }
            if p is cold:  # the same lists, for the users who revealed something
                idx = np.flatnonzero(revealed)
                res["protocols"]["cold_user_revealed"] = {
                    **topk_report(
                        rec[idx], [p.relevant[i] for i in idx], [p.liked[i] for i in idx], popularity, n_items
                    ),
                    "score_s": score_s,
                }
        results.append(res)
        m = res["protocols"]
        tqdm.write(
            f"{model.name}: fit {res['fit_s']:.1f}s, val recall@10 {m['val']['recall@10']:.4f}, "
            f"test recall@10 {m['test']['recall@10']:.4f}, cold recall@10 {m['cold_user']['recall@10']:.4f}",
            file=sys.stderr,
        )
        del model, rec
        if args.out:  # after every model, so a long run leaves what it has
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))

    if args.tune:
        print("\n## Validation (choice of defaults)\n")
        print(table(results, "val", only_default=False))
    for p, title in [
        ("test", "Warm test: whole catalog minus the user's training books"),
        ("cold_user", f"Cold users: up to {args.reveal} revealed ratings folded in, the rest held out"),
        ("cold_user_revealed", "Cold users who revealed at least one rating"),
    ]:
        print(f"\n## {title}\n")
        print(table(results, p, only_default=True))
    print(
        "\nfit s: fitting on the training split; score s: scoring and top-100 over the protocol's users "
        f"in blocks of {args.block}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
