"""Importance sampling of t (loss-second-moment): uniform until every t has its history, then
p_t by the root mean square of the last 10 losses; the weighted loss unbiased and of lower
variance; the history a training checkpoint carries, so a killed run resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_unet

from ddpm.checkpoint import load_checkpoint
from ddpm.config import DiffusionConfig, EMAConfig, TrainConfig
from ddpm.data.synthetic import make_synthetic
from ddpm.timesteps import HISTORY, UNIFORM_SHARE, LossSecondMoment
from ddpm.train import Dataset, Hooks, train

T = 5


def warmed(losses_of_t) -> LossSecondMoment:
    """A sampler that has seen HISTORY losses at every t, ``losses_of_t(t, i)`` the i-th."""
    sampler = LossSecondMoment(T)
    for i in range(HISTORY):
        t = torch.arange(T)
        sampler.update(t, torch.tensor([losses_of_t(k, i) for k in range(T)]))
    return sampler


def test_it_draws_uniformly_until_every_t_has_its_history():
    sampler = LossSecondMoment(T)
    for _ in range(HISTORY - 1):
        sampler.update(torch.arange(T), torch.rand(T) * 100)
    sampler.update(torch.arange(T - 1), torch.rand(T - 1) * 100)  # t = T-1 one short
    uniform = torch.full((T,), 1 / T, dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), uniform)
    sampler.update(torch.tensor([T - 1]), torch.tensor([5.0]))
    assert not torch.allclose(sampler.probabilities(), uniform)


def test_its_probabilities_are_the_root_mean_square_of_each_ts_losses():
    sampler = warmed(lambda t, i: (t + 1) * (1.0 if i % 2 else 3.0))  # rms (t+1) sqrt(5)
    rms = torch.arange(1, T + 1, dtype=torch.float64) * math.sqrt(5)
    expected = rms / rms.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / T
    torch.testing.assert_close(sampler.probabilities(), expected)


def test_each_t_keeps_its_newest_losses_also_from_one_batch():
    sampler = warmed(lambda t, i: 1.0)
    t = torch.tensor([2] * 12 + [0])
    sampler.update(t, torch.cat([torch.arange(1.0, 13.0), torch.tensor([7.0])]))
    assert sorted(sampler.history[2].tolist()) == [float(v) for v in range(3, 13)]
    assert sorted(sampler.history[0].tolist()) == [1.0] * 9 + [7.0]
    assert sampler.count.tolist() == [11, 10, 22, 10, 10]


def test_the_weighted_loss_is_unbiased_and_varies_less_than_uniform_draws():
    """Terms spanning orders of magnitude, as L_vlb's do: the importance-weighted estimate has
    the same mean and a much smaller variance."""
    terms = torch.tensor([300.0, 1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    sampler = warmed(lambda t, i: float(terms[t]))
    gen = torch.Generator().manual_seed(0)
    t, w = sampler.sample(200_000, gen)
    weighted = w.double() * terms[t]
    assert float(weighted.mean()) == pytest.approx(float(terms.mean()), rel=0.01)
    uniform = terms[torch.randint(0, T, (200_000,), generator=gen)]
    assert float(weighted.var()) < 0.01 * float(uniform.var())


def test_the_history_is_state_and_every_processs_losses_are_recorded():
    other_rank = torch.tensor([[1, 4.0], [1, 6.0]], dtype=torch.float64)  # its (t, loss) pairs

    def gather(x):  # this rank's tensor, then the other rank's, as all_gather concatenates
        return torch.cat([x, other_rank])

    sampler = LossSecondMoment(T, gather=gather)
    sampler.update(torch.tensor([0, 3]), torch.tensor([1.0, 2.0]))
    assert sampler.count.tolist() == [1, 2, 0, 1, 0]
    assert sampler.history[1, :2].tolist() == [4.0, 6.0]
    copy = LossSecondMoment(T)
    copy.load_state_dict(sampler.state_dict())
    assert torch.equal(copy.history, sampler.history) and torch.equal(copy.count, sampler.count)
    with pytest.raises(ValueError, match="for 4 timesteps"):
        LossSecondMoment(4).load_state_dict(sampler.state_dict())


class Killed(Exception):
    pass


def test_a_killed_run_with_importance_sampling_resumes_to_the_same_weights(tmp_path):
    """T = 4, batch 8: warm after 5 steps, so most of the 12 steps draw by importance."""
    images = torch.from_numpy(make_synthetic(96, 16, seed=0).images)
    data = (Dataset(images[:80]), Dataset(images[80:]))
    config = TrainConfig(steps=12, batch_size=8, lr=1e-3, warmup_steps=2, val_every=6,
                         checkpoint_every=3, sample_every=1000, val_images=16, val_timesteps=3,
                         sample_steps=2, timestep_sampler="loss-second-moment")  # fmt: skip

    def run(folder, hooks=None):
        return train(tiny_unet(), DiffusionConfig(timesteps=4), config, EMAConfig(decay=0.9),
                     *data, checkpoint_dir=tmp_path / folder, progress=False, log_every=3,
                     hooks=hooks or Hooks(log=lambda m: None))  # fmt: skip

    def kill(step, metrics):
        if step == 9:
            raise Killed

    run("a")
    with pytest.raises(Killed):
        run("b", Hooks(on_metrics=kill, log=lambda m: None))
    run("b")
    full, again = (load_checkpoint(tmp_path / f / "last.pt") for f in "ab")
    history = full["timestep_sampler"]
    assert int(history["count"].min()) >= HISTORY and int(history["count"].sum()) == 12 * 8
    assert torch.equal(history["history"], again["timestep_sampler"]["history"])
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
