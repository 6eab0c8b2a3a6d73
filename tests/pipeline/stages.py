"""Helpers shared by the stage tests (importable as ``stages``: pytest puts this folder on
``sys.path`` for the tests in it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key, nested sections merged."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def project_params(overrides: dict) -> dict:
    """The project's params.yaml (every key is required) with ``overrides`` applied; the
    frontier shrunk to one two-step point, so that tests' short chains (T = 20) validate, and
    no FID during training unless a test turns it on (it would score every tiny run's end)."""
    base = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TEST_BASE)
    return merge(base, overrides)


TEST_BASE = {
    "frontier": {"points": [{"sampler": "ddim", "steps": 2}]},
    "train": {"fid": {"every": 0}},
}


def prepare_split(root: Path, params: dict) -> Path:
    """Run the real ``prepare`` stage with ``params`` in ``root``; return the prepared folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        app, ["prepare", "--params", str(root / "params.yaml"), "--out-dir", str(root / "data")]
    )
    assert result.exit_code == 0, result.output
    return root / "data"


def enter_project(
    root: Path, prepared: Path, params: dict, monkeypatch, inception_weights: Path | None = None
) -> Path:
    """``root`` as a project: the prepared data and params in it, the cwd, its own MLflow store
    (through DVC_ROOT), no experiment name, and the tests' Inception weights when given."""
    shutil.copytree(prepared, root / "data" / "prepared")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DDPM_FIDELITY_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    if inception_weights is not None:
        monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(inception_weights))
    return root


# A whole tiny project (40 images, T = 20, a few steps of everything, the registry on):
# what the tracking and stage-params tests run every stage on.
TINY_PROJECT = project_params(
    {
        "dataset": "synthetic",
        "image_size": 16,
        "data": {"num_images": 40, "val_fraction": 0.25},
        "model": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "num_groups": 8},
        "diffusion": {"timesteps": 20},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "val_every": 4,
                  "checkpoint_every": 4, "sample_every": 4, "sample_images": 2,
                  "sample_steps": 2, "val_images": 4, "val_timesteps": 2},
        "sample": {"steps": 3, "num_images": 6, "batch_size": 6, "grid_images": 4,
                   "gif_images": 2, "gif_frames": 2, "interpolation": False},
        "evaluate": {"reference_split": "val", "kid_subset_size": 4, "isc_splits": 2,
                     "batch_size": 16},
        "nll": {"split": "val", "num_images": 4, "batch_size": 4, "stride": 5},
        # sdedit: the mode that reads the most (the sampler settings, the KID's evaluate keys)
        "edit": {"mode": "sdedit", "split": "val", "num_images": 4, "batch_size": 4,
                 "steps": 4, "jump_length": 2, "resample": 2},
        "registry": {"enabled": True, "model_name": "tiny-ddpm"},
    }
)  # fmt: skip
