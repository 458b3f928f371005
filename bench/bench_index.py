"""The towers' retrieval: exhaustive matmul against approximate nearest-neighbour indexes.

    nice .venv/bin/python bench/bench_index.py --vectors RUN/book_vectors.npy --out bench/index.json

For each catalog (the given run's book vectors, and a synthetic catalog of ``--full`` books made
from them) and each method (exhaustive fp32 matmul + top-k; faiss HNSW-flat at a few M / efSearch;
faiss IVF-flat at a few nprobe; usearch HNSW when installed), on one thread:

- recall: the share of each query's exact top-200 among the method's candidates, searched as the
  ``Recommender`` does (200 + ``IndexSettings.margin``, rescored exactly, top 200 kept);
- single-query p50 / p99 (ms) and block-of-256-users throughput (users/s);
- build time, the index's file size and memory (faiss: the file's arrays as loaded; usearch: its
  own count).

Queries are shaped like the towers' user vectors: normalised means of 5 random books' vectors.
The synthetic catalog keeps the real vectors and adds ``full - B`` vectors, each a real one plus
Gaussian noise of norm ~0.75 (cosine ~0.8 to its parent), normalised: real data's clustering, ten
times the books. The CPU's instruction set (AVX2 / AVX-512 / AMX) is printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.book_index import BookIndex, IndexSettings, set_threads  # noqa: E402
from train.run_folder import cpu_isa  # noqa: E402

N = 200  # the recommender's candidates
BLOCK = 256


def queries(vectors: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    q = vectors[rng.integers(0, len(vectors), (n, 5))].mean(axis=1)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def synthetic(vectors: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    extra = vectors[rng.integers(0, len(vectors), total - len(vectors))]
    extra = extra + rng.normal(0, 0.75 / np.sqrt(vectors.shape[1]), extra.shape).astype(np.float32)
    out = np.concatenate([vectors, extra]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def exact_top(vectors: torch.Tensor, q: np.ndarray, n: int) -> np.ndarray:
    out = []
    for s in range(0, len(q), BLOCK):
        out.append(torch.topk(torch.from_numpy(q[s : s + BLOCK]) @ vectors.T, n, dim=1).indices.numpy())
    return np.concatenate(out)


def rescored(vectors: torch.Tensor, q: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """The recommender's step after the index: exact logits of the found rows, top ``n``."""
    r = torch.from_numpy(rows.astype(np.int64))
    logits = torch.bmm(vectors[r.clamp_min(0)], torch.from_numpy(q).unsqueeze(2)).squeeze(2)
    logits = logits.masked_fill(r < 0, -float("inf"))
    return r.gather(1, torch.topk(logits, n, dim=1).indices).numpy()


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def timed(search, q: np.ndarray, singles: int, blocks: int) -> dict[str, float]:
    """p50 / p99 of one query per call, and users/s over blocks of 256."""
    for i in range(5):
        search(q[i : i + 1])
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        search(q[i : i + 1])
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for b in range(blocks):
        search(q[b * BLOCK : (b + 1) * BLOCK])
    users_s = blocks * BLOCK / (time.perf_counter() - t)
    return {
        "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 3),
        "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
        "block256_users_per_s": round(users_s, 1),
    }


def bench_catalog(name: str, vecs: np.ndarray, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    tv = torch.from_numpy(vecs)
    q = queries(vecs, max(args.queries, BLOCK * args.blocks), rng)
    exact = exact_top(tv, q[: args.queries], N)
    keep = N + IndexSettings().margin
    rows: list[dict[str, Any]] = []
    where = {"catalog": name, "books": len(vecs), "isa": cpu_isa(), "threads": torch.get_num_threads()}

    def report(row: dict[str, Any]) -> None:
        row = {**where, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def exhaustive(x: np.ndarray) -> np.ndarray:
        return torch.topk(torch.from_numpy(x) @ tv.T, N, dim=1).indices.numpy()

    report({"method": "exhaustive fp32", "recall": 1.0, **timed(exhaustive, q, args.singles, args.blocks),
            "memory_mb": round(vecs.nbytes / 2**20, 1)})  # fmt: skip
    tmp = Path(tempfile.mkdtemp())

    def index_rows(label: str, build_s: float, index: Any, file: Path, added: int, search) -> None:
        found = rescored(tv, q[: args.queries], search(q[: args.queries]), N)
        speed = timed(search, q, args.singles, args.blocks)
        sizes = {"file_mb": round(file.stat().st_size / 2**20, 1), "memory_mb": round(added / 2**20, 1)}
        report(
            {"method": label, "recall": round(recall(found, exact), 4), **speed, "build_s": round(build_s, 1)} | sizes
        )

    import faiss

    for m in args.m:
        t = time.perf_counter()
        built = BookIndex.build(vecs, IndexSettings(m=m, ef_construction=args.ef_construction))
        build_s = time.perf_counter() - t
        built.save(tmp / "i.faiss", tmp / "i.json")
        del built
        index = BookIndex.load(tmp / "i.faiss", tmp / "i.json")
        added = (tmp / "i.faiss").stat().st_size  # faiss holds the file's arrays as they are
        for ef in args.ef_search:
            index.index.hnsw.efSearch = ef
            params = faiss.SearchParametersHNSW(efSearch=ef)
            label = f"faiss HNSW{m} efC{args.ef_construction} efSearch {ef}"

            def search(x: np.ndarray, index=index, params=params) -> np.ndarray:
                return index.index.search(x, keep, params=params)[1]

            index_rows(label, build_s, index, tmp / "i.faiss", added, search)
        del index

    nlist = int(4 * np.sqrt(len(vecs)))
    t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(vecs.shape[1]), vecs.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vecs)
    ivf.add(vecs)
    build_s = time.perf_counter() - t
    faiss.write_index(ivf, str(tmp / "ivf.faiss"))
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe

        def search_ivf(x: np.ndarray) -> np.ndarray:
            return ivf.search(x, keep)[1]

        index_rows(f"faiss IVF-flat {nlist} lists nprobe {nprobe}", build_s, ivf, tmp / "ivf.faiss",
                   (tmp / "ivf.faiss").stat().st_size, search_ivf)  # fmt: skip

    try:
        from usearch.index import Index
    except ImportError:
        return rows
    t = time.perf_counter()
    us = Index(ndim=vecs.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128)
    us.add(np.arange(len(vecs)), vecs, threads=1)
    build_s = time.perf_counter() - t
    us.save(str(tmp / "us.usearch"))
    for ef in args.ef_search:
        us.expansion_search = ef

        def search_us(x: np.ndarray) -> np.ndarray:
            got = us.search(x, keep, threads=1)
            keys = np.asarray(got.keys, dtype=np.int64).reshape(len(x), -1)
            counts = np.asarray(getattr(got, "counts", [len(got.keys)])).reshape(-1)
            keys[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = -1
            return keys

        index_rows(f"usearch HNSW16 efC128 expansion {ef}", build_s, us, tmp / "us.usearch",
                   us.memory_usage, search_us)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=Path, required=True, help="a run's book_vectors.npy")
    p.add_argument("--full", type=int, default=271_386, help="books of the synthetic catalog (0: none)")
    p.add_argument("--m", type=int, nargs="+", default=[16, 32])
    p.add_argument("--full-m", type=int, nargs="+", default=[32], help="HNSW M at the synthetic size")
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--ef-search", type=int, nargs="+", default=[100, 200, 400, 800])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--singles", type=int, default=300, help="single-query calls timed")
    p.add_argument("--blocks", type=int, default=4, help="blocks of 256 users timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    real = np.load(args.vectors).astype(np.float32)
    rows = bench_catalog("shared data", real, args, rng)
    if args.full:
        args.m = args.full_m
        rows += bench_catalog("synthetic full size", synthetic(real, args.full, rng), args, rng)
    if args.out:
        args.out.write_text(json.dumps({"cpu_isa": cpu_isa(), "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
