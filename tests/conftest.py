"""Shared fixtures. Data-source fakes live in ``tests/archives.py`` (importable as ``archives``
because pytest puts this folder on ``sys.path`` for its conftest)."""

from __future__ import annotations

import os

# Under pytest-xdist each worker shares the cores with the others: numpy's OpenBLAS, which
# reads this once as numpy loads, then runs one thread rather than one a core that the other
# worker's threads fight for (FID's eigenvalues of a 2048 x 2048 matrix took 5.9 s on two
# contended threads and 3.2 s on one; torch gets one thread a test from `one_thread` below)
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from archives import ArchiveServer, make_cifar10_archive, make_tiny_imagenet_zip
from tiny import tiny_unet

from ddpm.checkpoint import save_checkpoint, weights_payload
from ddpm.config import DiffusionConfig
from ddpm.ema import EMA
from ddpm.unet import UNet

# `make test` runs the files on two pytest-xdist workers (whole files, --dist loadfile, in this
# order: --no-loadscope-reorder), each worker taking the next file as it runs out. The longest
# files first, each at once on a worker of its own; last, the smoke experiments that wait for
# the smoke project test_smoke.py's worker builds first (tests/smoke_project.py), long built by
# then, and that, small, even out the two workers' ends.
SLOWEST_FIRST = ("test_smoke.py", "test_gpu_check.py")
LAST = ("test_smoke_experiments.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    rank |= {name: len(rank) + 1 + i for i, name in enumerate(LAST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The test file's own copy of the session's smoke project, as every stage ran
    (tests/smoke_project.py: built once, whichever worker asks first)."""
    from smoke_project import built, copy_project

    return copy_project(built(tmp_path_factory), tmp_path_factory.mktemp("smoke") / "project")


@pytest.fixture(scope="module")
def as_built(tmp_path_factory) -> Path:
    """Another copy for the test file, without the MLflow store: a teammate's checkout of the
    same commit."""
    from smoke_project import built, copy_project

    dest = tmp_path_factory.mktemp("as-built") / "project"
    return copy_project(built(tmp_path_factory), dest, mlflow=False)


@pytest.fixture
def cifar10_archive(tmp_path: Path) -> tuple[Path, str]:
    """A small CIFAR-10 python archive in the real format (40 images a batch) and its md5."""
    path = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    return path, make_cifar10_archive(path)


@pytest.fixture
def tiny_imagenet_archive(tmp_path: Path) -> tuple[Path, str]:
    """A small Tiny ImageNet zip in the real layout (3 classes) and its md5."""
    path = tmp_path / "mirror" / "tiny-imagenet-200.zip"
    return path, make_tiny_imagenet_zip(path)


@pytest.fixture
def serve() -> Iterator[Callable[..., ArchiveServer]]:
    """Start :class:`archives.ArchiveServer` instances; all are stopped after the test."""
    servers: list[ArchiveServer] = []

    def start(data: bytes, **options: object) -> ArchiveServer:
        servers.append(ArchiveServer(data, **options).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__()


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file of torch-fidelity's Inception architecture with random weights, built
    without a download (metrics from it are NOT real FID/IS)."""
    from pipeline.fidelity import write_untrained_inception_weights

    root = tmp_path_factory.mktemp("inception")
    return write_untrained_inception_weights(root / "inception-untrained.pth")


@pytest.fixture
def tiny_checkpoint() -> Callable[..., Path]:
    """Save a tiny 16-pixel UNet (random, non-zero output) as ``models/ema.pt`` would be."""

    def make(path: Path, num_classes: int | None = None, timesteps: int = 20, **extra) -> Path:
        unet = tiny_unet(num_classes=num_classes)
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        model = UNet(unet)
        with torch.no_grad():  # zero-initialised output convs would hide the time and labels
            for param in model.parameters():
                param.add_(torch.randn_like(param), alpha=0.05)
        torch.set_rng_state(generator_state)
        class_names = [f"c{i}" for i in range(num_classes or 0)]
        diffusion = DiffusionConfig(timesteps=timesteps)
        payload = weights_payload(7, unet, diffusion, EMA(model), model, class_names)
        del payload["model"]  # only EMA weights, like a file from before raw weights were kept
        save_checkpoint({**payload, **extra}, path)
        return path

    return make


@pytest.fixture
def strict_mode_restored():
    """use_deterministic_algorithms is process-wide: put back what the test changed."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests use tiny models, which run faster on one thread than on two contended ones; the
    stages that tests start as subprocesses get the same through the environment."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("DDPM_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
