"""Time and size of a catalog update (``python -m train update``) at a run's catalog.

    python bench/bench_update.py --run /tmp/bcAfter --books 1000 --ratings 5000 --work /tmp/bench-update

The update folder holds ``--books`` new books (the metadata of random catalog books under new ISBNs,
each title marked as a new edition, so every text is new to the encoder and the cache) and
``--ratings`` ratings of them by random catalog readers (so the history, its features and the item
graph are remade). The command line runs as a user runs it (imports, verification of the source,
embedding, towers, graph, manifest); the figures are its wall time, the stages of ``update.json``,
and the size of the version folder. ``--repeat`` runs it again with the embedding cache filled.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def write_input(run: Path, folder: Path, n_books: int, n_ratings: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    books = pq.read_table(run / "catalog" / "books.parquet", columns=["isbn", "title", "author", "year", "publisher"])
    books = books.to_pandas()
    users = pq.read_table(run / "catalog" / "users.parquet", columns=["user_id"]).to_pandas()["user_id"].to_numpy()
    picks = books.iloc[rng.choice(len(books), n_books, replace=False)]
    isbns = [f"97900{i:08d}" for i in range(n_books)]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "Books.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"])
        for isbn, row in zip(isbns, picks.itertuples(index=False), strict=True):
            year = "" if pd.isna(row.year) else str(int(row.year))
            w.writerow(
                [
                    isbn,
                    f"{row.title} (new edition {isbn[-4:]})",
                    "" if pd.isna(row.author) else row.author,
                    year,
                    "" if pd.isna(row.publisher) else row.publisher,
                ]
            )
    with (folder / "Ratings.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["User-ID", "ISBN", "Book-Rating"])
        for u, b, r in zip(
            rng.choice(users, n_ratings), rng.choice(isbns, n_ratings), rng.integers(0, 11, n_ratings), strict=True
        ):
            w.writerow([int(u), b, int(r)])


def run_once(run: Path, folder: Path, out: Path, cache: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    args = ["--model", str(run), "--input", str(folder), "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run([sys.executable, "-m", "train", "update", *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    record = json.loads((out / "update.json").read_text())
    source_bytes = sum(p.stat().st_size for p in run.rglob("*") if p.is_file() and "data" not in p.parts)
    return {
        "wall_seconds": round(wall, 1),
        "stages": record["seconds"],
        "counts": record["counts"],
        "item_graph": record["item_graph"],
        "version_bytes": record["bytes"],
        "source_model_bytes": source_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--books", type=int, default=1000)
    parser.add_argument("--ratings", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-update"))
    parser.add_argument("--repeat", action="store_true", help="run again with the embedding cache filled")
    parser.add_argument("--json", type=Path, help="append the result to this JSON file")
    args = parser.parse_args()
    folder, cache = args.work / f"input-{args.books}", args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    write_input(args.run, folder, args.books, args.ratings)
    results = {
        "books": args.books,
        "ratings": args.ratings,
        "cold_cache": run_once(args.run, folder, args.work / "v2", cache),
    }
    if args.repeat:
        results["warm_cache"] = run_once(args.run, folder, args.work / "v2", cache)
    print(json.dumps(results, indent=2))
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.write_text(json.dumps([*old, results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
