"""What the retrieval model's dimension, negatives and temperature do: one variant per row.

    python bench/bench_retrieval.py --config configs/bookcrossing.yaml [--variant "retrieval.dim=32" ...]

Needs a run folder whose data, features, train and compress steps are done (``python -m train run``
or those steps alone). Every variant trains the towers from the same seed on the same training
interactions and is scored by the towers alone (no rerank) on the validation users: recall@10 over
the whole catalog minus each user's training books. Writes a Markdown table, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.artifacts import resolve_device  # noqa: E402
from train.config import load_config  # noqa: E402
from train.rating.dataset import load_training_data  # noqa: E402
from train.retrieval.step import fit_retrieval, new_retrieval_model  # noqa: E402

# One factor at a time around the defaults: vector width, temperature, in-batch negatives (batch
# size), the logQ correction, the id dropout that trains the content path.
DEFAULT_VARIANTS = [
    "",
    "retrieval.dim=32",
    "retrieval.dim=128",
    "retrieval.temperature=0.05",
    "retrieval.temperature=0.2",
    "retrieval.batch_size=1024",
    "retrieval.batch_size=4096",
    "retrieval.logq_correction=false",
    "retrieval.id_dropout=0.0",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bookcrossing.yaml")
    parser.add_argument("--set", action="append", default=[], help="override applied to every variant")
    parser.add_argument("--variant", action="append", help="space-separated overrides of one variant (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the table, JSON and PNG (default: run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    base = load_config(args.config, args.set)
    run_dir = Path(base.run_dir)
    out = args.out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    catalog, _, data = load_training_data(base, run_dir)
    device = resolve_device(base.train.device)
    rows = []
    for variant in args.variant or DEFAULT_VARIANTS:
        cfg = load_config(args.config, [*args.set, *variant.split()]).retrieval
        start = time.perf_counter()
        model = new_retrieval_model(catalog, cfg).to(device)
        result = fit_retrieval(model, catalog, data, cfg, progress=False)
        rows.append(
            {
                "variant": variant or "defaults",
                "val_recall@10": round(result.best_val_recall, 4),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.epochs),
                "seconds": round(time.perf_counter() - start, 1),
                "curve": [round(r[f"val_recall@{cfg.val_k}"], 4) for r in result.epochs],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    meta = {"device": str(device), "torch": torch.__version__, "config": args.config, "set": args.set}
    (out / "bench_retrieval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| variant | val recall@10 | best epoch | epochs run | seconds |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['variant']} | {r['val_recall@10']:.4f} | {r['best_epoch']} | {r['epochs_run']} | {r['seconds']} |"
        for r in rows
    ]
    table = "\n".join(lines)
    (out / "bench_retrieval.md").write_text(f"Device: {device}.\n\n{table}\n")
    plot(rows, out / "bench_retrieval.png")
    print(table)


def plot(rows: list[dict], path: Path) -> None:
    """Validation recall@10 per epoch of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        ax.plot(range(1, len(row["curve"]) + 1), row["curve"], "o-", label=row["variant"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation recall@10 (towers alone)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
