"""The sampling package gives the images ``ddpm/samplers.py`` gave before it was split into a
driver and steppers (recorded in ``tests/data/sampler_images.pt``, see ``sampler_cases``):
every sampler x spacing x (guided, unguided), each sampler's own settings, learned variances.
"""

from __future__ import annotations

import pytest
import torch
from sampler_cases import CLASSES, DIFFUSION, GOLDEN, INDICES, SEED, Network, configs, networks

from ddpm.config import SamplerConfig
from ddpm.generation import generate

RECORDED = torch.load(GOLDEN, weights_only=True)["images"]
NETWORKS = {kind: Network(config, seed) for seed, (kind, config) in enumerate(networks().items())}
CASES = [(name, fields, False) for name, fields in configs(False).items()]
CASES += [(name, fields, True) for name, fields in configs(True).items()]


@pytest.mark.parametrize(("name", "fields", "learned"), CASES, ids=[c[0] for c in CASES])
def test_the_refactor_changes_no_image(name, fields, learned):
    net = NETWORKS["learned" if learned else "conditional"]
    classes = None if learned else CLASSES
    with torch.no_grad():
        x = generate(net, DIFFUSION, INDICES, SEED, SamplerConfig(**fields), classes=classes)
    # the same arithmetic in the same order as before: bit for bit on the CPU that recorded it
    # (an AMD EPYC); another CPU's kernels round the network's sums differently in the last
    # bits (3e-7 seen on an Intel Xeon), far below what any change to a step would move
    torch.testing.assert_close(x, RECORDED[name], rtol=0, atol=1e-5)


def test_every_recorded_case_is_checked():
    assert {c[0] for c in CASES} == set(RECORDED)
