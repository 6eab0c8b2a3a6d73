"""The library's errors a user can act on; each message names the file or value and the fix.

Kept free of torch so that the command line can name them without importing it.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or from an incompatible configuration."""


class ConversionError(CheckpointError):
    """Published weights (diffusers, improved-diffusion), or one of our models, that the other
    side cannot hold exactly."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


class NonFiniteSamplesError(RuntimeError):
    """A sampler produced NaN or infinite values (a diverged model or sampler)."""


class DeterminismError(RuntimeError):
    """``deterministic`` was asked for and cannot be had on this machine or with this setting."""
