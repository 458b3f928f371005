"""Speed of the two-stage top-K core (``Recommender``, what the batch job and the handler call)
on CPU or GPU, and how much the candidate cut loses against exhaustive scoring.

    python bench/bench_topk.py --run runs/bookcrossing [--device cuda] [--users 0] [--block 1024]

Measures, in one process:
1. the same-run matmul peak (fp32 ``torch.mm`` of the retrieval shape: a user block x dim x books);
2. top-k for every catalog user (or ``--users``) against every book, read books excluded, in user
   blocks: wall time, users x books pairs/s, and the retrieval matmul's share of the peak;
3. agreement with exhaustive scoring: the same blend computed over *every* book (candidates = the
   whole catalog) on a user sample; recall of the two-stage top-k against that exhaustive top-k.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.artifacts import ModelFolder  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, users: int, dim: int, books: int, repeats: int = 5) -> float:
    """FLOP/s of ``[users, dim] @ [dim, books]`` in fp32, best of ``repeats``."""
    a = torch.randn(users, dim, device=device)
    b = torch.randn(dim, books, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * users * dim * books / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "bookcrossing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--users", type=int, default=0, help="users to rank for (0: every catalog user)")
    parser.add_argument("--block", type=int, default=1024, help="users per call")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exhaustive-users", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    loaded = ModelFolder(args.run).load(device)
    catalog, recommender = loaded.catalog, loaded.recommender
    n_users = len(catalog.users) if args.users <= 0 else min(args.users, len(catalog.users))
    history = [catalog.rated_by(u) for u in range(n_users)]
    dim, n_books = recommender.book_vectors.shape[1], recommender.n_books
    peak = matmul_peak(device, args.block, dim, n_books)

    warm = min(args.block, n_users)
    recommender.recommend(catalog.user_feats[:warm], history[:warm], args.k, history[:warm])
    sync(device)
    start = time.perf_counter()
    retrieval = rerank = 0.0
    for s in range(0, n_users, args.block):
        sl = slice(s, min(s + args.block, n_users))
        recommender.recommend(catalog.user_feats[sl], history[sl], args.k, history[sl])
        retrieval += recommender.last_timings["retrieval"]
        rerank += recommender.last_timings["rerank"]
    sync(device)
    seconds = time.perf_counter() - start
    pairs = n_users * n_books

    sample = np.random.default_rng(0).choice(n_users, min(args.exhaustive_users, n_users), replace=False)
    agree = []
    for s in range(0, len(sample), 32):  # the exhaustive rerank rates every book: [32, books, h0] at a time
        block = sample[s : s + 32]
        feats, hist = catalog.user_feats[block], [history[u] for u in block]
        two_stage = recommender.recommend(feats, hist, args.k, hist).rows.cpu().numpy()
        everything = recommender.candidates(feats, hist, hist, n=n_books)
        exhaustive = recommender.rerank(everything, args.k).rows.cpu().numpy()
        agree += [len(set(a) & set(b)) / args.k for a, b in zip(two_stage, exhaustive, strict=True)]
    agree = np.mean(agree)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "users": n_users,
        "books": n_books,
        "dim": dim,
        "candidates": recommender.settings.candidates,
        "blend": recommender.settings.blend,
        "seconds": round(seconds, 2),
        "pairs_per_s": pairs / seconds,
        "retrieval_seconds": round(retrieval, 2),
        "rerank_seconds": round(rerank, 2),
        "matmul_peak_gflops": peak / 1e9,
        "retrieval": "index" if recommender.index is not None else "exhaustive",
        # The exhaustive matmul's share of the peak; meaningless when an index does the retrieval.
        "retrieval_matmul_share_of_peak": None if recommender.index is not None else (2 * pairs * dim / peak) / seconds,
        f"recall@{args.k}_vs_exhaustive": round(float(agree), 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
