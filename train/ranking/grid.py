"""The item graph's settings on validation: the ranking step rerun per (alpha, beta, neighbours).

    python -m train.ranking.grid --config configs/bookcrossing.yaml --run-dir runs/bookcrossing \\
        --alpha 0.5 1 --beta 0 0.3 --neighbours 100 200

Each setting refits the graph and the ranker on the same val readers and reports the stop
readers' recall@10 (what a choice may read) next to the report readers' (what it would ship);
the table goes to ``RUN/ranking_grid.json``. The run folder is left with the last setting's
ranking files and no manifest (its record still names the ranking step's last run): rerun
``python -m train ranking`` with the chosen one afterwards. Bad input (config, a run folder without
the retrieval step's files) is one ``error:`` line and exit 2 (``--verbose``: the traceback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

from model import layout
from train.cli import CONFIG_ERRORS, config_problem, fail
from train.config import load_config
from train.ranking.step import step_ranking
from train.run_context import RunContext
from train.steps import StepNotReady, check_ready

log = logging.getLogger("bookrec.ranking")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--verbose", action="store_true", help="a traceback with every error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, [*args.overrides, f"run_dir={args.run_dir}"])
    except CONFIG_ERRORS as err:
        return fail(f"bad config: {config_problem(err, args.config)}", args.verbose)
    try:
        check_ready("ranking", args.run_dir)
    except StepNotReady as err:
        return fail(err, args.verbose)
    (args.run_dir / layout.MANIFEST_FILE).unlink(missing_ok=True)  # its ranking files are about to change
    rows = []
    for alpha, beta, neighbours in itertools.product(args.alpha, args.beta, args.neighbours):
        ranking = cfg.ranking.replace(graph_alpha=alpha, graph_beta=beta, graph_neighbours=neighbours, ablation=False)
        out = step_ranking(RunContext(cfg.replace(ranking=ranking), args.run_dir), progress=False)
        fp32 = out["compression"]["variants"]["fp32"]
        rows.append(
            {
                "alpha": alpha,
                "beta": beta,
                "neighbours": neighbours,
                "graph_edges": out["graph_edges"],
                "stop_recall@10": fp32["recall@10"],
                "stop_ndcg@10": fp32["ndcg@10"],
                "report_recall@10": out["ranker_fp32_unpenalised"]["recall@10"],
                "graph_share_of_val_reads": out["recall_by_source"]["graph"],
                "union_share_of_val_reads": out["recall_by_source"]["union"],
                "seconds": out["seconds"],
            }
        )
        log.info("graph grid: %s", rows[-1])
        (args.run_dir / "ranking_grid.json").write_text(json.dumps(rows, indent=2) + "\n")
    best = max(rows, key=lambda r: r["stop_recall@10"])
    print(json.dumps({"best_on_stop_readers": best, "grid": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
