"""``pipeline convert`` through its CLI: a diffusers folder in, sampled by our own stage; our
weights out, loaded by diffusers; one clear line for what cannot be converted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from stages import prepare_split, project_params
from typer.testing import CliRunner

from ddpm.checkpoint import load_checkpoint, load_sampling_model
from pipeline.cli import app

diffusers = pytest.importorskip("diffusers")
runner = CliRunner()

UNET = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "norm_eps": 1e-6,
    "downsample_padding": 0, "freq_shift": 1, "flip_sin_to_cos": False,
    "attention_head_dim": None,
}  # fmt: skip
PARAMS = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "data": {"num_images": 30},
        "diffusion": {"timesteps": 100},
        "sample": {"steps": 3, "num_images": 4, "batch_size": 4, "grid_images": 4,
                   "gif_images": 2, "gif_frames": 2, "interpolation_steps": 3},
        "evaluate": {"kid_subset_size": 2, "isc_splits": 2},
    }
)  # fmt: skip


@pytest.fixture
def published(tmp_path) -> Path:
    """A DDPMPipeline folder as diffusers saves one: a random tiny UNet, a cosine scheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "published")
    return tmp_path / "published"


def test_a_published_model_is_imported_and_sampled_by_the_sample_stage(
    tmp_path, published, monkeypatch
):
    project = tmp_path / "project"
    shutil.copytree(prepare_split(tmp_path / "prep", PARAMS), project / "data" / "prepared")
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = runner.invoke(app, ["convert", "--from-diffusers", str(published), "--out",
                                 "models/ema.pt"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cosine schedule, T = 100, eps prediction" in result.output
    ckpt = load_checkpoint(project / "models" / "ema.pt")
    assert (
        ckpt["converted_from"] == str(published) and ckpt["config"]["diffusion"]["timesteps"] == 100
    )
    result = runner.invoke(app, ["sample"])
    assert result.exit_code == 0, result.output
    assert len(list((project / "samples" / "images").glob("*.png"))) == 4
    manifest = json.loads((project / "samples" / "manifest.json").read_text())
    assert manifest["num_timesteps"] == 100  # the converted model's own diffusion, not params'


def test_our_weights_export_to_a_folder_diffusers_loads(tmp_path, published):
    runner.invoke(app, ["convert", "--from-diffusers", str(published), "--out",
                        str(tmp_path / "ema.pt")])  # fmt: skip
    result = runner.invoke(app, ["convert", "--to-diffusers", str(tmp_path / "export"),
                                 "--weights", str(tmp_path / "ema.pt")])  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "export")
    ours = load_sampling_model(tmp_path / "ema.pt").model
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 90])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, ours(x, t), atol=1e-5, rtol=0)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give exactly one of --from-diffusers DIR, --to-diffusers DIR"),
        (["--from-diffusers", "{published}"], "--from-diffusers needs --out FILE"),
        (["--from-diffusers", "{tmp}", "--out", "x.pt"], "no config.json"),
        (["--to-diffusers", "{tmp}/out", "--weights", "{tmp}/none.pt"], "no such checkpoint"),
    ],
)
def test_what_cannot_be_converted_exits_1_with_one_line(tmp_path, published, args, words):
    args = [a.format(published=published, tmp=tmp_path) for a in args]
    result = runner.invoke(app, ["convert", *args])
    assert result.exit_code == 1, result.output
    assert words in result.output and "Traceback" not in result.output


class Payload:
    """Any class: a pickle of one names it as a global to import, which weights_only refuses."""


def test_a_bin_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path):
    """``.bin`` weights are read as every .pt is (``ddpm.checkpoint.read_safely``)."""
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(UNET))
    torch.save({"conv_in.weight": Payload()}, folder / "diffusion_pytorch_model.bin")
    result = runner.invoke(app, ["convert", "--from-diffusers", str(folder), "--out", "x.pt"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        f"error: {folder / 'diffusion_pytorch_model.bin'} is not a readable checkpoint, one "
        f"this project can read safely (Unsupported global: GLOBAL {__name__}.Payload)"
    ]
