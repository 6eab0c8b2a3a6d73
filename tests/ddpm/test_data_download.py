"""ddpm.data.download against a local HTTP server that breaks transfers and serves ranges."""

from __future__ import annotations

import hashlib
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ddpm.data.download import download, md5sum
from ddpm.data.errors import ChecksumError, DownloadError, OfflineError
from ddpm.data.sources import CIFAR10, TINY_IMAGENET, resolve_source

DATA = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(DATA).hexdigest()


def fetch(url: str, dest: Path, md5: str = MD5, **options: object) -> Path:
    return download(url, dest, md5, backoff=0.0, progress=False, timeout=5.0, **options)


def test_a_cut_transfer_resumes_from_the_partial_file_with_a_range_request(serve, tmp_path):
    server = serve(DATA, cut_first=1)
    dest = fetch(server.url, tmp_path / "a.bin")
    assert dest.read_bytes() == DATA
    assert server.ranges == [None, f"bytes={len(DATA) // 2}-"]
    assert server.bytes_sent < 2 * len(DATA)
    assert not (tmp_path / "a.bin.part").exists()


def test_failed_attempts_are_retried_with_exponential_backoff(serve, tmp_path):
    server = serve(DATA, fail_first=3)
    waits: list[float] = []
    download(server.url, tmp_path / "a.bin", MD5, backoff=0.01, sleep=waits.append, progress=False)
    assert waits == [0.01, 0.02, 0.04]
    assert len(server.ranges) == 4
    assert (tmp_path / "a.bin").read_bytes() == DATA


def test_giving_up_keeps_the_partial_file_and_the_next_run_resumes(serve, tmp_path):
    server = serve(DATA, cut_first=3)
    with pytest.raises(DownloadError, match=r"a\.bin\.part keeps what arrived") as info:
        fetch(server.url, tmp_path / "a.bin", retries=1)
    assert server.url in str(info.value) and "md5" in str(info.value)
    assert (tmp_path / "a.bin.part").stat().st_size == len(DATA) * 3 // 4
    fetch(server.url, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == DATA
    assert server.bytes_sent < 2 * len(DATA)


def test_a_server_that_ignores_range_restarts_the_file(serve, tmp_path):
    server = serve(DATA, cut_first=1, honour_range=False)
    assert fetch(server.url, tmp_path / "a.bin").read_bytes() == DATA
    assert server.ranges[1] is not None


def test_a_complete_partial_file_is_checked_not_fetched_again(serve, tmp_path):
    server = serve(DATA)
    (tmp_path / "a.bin.part").write_bytes(DATA)
    assert fetch(server.url, tmp_path / "a.bin").read_bytes() == DATA
    assert server.ranges == [f"bytes={len(DATA)}-"] and server.bytes_sent == 0


def test_a_checksum_mismatch_names_the_file_and_removes_the_download(serve, tmp_path):
    server = serve(DATA)
    with pytest.raises(ChecksumError, match=r"md5 [0-9a-f]{32}, expected 0{32}, .* as .*a\.bin"):
        fetch(server.url, tmp_path / "a.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_a_valid_file_already_present_means_no_network_io(serve, tmp_path, dead_url):
    server = serve(DATA)
    (tmp_path / "a.bin").write_bytes(DATA)
    fetch(server.url, tmp_path / "a.bin")
    fetch(dead_url, tmp_path / "a.bin")
    assert server.ranges == []


def test_a_corrupt_file_already_present_is_an_error_saying_what_to_do(tmp_path, dead_url):
    (tmp_path / "a.bin").write_bytes(DATA[:1000])
    with pytest.raises(ChecksumError, match=r"a\.bin is corrupt, truncated.*Delete it"):
        fetch(dead_url, tmp_path / "a.bin")


def test_no_server_is_an_offline_error_naming_the_url_the_path_and_the_md5(tmp_path, dead_url):
    with pytest.raises(OfflineError) as info:
        fetch(dead_url, tmp_path / "raw" / "a.bin", retries=1)
    message = str(info.value)
    assert dead_url in message and str(tmp_path / "raw" / "a.bin") in message and MD5 in message
    assert "after 2 attempts" in message


def test_a_host_that_does_not_resolve_is_not_retried(tmp_path, monkeypatch):
    calls = []

    def no_dns(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with pytest.raises(OfflineError, match="after 1 attempt"):
        fetch("http://example.invalid/a.bin", tmp_path / "a.bin", retries=4)
    assert len(calls) == 1


def test_a_missing_file_on_the_server_is_not_retried(serve, tmp_path):
    server = serve(DATA)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url + ".nope", tmp_path / "a.bin")
    assert len(server.ranges) == 1


def test_md5sum_reads_in_chunks(tmp_path):
    (tmp_path / "a.bin").write_bytes(DATA)
    assert md5sum(tmp_path / "a.bin", chunk_bytes=1000) == MD5


def test_resolve_source_uses_official_values_unless_overridden():
    assert resolve_source("cifar10-cars") == CIFAR10
    assert resolve_source("tiny-imagenet", url="http://mirror/x.zip").md5 == TINY_IMAGENET.md5
    assert resolve_source("cifar10", md5="A" * 32).md5 == "a" * 32
    assert resolve_source("synthetic") is None and resolve_source("imagefolder") is None
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of"):
        resolve_source("cifar")
