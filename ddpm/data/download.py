"""Resumable, retrying, checksummed downloads over HTTP(S), with the standard library only.

:func:`download` is the one entry point. A file already at its destination with the right md5
is used as is, without any network I/O. Otherwise bytes go to ``<dest>.part``: a broken
transfer is resumed from there with an HTTP ``Range`` request, a failed attempt is retried with
exponential backoff, and only a file whose md5 matches is renamed to ``dest``, so ``dest`` is
never a half file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ddpm.data.errors import ChecksumError, DownloadError, OfflineError
from ddpm.progress import Progress

CHUNK_BYTES = 1 << 16
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class _BrokenTransfer(OSError):
    """The connection closed before the announced number of bytes arrived."""


def md5sum(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its md5 is ``md5``."""
    actual = md5sum(path)
    if actual != md5.lower():
        raise ChecksumError(
            f"{path} is corrupt, truncated or not the expected file: its md5 is {actual}, "
            f"expected {md5.lower()}. Delete it and download it again"
        )


def download(
    url: str,
    dest: Path,
    md5: str,
    *,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with the right md5 is already there.

    Args:
        url: http(s) or file URL of the archive.
        dest: where the verified file ends up; ``<dest>.part`` holds a transfer in progress.
        md5: expected hex md5 of the whole file.
        retries: further attempts after the first; each resumes where the last one stopped.
        backoff: seconds before the first retry, doubled for each one after.
        timeout: seconds without an answer before an attempt fails.
        progress: a bar on stderr when it is a terminal, plain lines in a log.
        sleep: how to wait between attempts (tests pass a recorder).

    Returns:
        ``dest``.

    Raises:
        ChecksumError: ``dest`` exists with another md5, or the downloaded file has one (the
            partial file is then deleted, so the next attempt starts afresh).
        OfflineError: the server could not be reached (a host name that does not resolve fails
            at once, without retries); the message says where to put the file by hand.
        DownloadError: the server refused (HTTP 4xx) or every attempt broke off.
    """
    dest = Path(dest)
    if dest.exists():
        verify_md5(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error, attempts = _retry(
        lambda: _fetch_once(url, part, timeout, progress), url, retries, backoff, sleep
    )
    if error is not None:
        raise _failure(url, dest, md5, error, attempts)
    actual = md5sum(part)
    if actual != md5.lower():
        part.unlink()
        raise ChecksumError(
            f"{url} gave a file with md5 {actual}, expected {md5.lower()}, so it was not saved "
            f"as {dest}. Run again; if this mirror serves a different file, give its md5"
        )
    os.replace(part, dest)
    return dest


def _retry(
    fetch: Callable[[], None],
    url: str,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
) -> tuple[Exception | None, int]:
    """Call ``fetch`` until it succeeds or ``retries`` more calls have failed.

    Returns:
        (None, attempts) on success, else (the last error, attempts). A host name that does
        not resolve means no network: it is not retried.
    """
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            fetch()
            return None, attempt + 1
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRY_STATUS:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from exc
            error = exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, socket.gaierror):
                return exc, attempt + 1
            error = exc
        except (OSError, http.client.HTTPException) as exc:
            error = exc
    return error, retries + 1


def _failure(url: str, dest: Path, md5: str, error: Exception, attempts: int) -> DownloadError:
    """The error to raise after the last attempt: offline, or broken transfers."""
    by_hand = (
        f"download {url} on a machine with network and copy it to {dest} (md5 {md5}); "
        "it is then used as is"
    )
    tries = f"{attempts} attempt{'s' * (attempts > 1)}"
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return OfflineError(
            f"cannot reach {url} ({error.reason}) after {tries}. By hand: {by_hand}"
        )
    part = dest.with_name(dest.name + ".part")
    kept = f"; {part} keeps what arrived and the next run resumes from it" if part.exists() else ""
    return DownloadError(f"download of {url} failed after {tries}: {error}{kept}. Or: {by_hand}")


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: append to ``part`` from its current size (a Range request) to the end."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ddpm-data/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to send: the part is complete, the checksum will tell
        raise
    with response:
        offset = _resume_offset(response, offset, url)
        remaining = _content_length(response)
        total = None if remaining is None else offset + remaining
        received = _copy(response, part, offset, total, progress)
    if remaining is not None and received < remaining:
        raise _BrokenTransfer(f"connection closed after {offset + received} of {total} bytes")


def _resume_offset(response: http.client.HTTPResponse, offset: int, url: str) -> int:
    """Where this response's body starts: ``offset`` for a 206, 0 when the Range was ignored."""
    if response.status != 206:
        return 0
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != offset:
        raise DownloadError(
            f"{url} answered a request for bytes {offset}- with Content-Range "
            f"{response.headers.get('Content-Range')!r}; delete the .part file and retry"
        )
    return offset


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _copy(
    response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, progress: bool
) -> int:
    """Stream the body into ``part`` (appending from ``offset``); return the bytes received."""
    received = 0
    name = part.name.removesuffix(".part")
    bar = Progress(total, name, "B", initial=offset, unit_scale=True, enabled=progress)
    with bar, part.open("ab" if offset else "wb") as f:
        while chunk := response.read(CHUNK_BYTES):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received
