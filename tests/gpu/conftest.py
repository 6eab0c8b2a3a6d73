"""tests/gpu: the CUDA path. Always collected, skipped without CUDA.

``DDPM_GPU_TESTS_DEVICE=cpu`` runs them on the CPU instead: the GPU check's dry run
(``make gpu-check-dry``) does, so that the tests themselves are proven before a GPU is lent.
"""

from __future__ import annotations

import os

import pytest
import torch

# As a train stage with train.deterministic does before its first CUDA call: cuBLAS reads its
# workspace setting once per process, and earlier tests in this one use cuBLAS already.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA, or the device DDPM_GPU_TESTS_DEVICE names; the test is skipped otherwise."""
    forced = os.environ.get("DDPM_GPU_TESTS_DEVICE")
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (DDPM_GPU_TESTS_DEVICE=cpu runs these on the CPU)")
    return torch.device("cuda")
