"""How the training commands end on bad input: one ``error:`` line on stderr naming the file and
exit 2; the traceback only with ``--verbose``."""

from __future__ import annotations

import sys

import yaml

# What reading a config can raise: a missing or unreadable file, a bad value or key, bad YAML.
CONFIG_ERRORS = (OSError, ValueError, yaml.YAMLError)


def config_problem(err: Exception, path: object) -> str:
    """One line for a config that cannot be read: a YAML error as FILE:LINE:COLUMN: PROBLEM."""
    if not isinstance(err, yaml.YAMLError):
        return str(err)
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}"


def fail(message: object, verbose: bool) -> int:
    """Print ``error: MESSAGE`` and return exit code 2; with ``verbose`` re-raise the exception being
    handled (call it from an ``except`` block), traceback and all."""
    if verbose:
        raise
    print(f"error: {message}", file=sys.stderr)
    return 2
