"""Scoring images with torch-fidelity: the feature extractors' weights, the reference cache,
and what the numbers can be trusted for. Shared by ``evaluate`` and ``frontier``.

The reference is a prepared split, served as a Dataset of uint8 (3, H, W) tensors at exactly
the training resolution. torch-fidelity caches its features under ``DDPM_FIDELITY_CACHE``
(default ``data/fidelity_cache``) by the name ``ref-<split sha256>-<split>-<weights>``, so a
second experiment on the same data, and every frontier point, skip them; the weights are part
of the name because torch-fidelity's own key names only the extractor, not its weights.

Inception weights: ``DDPM_INCEPTION_WEIGHTS`` or the top-level ``inception_weights`` name a
local file (offline machines); otherwise the official file is fetched from torch-fidelity's
URL into torch hub's cache, where torch-fidelity itself keeps it. Results from other weights
(the tests' locally built file) are labelled as not real FID/IS.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch_fidelity
import typer
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torchvision.models import VGG16_Weights

from ddpm.data.errors import DataError
from ddpm.errors import CheckpointError
from ddpm.files import file_sha256
from pipeline.runtime import pick_device
from pipeline.settings import PRC_NEIGHBORHOOD, EvaluateParams, Machine

PAPER_NUM_IMAGES = 10_000  # FID from fewer samples is biased upwards (Chong & Forsyth 2020)
DOWNLOAD_TIMEOUT_S = 60
KEYS = {  # torch-fidelity's result keys -> ours
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


class WeightsSource(NamedTuple):
    """Where a feature extractor's weights come from, and how a user supplies them instead."""

    extractor: str  # torch-fidelity's name of the feature extractor
    url: str
    param: str
    env: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix torch hub puts in the file name (``name-<prefix>.pth``)."""
        return self.filename.rsplit("-", 1)[-1].split(".")[0]


INCEPTION = WeightsSource(
    "inception-v3-compat",
    URL_INCEPTION_V3,
    "inception_weights",
    "DDPM_INCEPTION_WEIGHTS",
)
VGG16 = WeightsSource(
    "vgg16", VGG16_Weights.IMAGENET1K_V1.url, "evaluate.prc_weights", "DDPM_VGG16_WEIGHTS"
)


class FeatureWeightsError(CheckpointError):
    """A feature extractor's weights are neither in a local file nor downloadable."""


class ResolvedWeights(NamedTuple):
    path: Path
    official: bool  # the file torch-fidelity / torchvision publish (by its sha256)
    sha256: str

    @property
    def tag(self) -> str:
        return "official" if self.official else f"local{self.sha256[:12]}"


def resolve_weights(source: WeightsSource, configured: str | None) -> ResolvedWeights:
    """The weights file to use: the configured one, or the official one (downloaded if needed).

    Raises:
        FeatureWeightsError: naming the param, the environment variable and the URL.
    """
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FeatureWeightsError(
                f"{source.extractor} weights {path}: no such file (set by {source.env} or "
                f"{source.param}); point either at the weights file, or leave both empty to "
                f"download {source.url}"
            )
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / source.filename
        if not path.is_file():
            _download(source, path)
    digest = file_sha256(path)
    return ResolvedWeights(path, digest.startswith(source.hash_prefix), digest)


def _download(source: WeightsSource, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib would wait forever on a dead network
    try:
        torch.hub.download_url_to_file(
            source.url, str(path), hash_prefix=source.hash_prefix, progress=False
        )
    except Exception as exc:
        raise FeatureWeightsError(
            f"the {source.extractor} weights could not be downloaded from {source.url} "
            f"({type(exc).__name__}: {exc}). On a machine without network, copy that file "
            f"here and name it in the environment variable {source.env}=/path/to/"
            f"{source.filename} or the param {source.param}; or put it at {path}, where the "
            "download would have gone."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


class _UntrainedInception(FeatureExtractorInceptionV3):
    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None  # keep the random init instead of the (empty) state dict it is given


def write_untrained_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save torch-fidelity's Inception architecture with random weights: for tests and CI.

    Offline machines cannot download the real weights; this file lets evaluation run end to
    end there. Convolutions are He-initialised so features keep their scale through the
    network. Metrics from it are labelled "NOT real" in eval.json: it is not the official file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(f".{path.name}.empty")
    torch.save({}, empty)
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _UntrainedInception(INCEPTION.extractor, ["2048"], str(empty))
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        torch.save(model.state_dict(), path)
    finally:
        torch.set_rng_state(rng)
        empty.unlink()
    return path


class UInt8Images(Dataset):
    """uint8 (N, H, W, 3) images, a tensor or an array (a memory-mapped split stays on disk),
    as the uint8 (3, H, W) tensors torch-fidelity expects."""

    def __init__(self, images: torch.Tensor | np.ndarray) -> None:
        assert str(images.dtype) in ("torch.uint8", "uint8"), images.dtype
        assert images.ndim == 4 and images.shape[-1] == 3, images.shape
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.array(image))  # a writable copy of the one image
        return image.permute(2, 0, 1).contiguous()


class Extraction(NamedTuple):
    """One torch-fidelity call: a feature extractor, its weights and the metrics it gives."""

    source: WeightsSource
    weights: ResolvedWeights
    metrics: dict[str, bool]


def reference_cache_name(split_sha256: str, split: str, weights: ResolvedWeights) -> str:
    """torch-fidelity's cache name of a reference split's features under these weights."""
    return f"ref-{split_sha256[:16]}-{split}-{weights.tag}"


def fidelity(
    images: str | Dataset,
    reference: Dataset,
    cache_name: str,
    extraction: Extraction,
    e: EvaluateParams,
    seed: int,
    cache_root: Path,
    verbose: bool = True,
    kid_subset_size: int | None = None,
) -> dict[str, float]:
    """One torch_fidelity.calculate_metrics call (one feature extractor), keys renamed.

    Args:
        images: a folder of PNGs, or a Dataset of uint8 (3, H, W) tensors (never cached).
        reference: the real images, whose features are cached under ``cache_name``.
        kid_subset_size: instead of ``e.kid_subset_size`` (a set smaller than it).
    """
    cached = list(cache_root.glob(f"{cache_name}-*"))
    if verbose and cached:
        typer.echo(f"reference {cache_name}: reusing {len(cached)} cached files in {cache_root}")
    elif verbose:
        typer.echo(f"reference {cache_name}: computing its features (cached in {cache_root})")
    results = torch_fidelity.calculate_metrics(
        input1=images,
        input2=reference,
        input2_cache_name=cache_name,
        cache=True,
        cache_root=str(cache_root),
        feature_extractor=extraction.source.extractor,
        feature_extractor_weights_path=str(extraction.weights.path),
        cuda=pick_device(Machine()).type == "cuda",
        batch_size=e.batch_size,
        kid_subset_size=kid_subset_size or e.kid_subset_size,
        kid_subsets=e.kid_subsets,
        isc_splits=e.isc_splits,
        prc_neighborhood=PRC_NEIGHBORHOOD,
        rng_seed=seed,
        save_cpu_ram=True,  # no DataLoader worker processes: decoding small PNGs is cheap
        verbose=False,
        **extraction.metrics,
    )
    scores = {KEYS[k]: float(v) for k, v in results.items() if k in KEYS}
    bad = {k: v for k, v in scores.items() if not math.isfinite(v)}
    if bad:
        raise DataError(f"torch-fidelity returned non-finite metrics {bad}")
    return scores


def resolve_inception(machine: Machine, configured: str) -> ResolvedWeights:
    """The Inception weights of every FID: the environment's (``DDPM_INCEPTION_WEIGHTS``),
    else params.yaml's ``inception_weights`` (``configured``), else the download."""
    return resolve_weights(INCEPTION, machine.inception_weights or configured)


def plan(
    e: EvaluateParams, machine: Machine, inception: str, prc: bool | None = None
) -> list[Extraction]:
    """The extractions the chosen metrics need, weights resolved (or refused) before any work:
    ``inception`` is params.yaml's ``inception_weights`` (the environment's wins); ``prc``
    False leaves precision/recall out whatever ``e.prc`` says (the frontier)."""
    out = []
    if e.fid or e.isc or e.kid:
        weights = resolve_inception(machine, inception)
        out.append(Extraction(INCEPTION, weights, {"fid": e.fid, "isc": e.isc, "kid": e.kid}))
    if e.prc if prc is None else prc:
        weights = resolve_weights(VGG16, machine.vgg16_weights or e.prc_weights)
        out.append(Extraction(VGG16, weights, {"prc": True}))
    return out


RESIZE = (
    "torch-fidelity's TF-exact bilinear resize to 299 px (as clean-fid's legacy_tensorflow mode,"
    " not its default clean mode)"
)


def protocol(
    extractions: list[Extraction],
    images: str,
    reference: tuple[str, str, int],
    seeds: dict[str, Any],
) -> dict[str, Any]:
    """What the papers' protocol sections state, for the numbers these extractions give: the
    torch-fidelity version, each extractor's weights by sha256, the resize, the images handed
    over (``images``), the reference (split, its images' sha256, its count) and the seeds."""
    split, sha, count = reference
    return {
        "torch_fidelity": torch_fidelity.__version__,
        "feature_extractors": {x.source.extractor: x.weights.sha256 for x in extractions},
        "resize": RESIZE,
        "images": images,
        "reference_split": split,
        "reference_sha256": sha,
        "reference_images": count,
        "seeds": seeds,
    }


def label(extractions: list[Extraction], num_images: int) -> str:
    """How far the numbers can be trusted, in words, for eval.json."""
    local = [x.weights for x in extractions if not x.weights.official]
    if local:
        files = ", ".join(f"{w.path} (sha256 {w.sha256[:12]})" for w in local)
        return f"NOT real metrics: weights {files} are not the official ones; tests and CI only"
    if num_images < PAPER_NUM_IMAGES:
        return (
            f"indicative: {num_images} images (< {PAPER_NUM_IMAGES}); FID is biased upwards "
            "and not comparable with published figures"
        )
    return f"official weights, {num_images} images"
