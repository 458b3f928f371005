"""``python -m batch --model RUN --output OUT [...]``: exit 0 done, 2 bad flags/input, 1 job failed."""

from __future__ import annotations

import json
import logging
import sys


def _not_apitools(record: logging.LogRecord) -> bool:
    """Beam warns on import that the optional GCP client libraries are missing; not our business."""
    return "apitools not found" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addFilter(_not_apitools)
    for noisy in ("apache_beam", "distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from batch.options import BatchUsageError, parse
    from batch.pipeline import JobFailed, run

    try:
        args = parse(argv)
        summary = run(args)
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
