"""FID and KID during training (``train.fid``): the scorer :func:`ddpm.train.train` calls.

At each evaluation every process samples its share of the images from the EMA weights (image
i from the seed of (seed, i), so the set is the same whatever the number of processes), rank
0 gathers them in index order and scores them with torch-fidelity against the reference
split's cached features (the cache and the name the evaluate stage uses, so neither computes
them twice), and every process gets the scores back, so that best.pt and early stopping
decide alike everywhere. The numbers are FID/KID of ``num_images`` images: they compare along
the curve, not with evaluate's figures from more images (FID falls with the number).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ddpm.config import FidConfig
from ddpm.data.prepared import PreparedSplit
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import Distributed
from ddpm.generation import generate
from ddpm.pixels import to_uint8
from pipeline.fidelity import (
    INCEPTION,
    Extraction,
    UInt8Images,
    fidelity,
    reference_cache_name,
    resolve_inception,
)
from pipeline.settings import EvaluateParams, Machine

KID_SUBSET_SIZE = 1000  # KID's subsets: this many images, or all of them when fewer
KID_SUBSETS = 100  # params.yaml's evaluate.kid_subsets, not read (train never reads evaluate.*)
FEATURE_BATCH = 64  # images per Inception pass


def kid_subset_size(config: FidConfig) -> int:
    return min(KID_SUBSET_SIZE, config.num_images)


def fid_problems(config: FidConfig, reference: PreparedSplit) -> list[str]:
    """What the reference split cannot give ``train.fid``, one line each."""
    have, need = len(reference.images), kid_subset_size(config)
    if have >= need:
        return []
    return [
        f"train.fid.num_images={config.num_images} needs {need} {config.reference_split} images "
        f"for KID's subsets, and the prepared {config.reference_split} split has {have}: "
        f"lower train.fid.num_images to {have}, or set train.fid.reference_split to a larger "
        "split"
    ]


def fid_extraction(machine: Machine, inception: str) -> Extraction:
    """The Inception weights FID and KID use (the environment's, or params' inception_weights,
    or the download), resolved or refused (FeatureWeightsError) before training starts."""
    weights = resolve_inception(machine, inception)
    return Extraction(INCEPTION, weights, {"fid": True, "isc": False, "kid": True})


class TrainFid:
    """The scorer of ``train.fid``: ``(step, EMA network) -> {"fid", "kid_mean"}`` on every
    process (:data:`ddpm.train.Scorer`)."""

    def __init__(
        self,
        config: FidConfig,
        seed: int,
        diffusion: GaussianDiffusion,
        reference: PreparedSplit,
        extraction: Extraction,
        dist: Distributed,
        device: torch.device,
        cache_root: Path,
    ) -> None:
        self.config, self.seed, self.diffusion = config, seed, diffusion.to(device)
        self.dist, self.device, self.extraction = dist, device, extraction
        self.cache_root = cache_root
        split = config.reference_split
        sha = reference.manifest["splits"][split]["images_sha256"]
        self.cache_name = reference_cache_name(sha, split, extraction.weights)
        self.reference = UInt8Images(reference.images)
        self.settings = EvaluateParams(
            reference_split=split, fid=True, isc=False, kid=True, prc=False,
            kid_subset_size=kid_subset_size(config), kid_subsets=KID_SUBSETS, isc_splits=1,
            batch_size=FEATURE_BATCH, prc_weights="", repeats=1,
        )  # fmt: skip
        self.first = True

    def __call__(self, step: int, model: nn.Module) -> dict[str, float]:
        images = self.gather(self.sample(model))
        scores = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.dist.is_main:
            result = fidelity(
                UInt8Images(images), self.reference, self.cache_name, self.extraction,
                self.settings, self.seed, self.cache_root, verbose=self.first,
            )  # fmt: skip
            scores = torch.tensor([result["fid"], result["kid_mean"]], dtype=torch.float64)
        self.first = False
        fid, kid = self.dist.gather(scores.to(self.device))[:2].tolist()  # rank 0's
        return {"fid": fid, "kid_mean": kid}

    @torch.no_grad()
    def sample(self, model: nn.Module) -> torch.Tensor:
        """This process's images, uint8 (n, H, W, C): indices rank, rank + world, ..., padded
        with blanks to the same count on every process (the gather needs equal shapes)."""
        c, dist = self.config, self.dist
        mine = list(range(dist.rank, c.num_images, dist.world_size))
        share = math.ceil(c.num_images / dist.world_size)
        out = []
        for start in range(0, len(mine), c.batch_size):
            batch = mine[start : start + c.batch_size]
            x = generate(model, self.diffusion, batch, self.seed, c.sampler_config(),
                         device=self.device)  # fmt: skip
            out.append(to_uint8(x))
        cfg = model.config
        blank = torch.zeros(share - len(mine), cfg.image_size, cfg.image_size, cfg.in_channels,
                            dtype=torch.uint8)  # fmt: skip
        return torch.cat([*out, blank]).to(self.device)

    def gather(self, images: torch.Tensor) -> torch.Tensor:
        """Every process's images in index order on the CPU (rank 0 needs them; the others'
        copy is dropped): process r's j-th image is image r + j * world_size."""
        world, n = self.dist.world_size, self.config.num_images
        everyone = self.dist.gather(images).cpu()
        share = everyone.shape[0] // world
        order = [(i % world) * share + i // world for i in range(n)]
        return everyone[order]
