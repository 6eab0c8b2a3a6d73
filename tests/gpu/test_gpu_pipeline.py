"""The stages on the device: the smoke pipeline's commands, and one-process DDP (NCCL)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from tiny import tiny_unet
from torch.nn.parallel import DistributedDataParallel

from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig
from ddpm.data.synthetic import make_synthetic
from ddpm.distributed import Distributed
from ddpm.train import Dataset, Hooks, train

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


def test_the_smoke_pipeline_stages_run_on_the_device(device, tmp_path, monkeypatch):
    import stage_run

    monkeypatch.setenv("DDPM_DEVICE", device.type)
    # on the CPU (the dry run proving this test before a GPU is lent) half the images and a
    # quarter of the steps: the same stages and checks, Inception at 299 px costing the rest
    cuda = device.type == "cuda"
    n, steps, every = (32, 30, 15) if cuda else (16, 8, 4)
    settings = [f"data.num_images={4 * n - 8}", "data.val_fraction=0.25", f"train.steps={steps}",
                f"train.val_every={every}", f"train.checkpoint_every={every}",
                f"train.sample_every={steps}", f"train.bf16={cuda}",
                f"sample.num_images={n}", f"sample.batch_size={n}", "sample.steps=10",
                "sample.grid_images=16", f"evaluate.kid_subset_size={n // 2}",
                "evaluate.kid_subsets=10", "evaluate.isc_splits=2",
                f"frontier.num_images={n // 2}", f"frontier.batch_size={n // 2}",
                "frontier.points=[{sampler: ddim, steps: 5}, {sampler: dpm-solver, steps: 5}]",
                ]  # fmt: skip
    args = [str(tmp_path), "--preset", "smoke", "--report", str(tmp_path / "run.json"),
            "--stages", "download,prepare,train,sample,evaluate,frontier"]  # fmt: skip
    for s in settings:
        args += ["--set", s]
    assert stage_run.main(args) == 0, (tmp_path / "run.json").read_text()
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["ok"] and list(report["stages"]) == [
        "download", "prepare", "train", "sample", "evaluate", "frontier"
    ]  # fmt: skip
    assert report["train_metrics"]["steps"] == steps
    assert np.isfinite(report["eval_metrics"]["fid"])
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == n
    frontier = json.loads((tmp_path / "metrics" / "frontier.json").read_text())
    assert sorted(frontier["series"]) == ["ddim", "dpm-solver"]
    assert all(np.isfinite(p["fid"]) for s in frontier["series"].values() for p in s.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("compiled", [False, True])
def test_one_process_ddp_trains(device, tmp_path, compiled):
    """NCCL on CUDA (gloo on the CPU), the model wrapped in DDP and, compiled, the DDP module
    under torch.compile, as ``torchrun -m pipeline.cli train`` builds it."""
    if compiled and device.type != "cuda":
        pytest.skip("torch.compile on the CPU takes minutes; the GPU check runs it on CUDA")
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0
    )
    try:
        ids = [device.index or 0] if device.type == "cuda" else None
        dist = Distributed(0, 1, lambda m: DistributedDataParallel(m, device_ids=ids))
        images = torch.from_numpy(make_synthetic(96, 16, seed=0).images)
        config = TrainConfig(steps=4, batch_size=8, warmup_steps=1, val_every=4,
                             checkpoint_every=4, sample_every=100, val_images=8,
                             val_timesteps=2, compile=compiled)  # fmt: skip
        trained = train(tiny_unet(), DiffusionConfig(timesteps=50), config, EMAConfig(),
                        Dataset(images[:80]), Dataset(images[80:]), checkpoint_dir=tmp_path,
                        device=device, dist=dist, progress=False,
                        hooks=Hooks(log=lambda m: None))  # fmt: skip
    finally:
        torch_dist.destroy_process_group()
    assert trained.result.step == 4 and np.isfinite(trained.result.final_val_loss)
    assert (tmp_path / "last.pt").exists()
