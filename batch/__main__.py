"""``python -m batch --model RUN --output OUT [...]``: exit 0 done, 2 bad flags/input, 1 job failed."""

from __future__ import annotations

import json
import sys

from batch.console import setup_logging


def main(argv: list[str] | None = None) -> int:
    # Before Beam is imported (the plan imports it): its import-time warnings meet the console
    # filter already, so this one flag is looked at ahead of the plan.
    setup_logging(verbose="--verbose" in (sys.argv[1:] if argv is None else argv))
    from batch.options import BatchUsageError
    from batch.pipeline import JobFailed, run
    from batch.plan import plan_job

    try:
        summary = run(plan_job(argv))
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
    sys.exit(main())
