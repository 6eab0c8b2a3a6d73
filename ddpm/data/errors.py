"""The errors of :mod:`ddpm.data`: problems the user can fix, each message naming the file or
value at fault and what to do about it.

All derive from :class:`DataError`, itself a ``ValueError``, so a caller can catch one class and
print the message without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix (bad input, a bad file, no network)."""


class ArchiveError(DataError):
    """An archive is corrupt, truncated or not in the expected format."""


class MissingArchiveError(ArchiveError):
    """The archive a data set is prepared from is not on disk."""


class ChecksumError(ArchiveError):
    """A file's md5 differs from the expected one."""


class DownloadError(DataError):
    """A download failed after its retries."""


class OfflineError(DownloadError):
    """The source could not be reached at all (no network, DNS failure, connection refused)."""
