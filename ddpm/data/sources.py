"""Where the archived data sets come from: official URLs, file names and published checksums.

The md5 sums are the ones torchvision and the data sets' users publish for these exact files
(CIFAR-10: ``torchvision.datasets.CIFAR10.tgz_md5``; Tiny ImageNet: 248,100,043 bytes).
A mirror serving the same file needs only its URL; a repackaged archive also needs its md5.
"""

from __future__ import annotations

from typing import NamedTuple


class Source(NamedTuple):
    """One downloadable archive."""

    url: str
    filename: str
    md5: str


CIFAR10 = Source(
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    filename="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
)
TINY_IMAGENET = Source(
    url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    filename="tiny-imagenet-200.zip",
    md5="90528d7ca1a48142e341f4ef8d21d0de",
)

DATASETS = ("cifar10-cars", "cifar10", "tiny-imagenet", "imagefolder", "synthetic")
"""Every data set :func:`ddpm.data.build_dataset` knows."""

ARCHIVES: dict[str, Source] = {
    "cifar10-cars": CIFAR10,
    "cifar10": CIFAR10,
    "tiny-imagenet": TINY_IMAGENET,
}
"""The data sets that come from a downloaded archive."""

NATIVE_SIZES: dict[str, int] = {"cifar10-cars": 32, "cifar10": 32, "tiny-imagenet": 64}
"""Published resolution in pixels; these data sets are prepared at it or downscaled, never
upscaled (an upscaled image adds no detail, only a misleading resolution)."""


def resolve_source(dataset: str, url: str = "", md5: str = "") -> Source | None:
    """The archive ``dataset`` is prepared from, with a mirror URL or checksum overriding.

    Args:
        dataset: one of :data:`DATASETS`.
        url: a mirror of the archive; empty for the official URL.
        md5: the archive's md5; empty for the published one (right for a faithful mirror).

    Returns:
        The source, or None for a data set that needs no download (imagefolder, synthetic).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    official = ARCHIVES.get(dataset)
    if official is None:
        return None
    return Source(url or official.url, official.filename, (md5 or official.md5).lower())
