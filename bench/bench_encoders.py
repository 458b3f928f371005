"""What each run's text encoder costs: embedding throughput, one new book's latency, archive size and load time.

    .venv/bin/python bench/bench_encoders.py --runs runs/bc-random runs/bc-minilm runs/bc-distilled \\
        --out bench/encoders.json

Every run's encoder (the copy in its run folder, as the archive ships it) embeds the same catalog
book texts in the same process, in turn, length-sorted batches of 256 as the features step does
(texts/s), and one text at a time as a rate request with one new book does (ms per text). Then the
run is archived and the engine the handler builds is loaded from the unpacked archive (seconds).
Ratios are against the first run, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handlers.engine import BookrecEngine  # noqa: E402
from model import layout  # noqa: E402
from model.encoder import load_saved_encoder  # noqa: E402
from model.text import book_texts  # noqa: E402
from serving.archive import build_archive  # noqa: E402
from train.run_folder import machine  # noqa: E402


def throughput(run: Path, texts: list[str], singles: int, rounds: int) -> dict:
    encoder = load_saved_encoder(run / layout.ENCODER_DIR)
    encoder.embed(texts[:256])  # warm-up
    batch = []
    for _ in range(rounds):
        start = time.perf_counter()
        encoder.embed(texts, batch_size=256)
        batch.append(len(texts) / (time.perf_counter() - start))
    one = []
    for text in texts[:singles]:
        start = time.perf_counter()
        encoder.embed([text], batch_size=1)
        one.append((time.perf_counter() - start) * 1000)
    return {
        "encoder": encoder.source,
        "dim": encoder.dim,
        "layers": int(encoder.model.config.num_hidden_layers),
        "texts_per_s": round(max(batch), 1),
        "one_text_ms_p50": round(statistics.median(one), 2),
    }


def archive_cost(run: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        # Runs trained before a model/ change still measure what an archive of them costs.
        mar = build_archive(run, Path(tmp) / "store", workers=1, allow_code_change=True)
        built = time.perf_counter() - start
        size = mar.stat().st_size
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(Path(tmp) / "unpacked")
        start = time.perf_counter()
        BookrecEngine(Path(tmp) / "unpacked")
        loaded = time.perf_counter() - start
    return {"mar_mb": round(size / 2**20, 1), "archive_s": round(built, 1), "engine_load_s": round(loaded, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--texts", type=int, default=2000, help="catalog book texts embedded per round")
    parser.add_argument("--singles", type=int, default=200, help="texts embedded one at a time")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    books = pd.read_parquet(args.runs[0] / layout.catalog_path(layout.BOOKS_FILE))
    texts = book_texts(books.sample(min(args.texts, len(books)), random_state=0))
    rows = {}
    for run in args.runs:
        rows[str(run)] = {**throughput(run, texts, args.singles, args.rounds), **archive_cost(run)}
        print(json.dumps({str(run): rows[str(run)]}), flush=True)
    base = next(iter(rows.values()))
    for row in rows.values():
        row["texts_per_s_vs_first"] = round(row["texts_per_s"] / base["texts_per_s"], 3)
    result = {"machine": machine(), "torch_threads": torch.get_num_threads(), "texts": len(texts), "runs": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
