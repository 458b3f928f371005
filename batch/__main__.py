"""``python -m batch --model RUN --output OUT [...]``: exit 0 done (or ``--help``), 2 bad flags/input,
1 job failed, 130/143 stopped by Ctrl-C/SIGTERM."""

from __future__ import annotations

import json
import logging
import sys

from batch.console import setup_logging
from batch.signals import Interrupted, stop_on_signals


def main(argv: list[str] | None = None) -> int:
    with stop_on_signals():
        try:
            return _main(argv)
        except Interrupted as err:
            print(f"python -m batch: stopped by {err.name}{'; ' + err.detail if err.detail else ''}", file=sys.stderr)
            return err.exit_code


def _main(argv: list[str] | None) -> int:
    # Before Beam is imported (the plan imports it): its import-time warnings meet the console
    # filter already, so this one flag is looked at ahead of the plan.
    setup_logging(verbose="--verbose" in (sys.argv[1:] if argv is None else argv))
    from batch.options import BatchUsageError
    from batch.pipeline import JobFailed, run
    from batch.plan import plan_job

    try:
        summary = run(plan_job(argv))
    except SystemExit as err:  # --help printed
        return err.code or 0
    except BatchUsageError as err:
        if str(err):
            print(f"python -m batch: error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"python -m batch: job failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    code = main()
    if code > 128:
        # Stopped: a runner's client torn down at exit (Dask's) would log the workers it lost.
        logging.disable(logging.CRITICAL)
    sys.exit(code)
