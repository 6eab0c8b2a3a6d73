"""One clear line instead of a traceback for the errors a user can fix, with one exit code
per kind: 2 for a bad params.yaml (a usage error), 1 for everything else (data, weights,
a diverged run).

This module imports no torch, so the command line can wrap every stage in it cheaply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

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


class InputsError(ValueError):
    """A stage's inputs (data, weights, settings) fail checks: every problem, one line each."""


USER_ERRORS = (
    InputsError,
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


T = TypeVar("T")


class Problems:
    """What is wrong with a stage's inputs, gathered before any work, so that one error names
    every problem instead of the first: ``load`` runs a loader and keeps its error as a
    problem (returning None), ``add`` takes the lines of a check, ``check`` raises them all.
    A params problem alone exits as one (2); anything else is an :class:`InputsError` (1)."""

    def __init__(self, stage: str) -> None:
        self.stage, self.lines, self.params_only = stage, [], True

    def load(self, loader: Callable[..., T], *args: object, **kwargs: object) -> T | None:
        try:
            return loader(*args, **kwargs)
        except (ParamsError, *USER_ERRORS) as exc:
            self.add([str(exc)], params=isinstance(exc, ParamsError))
            return None

    def add(self, lines: Iterable[str], params: bool = True) -> None:
        for line in lines:
            if line not in self.lines:
                self.lines.append(line)
                self.params_only &= params

    def check(self) -> None:
        if not self.lines:
            return
        kind = ParamsError if self.params_only else InputsError
        if len(self.lines) == 1:
            raise kind(self.lines[0])
        listed = "\n".join(f"  - {line}" for line in self.lines)
        raise kind(f"the {self.stage} stage cannot start, {len(self.lines)} problems:\n{listed}")


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
