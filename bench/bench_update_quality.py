"""The catalog-update protocols of EVALUATION.md ("Catalog updates") on two finished runs.

    python -m train run --config C --set run_dir=runs/in                                  # trained-in
    python -m train run --config C --set run_dir=runs/out --set split.hold_out_cold_books=true
    python bench/bench_update_quality.py --trained-in runs/in --held-out runs/out --out bench/update_quality.json

Held-out books: the cold-test books are added to ``--held-out`` by an update and ranked by the same
readers as in ``--trained-in`` (cold-book and new-author recall@10); as a control, the same rows go
through an update of ``--trained-in`` itself. Fresh reads: ``--trained-in``'s
warm-test readers with validation reads, before and after an update that adds those reads.
Versions are written under ``--work`` (a temporary folder unless given).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import layout  # noqa: E402
from model.artifacts import ModelFolder  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data.tables import load_tables  # noqa: E402
from train.evaluation.topk import CONTENT_NAME, MODEL_NAME  # noqa: E402
from train.evaluation.updates import (  # noqa: E402
    cold_books,
    fresh_readers,
    warm_recall,
    write_books_update,
    write_reads_update,
)
from train.run_folder import machine  # noqa: E402
from train.update.build import build_version  # noqa: E402


def held_out_books(trained_in: Path, held_out: Path, work: Path, seed: int) -> dict:
    _, books, ratings = load_tables(held_out)
    if not ratings.equals(load_tables(trained_in)[2]):
        raise SystemExit(f"{trained_in} and {held_out} were not split from the same ratings")
    n = write_books_update(books, ratings, work / "books-input")
    start = time.perf_counter()
    record = build_version(held_out, work / "books-input", work / "held-out-updated")
    seconds = time.perf_counter() - start
    before = cold_books(ModelFolder(trained_in).load(), ratings, seed)
    after = cold_books(ModelFolder(work / "held-out-updated").load(), ratings, seed)
    # Control: the same rows given to the trained-in run re-embed its cold books through the update's
    # path with its own networks; a difference here is the update's, the rest the other training's.
    build_version(trained_in, work / "books-input", work / "trained-in-updated")
    control = cold_books(ModelFolder(work / "trained-in-updated").load(), ratings, seed)
    out = {"books_added": n, "update_seconds": round(seconds, 1), "update_counts": record["counts"]}
    for protocol in before:
        a, b = before[protocol], after[protocol]
        if not a or not b or not control[protocol]:
            out[protocol] = {"note": "no reader of these books in the split", "trained_in": a, "added_by_update": b}
            continue
        out[protocol] = {
            "trained_in": a[MODEL_NAME],
            "added_by_update": b[MODEL_NAME],
            "difference": round(b[MODEL_NAME]["recall@10"] - a[MODEL_NAME]["recall@10"], 5),
            "trained_in_updated_with_the_same_rows": control[protocol][MODEL_NAME],
            "control_difference": round(control[protocol][MODEL_NAME]["recall@10"] - a[MODEL_NAME]["recall@10"], 5),
            CONTENT_NAME: a[CONTENT_NAME],
            "random": a["random"],
        }
    return out


def fresh_reads(trained_in: Path, work: Path) -> dict:
    ratings = load_tables(trained_in)[2]
    n = write_reads_update(ratings, "val", work / "reads-input")
    start = time.perf_counter()
    build_version(trained_in, work / "reads-input", work / "reads-updated")
    seconds = time.perf_counter() - start
    readers = fresh_readers(ratings)
    return {
        "ratings_added": n,
        "update_seconds": round(seconds, 1),
        "readers": len(readers),
        "stale": warm_recall(ModelFolder(trained_in).load(), ratings, readers),
        "updated": warm_recall(ModelFolder(work / "reads-updated").load(), ratings, readers),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained-in", type=Path, required=True, help="a run with the cold books in its catalog")
    parser.add_argument("--held-out", type=Path, required=True, help="the same config with hold_out_cold_books")
    parser.add_argument("--work", type=Path, default=None, help="where the updated versions go")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.trained_in / "config.yaml")
    held_cfg = load_config(args.held_out / "config.yaml")
    if not held_cfg.split.hold_out_cold_books or cfg.split.hold_out_cold_books:
        raise SystemExit("--held-out needs split.hold_out_cold_books=true and --trained-in false")
    with tempfile.TemporaryDirectory(prefix="bookrec-update-quality-") as scratch:
        work = args.work or Path(scratch)
        report = {
            "encoder": ModelFolder(args.trained_in).read_json(layout.FEATURES_REPORT)["encoder"],
            "held_out_books": held_out_books(args.trained_in, args.held_out, work, cfg.split.seed),
            "fresh_reads": fresh_reads(args.trained_in, work),
            "machine": machine(),
        }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
