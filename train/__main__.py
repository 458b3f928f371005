"""Command line: ``python -m train STEP --config FILE``, STEP one of run, data, distill, features, train,
compress, retrieval, ranking, evaluate.

Commands with their own flags: ``python -m train sweep --config FILE --trials N``
(hyper-parameter sweep, ``train/experiments/sweep.py``), ``python -m train update --model SRC
--input DIR --out DIR`` (a catalog update without retraining, ``train/update/``) and
``python -m train export-encoder RUN`` (the encoder's TorchScript serving form for a run saved
before it existed, ``train/features/scripted.py``). The drift check of served traffic against the
training data is ``python -m serving.drift``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from train.cli import CONFIG_ERRORS, config_problem, fail
from train.config import Config, load_config
from train.data.download import DatasetUnavailable
from train.data.ingest import DataError
from train.features.encoders import EncoderUnavailable
from train.run_record import ConfigDiffers

TOOLS = ("sweep", "update", "export-encoder")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return _tool(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    from train.steps import STEPS, StepNotReady, run_all, run_step

    parser.add_argument(
        "step",
        choices=("run", *STEPS, *TOOLS),
        help="'run' does every step in order; 'sweep' has its own --help",
    )
    parser.add_argument(
        "--config", help=f"YAML config (missing keys take defaults; the default run folder is {Config().run_dir})"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. train.epochs=5",
    )
    parser.add_argument("--run-dir", help="shortcut for --set run_dir=DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="a traceback with every error")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # TorchScript and friends announce their deprecation on every call; the run report says what was used.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    overrides = args.set + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    try:
        cfg = load_config(args.config, overrides)
    except CONFIG_ERRORS as err:
        return fail(f"bad config: {config_problem(err, args.config)}", args.verbose)

    try:
        if args.step == "run":
            result = run_all(cfg, progress=not args.quiet)
        else:
            result = run_step(args.step, cfg, progress=not args.quiet)
    except (DatasetUnavailable, DataError, EncoderUnavailable, StepNotReady, ConfigDiffers) as err:
        return fail(err, args.verbose)
    print(json.dumps({"run_dir": cfg.run_dir, args.step: result}, indent=2, default=str))
    return 0


def _tool(name: str, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if name == "update":
        from train.update.cli import main as tool
    elif name == "export-encoder":
        from train.features.scripted import main as tool
    else:
        from train.experiments.sweep import main as tool

    return tool(argv)


if __name__ == "__main__":
    sys.exit(main())
