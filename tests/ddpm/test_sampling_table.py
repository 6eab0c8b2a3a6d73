"""The samplers' table is the one place that says which sampler reads which setting: each
setting changes the images of exactly the samplers whose rows list it, the NFE a row claims is
what the network is called, a stray setting is named, and the README's table is this one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sampler_cases import CLASSES, DIFFUSION, INDICES, SEED, Network, networks

from ddpm.config import SamplerConfig
from ddpm.generation import generate
from ddpm.sampling.api import STEPPERS, nfe
from ddpm.sampling.table import COMMON, SAMPLERS

ROOT = Path(__file__).resolve().parents[2]
NET = Network(networks()["conditional"], 0)
BASE = {"steps": 8, "order": 3}  # order 3: lower_order_final then matters at 8 steps
OTHER = {  # each setting at another value than BASE's (or the default)
    "steps": 6,
    "eta": 0.5,
    "spacing": "linspace",
    "variance": "beta",
    "order": 2,
    "lower_order_final": False,
    "bh": "bh1",
    "corrector": False,
    "clip_x0": False,
    "guidance_scale": 3.0,
}


def images(**fields) -> torch.Tensor:
    with torch.no_grad():
        return generate(NET, DIFFUSION, INDICES, SEED, SamplerConfig(**fields), classes=CLASSES)


def test_the_table_covers_every_setting_and_every_stepper():
    settings = {s for row in SAMPLERS.values() for s in row.settings}
    assert {"sampler"} | settings == set(SamplerConfig.model_fields) == {"sampler"} | set(OTHER)
    assert STEPPERS.keys() == SAMPLERS.keys()
    assert all(set(COMMON) <= set(row.settings) for row in SAMPLERS.values())


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_setting_changes_exactly_the_samplers_whose_rows_list_it(sampler):
    base = images(sampler=sampler, **BASE)
    changed = {
        setting
        for setting, value in OTHER.items()
        if not torch.equal(images(sampler=sampler, **{**BASE, setting: value}), base)
    }
    assert changed == set(SAMPLERS[sampler].settings)


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.config, self.null_class, self.images = net, net.config, net.null_class, 0

    def forward(self, x, t, y=None):
        self.images += x.shape[0]
        return self.net(x, t, y)


@pytest.mark.parametrize("spacing", ["trailing", "quadratic", "karras"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_nfe_a_row_claims_is_what_the_network_runs(sampler, spacing, scale):
    counting = Counting(NET)
    config = SamplerConfig(sampler=sampler, steps=12, spacing=spacing, guidance_scale=scale)
    with torch.no_grad():
        generate(counting, DIFFUSION, INDICES, SEED, config, classes=CLASSES)
    assert counting.images == len(INDICES) * nfe(config, DIFFUSION)  # guided: both halves


def test_a_setting_the_sampler_does_not_read_is_named():
    assert SamplerConfig(sampler="dpm-solver", eta=0.5).ignored() == [
        "dpm-solver ignores eta=0.5 (read by ddim)"
    ]
    assert SamplerConfig(sampler="ddim", eta=0.5, order=3).ignored() == [
        "ddim ignores order=3 (read by dpm-solver, unipc)"
    ]
    assert SamplerConfig(sampler="heun", variance="posterior").ignored() == []  # the default
    assert SamplerConfig(sampler="ddim", eta=0.5, order=3).ignored({"eta"}) == []


def test_the_params_check_warns_of_a_stray_setting_in_one_line(tmp_path):
    """As a user meets it: `dvc exp run -S sample.eta=0.5` on a dpm-solver experiment; the
    stage warns and goes on (here to the missing weights, exit 1). A frontier point inherits
    sample.eta silently, and is named only for what it sets itself."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"].update(sampler="dpm-solver", eta=0.5)
    raw["frontier"]["points"] = [{"sampler": "ddim", "steps": 10},
                                 {"sampler": "unipc", "steps": 10, "eta": 0.3}]  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PATH": "", "PYTHONPATH": str(ROOT),
                          "DDPM_TRACKING": "false", "DDPM_DEVICE": "cpu"})  # fmt: skip
    assert done.returncode == 1, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "params.yaml: warning: sample: dpm-solver ignores eta=0.5 (read by ddim)",
        "params.yaml: warning: frontier.points[1]: unipc ignores eta=0.3 (read by ddim)",
    ]


def readme_table() -> dict[str, tuple[str, ...]]:
    """The README's sampler settings table: sampler -> its own settings."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("| sampler | its own settings |") :].split("\n\n")[0]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].strip("`")
        rows[name] = tuple(re.findall(r"`([a-z_0-9]+)`", cells[1]))
    return rows


def test_the_readmes_sampler_table_is_the_table():
    assert readme_table() == {name: row.reads for name, row in SAMPLERS.items()}
