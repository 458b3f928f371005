"""The retrieval index alone at 10x and 100x the full Book-Crossing catalog, exhaustive beside it.

    .venv/bin/python bench/bench_index_sim.py --scales 10 100 --out bench/index_sim.json

Synthetic unit vectors of dim 128 stand in for the towers' book vectors: ``scale`` x 271,386 books,
each a seeded cluster centre (one per ``--per-cluster`` books) plus Gaussian noise of norm
``--spread`` relative to the centre, L2-normalised (real embeddings are clustered; ``--spread``
large tends to structureless vectors, the hardest case for any index). Queries are like the
towers' user vectors: normalised means of 5 random books.

For each scale, in one process:

1. **exhaustive**: the exact top-200 of every query, computed block by block of at most
   ``--block`` books (2.7M vectors, 1.4 GB, at a time: 27M fp32 vectors would not fit in memory
   beside an index on a 23 GB machine), timed per query on one thread and per 256-query batch on
   every thread, summed over the blocks; it is also the ground truth for recall;
2. **index**: faiss ``IVF{nlist}_HNSW32,{storage}`` (an HNSW graph over the list centroids, so adding
   millions of vectors does not compare each with every centroid; ``Flat`` storage at 10x, ``SQ8`` at
   100x to fit in memory), trained on a seeded sample, filled block by block; build time, index
   bytes, process RSS; then for each ``nprobe``: recall of the exact top-200, single-query p50/p99
   on one thread, and throughput of 256-query batches on every thread.

With ``--kind hnsw`` step 2 is instead the product's own index (``model/book_index.py``: faiss
``HNSW{m},Flat``, inner product, the shipped ``IndexSettings``), filled block by block, and the
figures are per ``--ef-search`` (the shipped value is 400).

Every figure names the CPU's instruction set. Results go to ``--out`` (JSON) and print as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.run_folder import cpu_isa

FULL_BOOKS = 271_386
DIM = 128
TOP = 200


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class Synthetic:
    """Seeded clustered unit vectors, generated block by block (block i is the same on every call)."""

    def __init__(self, n: int, per_cluster: int, spread: float, seed: int):
        self.n, self.spread, self.seed = n, spread, seed
        rng = np.random.default_rng(seed)
        n_centres = max(1, n // per_cluster)
        self.centres = normalise(rng.standard_normal((n_centres, DIM), dtype=np.float32))
        self.cluster = rng.integers(0, n_centres, n)

    def block(self, begin: int, end: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, begin))
        noise = rng.standard_normal((end - begin, DIM), dtype=np.float32) * (self.spread / np.sqrt(DIM))
        return normalise(self.centres[self.cluster[begin:end]] + noise)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def queries(first_block: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Normalised means of 5 random books of the first block, like a reader's tower vector."""
    rng = np.random.default_rng(seed + 1)
    picks = rng.integers(0, len(first_block), (n, 5))
    return normalise(first_block[picks].mean(axis=1))


def exhaustive(data: Synthetic, q: np.ndarray, block: int, threads: int) -> dict:
    """Exact top-``TOP`` of every query over all blocks, with the scan's cost per query (one thread)
    and per 256-query batch (``threads``), summed over the blocks."""
    import faiss

    best_d = np.full((len(q), TOP), -np.inf, np.float32)
    best_i = np.full((len(q), TOP), -1, np.int64)
    one = batch = 0.0
    n_single = min(20, len(q))
    for begin in tqdm(range(0, data.n, block), desc="exhaustive", unit="block"):
        end = min(begin + block, data.n)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(data.block(begin, end))
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        for i in range(n_single):
            flat.search(q[i : i + 1], TOP)
        one += (time.perf_counter() - t) / n_single
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        d, i = flat.search(q[:256], TOP)
        batch += time.perf_counter() - t
        d, i = flat.search(q, TOP)
        d_all = np.concatenate([best_d, d], axis=1)
        i_all = np.concatenate([best_i, i + begin], axis=1)
        pick = np.argsort(-d_all, axis=1)[:, :TOP]
        best_d, best_i = np.take_along_axis(d_all, pick, 1), np.take_along_axis(i_all, pick, 1)
        del flat
    return {
        "single_query_ms": one * 1e3,
        "batch256_s": batch,
        "queries_per_s": 256 / batch,
        "vectors_gb_fp32": data.n * DIM * 4 / 1e9,
        "truth": best_i,
    }


def build_index(data: Synthetic, nlist: int, storage: str, block: int, threads: int, seed: int):
    """An IVF index with an HNSW coarse quantizer, trained on a seeded sample, filled block by block."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(DIM, f"IVF{nlist}_HNSW32,{storage}", faiss.METRIC_INNER_PRODUCT)
    n_train = min(data.n, 40 * nlist)
    rng = np.random.default_rng(seed + 2)
    sample_ids = np.sort(rng.choice(min(data.n, 4 * block), n_train, replace=False))
    sample = np.concatenate([data.block(b, min(b + block, data.n)) for b in range(0, min(data.n, 4 * block), block)])
    t = time.perf_counter()
    index.train(sample[sample_ids])
    trained = time.perf_counter() - t
    del sample
    # The HNSW quantizer's default efSearch (16) misplaces vectors at add time: a cap on recall.
    quantizer_ef(index, 128)
    t = time.perf_counter()
    for begin in tqdm(range(0, data.n, block), desc=f"add IVF{nlist},{storage}", unit="block"):
        index.add(data.block(begin, min(begin + block, data.n)))
    added = time.perf_counter() - t
    return index, {"train_s": trained, "add_s": added, "train_vectors": n_train}


def quantizer_ef(index, ef: int) -> None:
    import faiss

    faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch = ef


def search_figures(index, q: np.ndarray, truth: np.ndarray, nprobe: int | None, threads: int) -> dict:
    import faiss

    if nprobe is not None:  # an IVF index
        index.nprobe = nprobe
        quantizer_ef(index, max(128, 2 * nprobe))
    faiss.omp_set_num_threads(threads)
    _, found = index.search(q, TOP)
    recall = float(np.mean([len(np.intersect1d(f, t)) / TOP for f, t in zip(found, truth, strict=True)]))
    t = time.perf_counter()
    index.search(q[:256], TOP)
    batch = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    times = []
    for i in range(min(100, len(q))):
        t = time.perf_counter()
        index.search(q[i : i + 1], TOP)
        times.append(time.perf_counter() - t)
    return {
        "nprobe": nprobe,
        "recall_at_200": recall,
        "single_query_p50_ms": float(np.percentile(times, 50) * 1e3),
        "single_query_p99_ms": float(np.percentile(times, 99) * 1e3),
        "queries_per_s": 256 / batch,
    }


def build_hnsw(data: Synthetic, block: int, threads: int):
    """The product's book index (``BookIndex``, shipped ``IndexSettings``) filled block by block."""
    import faiss

    from model.book_index import BookIndex, IndexSettings

    faiss.omp_set_num_threads(threads)
    settings = IndexSettings()
    index = BookIndex(faiss.IndexHNSWFlat(DIM, settings.m, faiss.METRIC_INNER_PRODUCT), settings)
    t = time.perf_counter()
    for begin in tqdm(range(0, data.n, block), desc=f"add HNSW{settings.m}", unit="block"):
        index.add(data.block(begin, min(begin + block, data.n)))
    return index.index, {"add_s": time.perf_counter() - t, "m": settings.m, "ef_construction": settings.ef_construction}


def hnsw_figures(index, q: np.ndarray, truth: np.ndarray, ef_search: int, threads: int) -> dict:
    index.hnsw.efSearch = max(ef_search, TOP)
    row = search_figures(index, q, truth, None, threads)
    row.pop("nprobe")
    return {"ef_search": index.hnsw.efSearch, **row}


def run_scale(scale: int, args: argparse.Namespace) -> dict:
    import faiss

    n = scale * FULL_BOOKS
    data = Synthetic(n, args.per_cluster, args.spread, args.seed)
    q = queries(data.block(0, min(args.block, n)), args.queries, args.seed)
    exact = exhaustive(data, q, args.block, args.threads)
    truth = exact.pop("truth")
    start = time.perf_counter()
    if args.kind == "hnsw":
        index, build = build_hnsw(data, args.block, args.threads)
        name = f"HNSW{build['m']},Flat"
    else:
        storage = "Flat" if scale <= 10 else "SQ8"
        nlist = args.nlist or (4096 if scale <= 10 else 16384)
        index, build = build_index(data, nlist, storage, args.block, args.threads, args.seed)
        name = f"IVF{nlist}_HNSW32,{storage}"
    build["build_s"] = time.perf_counter() - start
    build["index_gb"] = faiss.serialize_index(index).nbytes / 1e9
    build["process_max_rss_gb"] = rss_gb()
    if args.kind == "hnsw":
        rows = [hnsw_figures(index, q, truth, ef, args.threads) for ef in args.ef_search]
    else:
        rows = [search_figures(index, q, truth, p, args.threads) for p in args.nprobe]
    return {"scale": scale, "books": n, "index": name, "exhaustive": exact, "build": build, "search": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--per-cluster", type=int, default=100, help="books per synthetic cluster centre")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the centre's")
    ap.add_argument("--block", type=int, default=10 * FULL_BOOKS, help="books generated and scanned at a time")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4096 at 10x, 16384 above)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--kind", choices=("ivf", "hnsw"), default="ivf", help="the index simulated (hnsw: the product's)")
    ap.add_argument("--ef-search", type=int, nargs="+", default=[200, 400, 800], help="--kind hnsw: efSearch values")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/index_sim.json"))
    args = ap.parse_args(argv)
    import faiss

    machine = {"cpu": cpu_name(), "isa": cpu_isa(), "faiss": faiss.__version__, "threads": args.threads}
    results = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "scales": []}
    for scale in args.scales:
        results["scales"].append(run_scale(scale, args))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"# {m['cpu']} ({m['isa']}), faiss {m['faiss']}, {m['threads']} threads for batches")
    for s in results["scales"]:
        e, b = s["exhaustive"], s["build"]
        print(
            f"{s['scale']}x {s['books']:,} books: exhaustive {e['single_query_ms']:.1f} ms/query, "
            f"{e['queries_per_s']:.0f} q/s batched, {e['vectors_gb_fp32']:.1f} GB fp32; "
            f"{s['index']} built in {b['build_s']:.0f} s, {b['index_gb']:.2f} GB, "
            f"max RSS {b['process_max_rss_gb']:.1f} GB"
        )
        for r in s["search"]:
            knob = f"nprobe {r['nprobe']:>4}" if "nprobe" in r else f"efSearch {r['ef_search']:>4}"
            print(
                f"  {knob}: recall@200 {r['recall_at_200']:.3f}, "
                f"p50 {r['single_query_p50_ms']:.2f} ms, "
                f"p99 {r['single_query_p99_ms']:.2f} ms, {r['queries_per_s']:.0f} q/s batched"
            )


if __name__ == "__main__":
    sys.exit(main())
