"""``pipeline convert --from-improved-diffusion`` through its CLI: a checkpoint in
improved-diffusion's layout (hybrid loss, learned variances, cosine schedule, rescaled
timesteps) imported with its flags, then sampled and scored by our own sample and nll stages
unchanged; exported back byte for byte the same tensors; unconvertible input refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from improved_reference import improved_state
from stages import TINY_PROJECT, enter_project, merge, prepare_split
from typer.testing import CliRunner

from ddpm.checkpoint import load_checkpoint
from ddpm.improved_diffusion_format import parse_flags
from pipeline.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
         "--diffusion_steps 100 --noise_schedule cosine")  # fmt: skip
# the tiny project at 32 px with params that agree with the imported model
PARAMS = merge(TINY_PROJECT, {
    "image_size": 32,
    "schedule": "cosine",
    "data": {"num_images": 20},
    "model": {"attention_resolutions": [16], "learn_sigma": True},
    "diffusion": {"timesteps": 100, "loss": "hybrid"},
    "sample": {"sampler": "ddpm", "variance": "learned", "steps": 3},
    "nll": {"num_images": 2, "batch_size": 2, "stride": 25, "variance": None},
})  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_split(tmp_path_factory.mktemp("prepared"), PARAMS)


@pytest.fixture
def published(tmp_path) -> Path:
    path = tmp_path / "cifar10_uncond_tiny.pt"
    torch.save(improved_state(parse_flags(FLAGS).values, seed=2), path)
    return path


def test_an_improved_diffusion_model_is_imported_sampled_and_scored(
    tmp_path, prepared, published, monkeypatch
):
    project = enter_project(tmp_path / "project", prepared, PARAMS, monkeypatch)
    train_flags = "--lr 1e-4 --microbatch 4 --schedule_sampler loss-second-moment"
    args = ["--from-improved-diffusion", str(published), "--flags", f"{FLAGS} {train_flags}"]
    result = runner.invoke(app, ["convert", *args, "--out", "models/ema.pt"])
    assert result.exit_code == 0, result.output
    assert "cosine schedule, T = 100, eps prediction, learned variance" in result.output
    assert "Not carried over (its sampling and housekeeping flags): --microbatch 4" in result.output
    for line in ("model.time_scale: 10.0", "model.flip_sin_to_cos: true",
                 "diffusion.loss: hybrid", "sample.variance: learned", "train.lr: 1e-4",
                 "train.timestep_sampler: loss-second-moment"):  # fmt: skip
        assert f"  {line}\n" in result.output, line
    ckpt = load_checkpoint(project / "models" / "ema.pt")
    assert ckpt["variance"] == "learned" and ckpt["converted_from"] == str(published)
    assert ckpt["config"]["unet"]["time_scale"] == 10.0  # t * 1000 / T

    result = runner.invoke(app, ["sample"])
    assert result.exit_code == 0, result.output
    assert len(list((project / "samples" / "images").glob("*.png"))) == 6
    manifest = json.loads((project / "samples" / "manifest.json").read_text())
    assert manifest["num_timesteps"] == 100

    result = runner.invoke(app, ["nll"])
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "metrics" / "nll.json").read_text())
    assert summary["variance"] == "learned" and math.isfinite(summary["bpd"])

    result = runner.invoke(app, ["convert", "--to-improved-diffusion", "back.pt"])
    assert result.exit_code == 0, result.output
    assert "--model_path back.pt --image_size 32 --num_channels 32" in result.output
    back, theirs = torch.load("back.pt", weights_only=True), torch.load(published)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give exactly one of --from-diffusers DIR, --to-diffusers DIR"),
        (["--from-improved-diffusion", "{pt}", "--out", "x.pt"], "needs --flags"),
        (["--from-improved-diffusion", "{pt}", "--flags", FLAGS], "needs --out FILE"),
        (["--from-improved-diffusion", "{pt}", "--out", "x.pt", "--flags", "--use_fp32 True"],
         "--use_fp32 is not a flag of improved-diffusion's model, diffusion or scripts"),
        (["--from-improved-diffusion", "{pt}", "--out", "x.pt", "--flags",
          FLAGS.replace("32 --num_res_blocks", "64 --num_res_blocks")],
         "time_embed.0.weight has shape (128, 32) where the flags' network has (256, 64)"),
        (["--from-improved-diffusion", "{pt}", "--out", "x.pt", "--flags",
          FLAGS.replace("--num_res_blocks 1", "--num_res_blocks 2")],
         "input_blocks.2.0.in_layers.0.weight is missing"),
    ],
)  # fmt: skip
def test_what_cannot_be_converted_exits_1_with_one_line(tmp_path, published, args, words):
    args = [a.format(pt=published) for a in args]
    result = runner.invoke(app, ["convert", *args])
    assert result.exit_code == 1, result.output
    assert words in result.output and "Traceback" not in result.output


class Payload:
    """Any class: a pickle of one names it as a global to import, which weights_only refuses."""


@pytest.mark.parametrize(
    ("content", "reason"),
    [("garbage", "(Unsupported operand 103)"),
     ("class", f"(Unsupported global: GLOBAL {__name__}.Payload)")],
)  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it_as_the_cli_runs(
    tmp_path, content, reason
):
    """``python -m pipeline.cli convert``, as a user runs it: the file and the unpickler's
    reason on one line, without torch's paragraphs (their advice to load with
    ``weights_only=False`` runs whatever the file holds)."""
    path = tmp_path / "garbage.pt"
    if content == "garbage":
        path.write_bytes(b"garbage")
    else:
        torch.save({"weights": Payload()}, path)
    args = ["convert", "--from-improved-diffusion", str(path), "--flags", "", "--out", "x.pt"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == "" and done.stderr.splitlines() == [
        f"error: {path} is not a readable checkpoint, one this project can read safely {reason}"
    ]
    assert "weights_only" not in done.stderr and not (tmp_path / "x.pt").exists()
