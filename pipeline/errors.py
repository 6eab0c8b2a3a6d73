"""One clear line instead of a traceback for the errors a user can fix."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from pydantic import ValidationError

from ddpm.checkpoint import CheckpointError
from ddpm.data.errors import DataError
from ddpm.train import NonFiniteLossError
from pipeline.settings import ParamsError

USER_ERRORS = (ParamsError, DataError, CheckpointError, NonFiniteLossError, ValidationError)


@contextmanager
def stage_errors() -> Iterator[None]:
    """Turn a user-fixable error into ``error: <message>`` on stderr and exit code 1."""
    try:
        yield
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from exc
