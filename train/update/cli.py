"""``python -m train update --model SRC --input DIR --out DIR [--version V]``: write a new model
version (see ``train/update/build.py``); archive it with ``python -m serving.archive``.

Errors (bad input, a source that does not verify, an existing ``--out``) are one line on stderr,
exit 2, and nothing is written. The rows skipped are counted and named on stderr and in
``update.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.artifacts import ModelFolderError
from train.data.ingest import DataError
from train.update.build import UpdateError, build_version

SHOWN = 20  # skipped rows printed (update.json names up to NAMED_MAX)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="run folder, version folder or .mar to update")
    parser.add_argument("--input", required=True, type=Path, help="folder of Books/Users/Ratings CSVs, withdrawn.txt")
    parser.add_argument("--out", required=True, type=Path, help="the new version folder (must not exist)")
    parser.add_argument("--version", help="the new version's label (default: the source's + 1)")
    parser.add_argument("--cache", type=Path, help="embedding cache (default: the config's encoder.cache_dir)")
    parser.add_argument("--verbose", action="store_true", help="a traceback with an error")
    args = parser.parse_args(argv)
    try:
        record = build_version(args.model, args.input, args.out, version=args.version, cache_dir=args.cache)
    except (DataError, UpdateError, ModelFolderError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    for entry in record["rejected"][:SHOWN]:
        print(f"skipped: {entry}", file=sys.stderr)
    if record["bad_rows"] > SHOWN:
        print(f"skipped: ... {record['bad_rows']} in all (update.json names them)", file=sys.stderr)
    summary = {k: record[k] for k in ("version", "counts", "bad_rows", "item_graph", "seconds", "bytes")}
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0
