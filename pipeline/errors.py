"""One clear line instead of a traceback for the errors a user can fix, with one exit code
per kind: 2 for a bad params.yaml (a usage error), 1 for everything else (data, weights,
a diverged run).

This module imports no torch, so the command line can wrap every stage in it cheaply.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from pydantic import ValidationError

from ddpm.data.errors import ChecksumError, DataError, MissingArchiveError, OfflineError
from ddpm.errors import (
    CheckpointError,
    DeterminismError,
    NonFiniteLossError,
    NonFiniteSamplesError,
)

PARAMS_EXIT, ERROR_EXIT = 2, 1


class ParamsError(ValueError):
    """params.yaml is missing, not YAML, or fails validation."""


USER_ERRORS = (
    DataError,
    CheckpointError,
    DeterminismError,
    NonFiniteLossError,
    NonFiniteSamplesError,
)
HINTS = {
    OfflineError: "Or set `dataset: synthetic`: `make smoke` runs the whole pipeline offline.",
    MissingArchiveError: "Run `pipeline download` first.",
    ChecksumError: "An archive from a mirror with other contents needs its md5 in data.md5.",
}


@contextmanager
def stage_errors() -> Iterator[None]:
    """Turn a user-fixable error into ``error: <message>`` (and a hint) on stderr and an exit."""
    try:
        yield
    except (ParamsError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(PARAMS_EXIT) from None
    except USER_ERRORS as exc:
        hint = next((h for kind, h in HINTS.items() if isinstance(exc, kind)), "")
        print(f"error: {exc}" + (f"\n{hint}" if hint else ""), file=sys.stderr)
        raise typer.Exit(ERROR_EXIT) from None
