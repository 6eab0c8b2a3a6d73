"""Fake data sources in the publishers' real formats, and a local HTTP server to fetch them from.

- :func:`make_cifar10_archive`: ``cifar-10-python.tar.gz`` with ``cifar-10-batches-py/``
  holding pickled batches exactly as the 2009 archive does (protocol 2, byte-string keys,
  ``numpy.core.multiarray`` globals), but few images whose pixels encode their label, row,
  column and id.
- :func:`make_tiny_imagenet_zip`: ``tiny-imagenet-200.zip`` with wnids.txt, words.txt,
  ``train/<wnid>/images/*.JPEG``, ``val/images`` + ``val/val_annotations.txt`` and
  ``test/images``, one solid colour per class and one greyscale JPEG.
- :class:`ArchiveServer`: serves bytes on 127.0.0.1, honours ``Range``, can answer 503 or cut
  a response midway, and records every request.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
TINY_WNIDS = ("n02124075", "n01443537", "n01629819")  # deliberately not sorted, like the real file
TINY_WORDS = {
    "n00001740": "entity",
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n02124075": "Egyptian cat",
}
TINY_COLOURS = {
    "n01443537": (128, 128, 128),
    "n01629819": (220, 40, 40),
    "n02124075": (30, 60, 200),
}


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def cifar10_row(label: int, image_id: int) -> np.ndarray:
    """One 3072-byte CIFAR row: R = 20 * label, G = 8 * row, B = 8 * column, except B[0, :2]
    which holds the image id in base 256 (so every image is unique)."""
    red = np.full((32, 32), 20 * label, dtype=np.uint8)
    green = np.repeat((8 * np.arange(32, dtype=np.uint8))[:, None], 32, axis=1)
    blue = np.repeat((8 * np.arange(32, dtype=np.uint8))[None, :], 32, axis=0)
    blue[0, 0], blue[0, 1] = image_id // 256, image_id % 256
    return np.concatenate([red.ravel(), green.ravel(), blue.ravel()])


def _py2_pickle(obj: object) -> bytes:
    """Protocol 2 with the numpy module names of the 2009 pickles."""
    return pickle.dumps(obj, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar10_archive(path: Path, per_batch: int = 40, seed: int = 0) -> str:
    """Write a CIFAR-10 python tar.gz with ``per_batch`` images per batch (a multiple of 10,
    every class equally often in every batch); return its md5."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for b, name in enumerate(names):
            labels = rng.permutation(np.arange(per_batch) % 10).tolist()
            ids = range(b * per_batch, (b + 1) * per_batch)
            batch = {
                b"batch_label": f"{name} of 5".encode(),
                b"labels": labels,
                b"data": np.stack(
                    [cifar10_row(lab, i) for lab, i in zip(labels, ids, strict=True)]
                ),
                b"filenames": [f"img_{i}.png".encode() for i in ids],
            }
            _tar_add(tar, f"cifar-10-batches-py/{name}", _py2_pickle(batch))
        meta = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
        _tar_add(tar, "cifar-10-batches-py/batches.meta", _py2_pickle(meta))
        _tar_add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    return md5_of(path)


def _jpeg(colour: tuple[int, int, int], grey: bool = False) -> bytes:
    image = Image.new("RGB", (64, 64), colour)
    buffer = io.BytesIO()
    (image.convert("L") if grey else image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_tiny_imagenet_zip(path: Path, per_class: int = 4, val_per_class: int = 2) -> str:
    """Write a Tiny ImageNet-shaped zip over :data:`TINY_WNIDS`; return its md5.

    The first training image of the grey class (n01443537) is a greyscale JPEG.
    """
    root = "tiny-imagenet-200/"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(root, b"")
        zf.writestr(root + "wnids.txt", "\n".join(TINY_WNIDS) + "\n")
        zf.writestr(root + "words.txt", "".join(f"{k}\t{v}\n" for k, v in TINY_WORDS.items()))
        for wnid in TINY_WNIDS:
            zf.writestr(f"{root}train/{wnid}/{wnid}_boxes.txt", "")
            for k in range(per_class):
                grey = wnid == "n01443537" and k == 0
                zf.writestr(
                    f"{root}train/{wnid}/images/{wnid}_{k}.JPEG", _jpeg(TINY_COLOURS[wnid], grey)
                )
        lines = []
        for k in range(val_per_class * len(TINY_WNIDS)):
            wnid = TINY_WNIDS[k % len(TINY_WNIDS)]
            zf.writestr(f"{root}val/images/val_{k}.JPEG", _jpeg(TINY_COLOURS[wnid]))
            lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        zf.writestr(root + "val/val_annotations.txt", "\n".join(lines) + "\n")
        zf.writestr(root + "test/images/test_0.JPEG", _jpeg((0, 0, 0)))
    return md5_of(path)


class ArchiveServer:
    """Serves ``data`` at ``/<name>`` on 127.0.0.1 (a free port) in a background thread.

    Args:
        data: the file's bytes.
        fail_first: answer the first this many requests with 503.
        cut_first: of the successful responses, send only half the body for this many: the
            headers announce the full Content-Length, then the connection closes.
        honour_range: serve ``Range: bytes=N-`` with 206; otherwise ignore it (200, whole file).

    Attributes:
        ranges: the Range header of every request (None where absent), in order.
        bytes_sent: body bytes written over all responses.
    """

    def __init__(
        self,
        data: bytes,
        name: str = "archive.bin",
        *,
        fail_first: int = 0,
        cut_first: int = 0,
        honour_range: bool = True,
    ) -> None:
        self.data, self.name = data, name
        self.fail_first, self.cuts_left, self.honour_range = fail_first, cut_first, honour_range
        self.ranges: list[str | None] = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.archive = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{self.name}"

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        server: ArchiveServer = self.server.archive  # type: ignore[attr-defined]
        with server.lock:
            server.ranges.append(self.headers.get("Range"))
            failing = len(server.ranges) <= server.fail_first
        if self.path != f"/{server.name}":
            self.send_error(404)
        elif failing:
            self.send_error(503)
        else:
            self._send(server)

    def _send(self, server: ArchiveServer) -> None:
        total = len(server.data)
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and server.honour_range else 0
        if start >= total and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{total}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        self.send_header("Content-Length", str(total - start))
        self.end_headers()
        body = server.data[start:]
        with server.lock:
            if server.cuts_left > 0:
                server.cuts_left -= 1
                body = body[: len(body) // 2]
            server.bytes_sent += len(body)
        self.wfile.write(body)
        self.close_connection = True
