"""Our import of improved-diffusion checked against its own code, on a checkout of it:

    python scripts/check_improved_diffusion.py path/to/improved-diffusion

improved-diffusion is not a package on the registries, so the test suite checks the
conversion against an independent functional forward (tests/improved_reference.py); this
script runs the real thing. For each flag set it builds its ``UNetModel`` with random weights
(every layer moved off its zero initialisation), converts the state dict, and compares, with
its ``GaussianDiffusion`` beside our diffusion: the network's output, the betas, the training
loss (RESCALED_MSE, MSE or RESCALED_KL by the flags), the bound's terms at several t, and
every ancestral step of a 10-step respaced chain (its ``SpacedDiffusion``). The decoder term
(t = 0) differs by design: its normal CDF is a tanh approximation, ours is exact (0.25% apart
on random weights). Exits 1 when anything else is off by more than the tolerance.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.improved_diffusion_format import (
    CHANNEL_MULTS,
    configs_from_flags,
    parse_flags,
    state_from_improved,
)
from ddpm.likelihood import step_bpd, strided_chain
from ddpm.sampling.ancestral import ddpm_step
from ddpm.sampling.denoiser import predict_with_variance
from ddpm.sampling.spacing import sampling_timesteps
from ddpm.schedules import make_betas
from ddpm.unet import UNet

SMALL = "--num_channels 64 --num_res_blocks 2"
FLAG_SETS = [  # the README's CIFAR-10 and ImageNet-64 models at fewer channels, and T = 100
    f"--image_size 32 {SMALL} --learn_sigma True --dropout 0.3 --diffusion_steps 100 "
    "--noise_schedule cosine",
    f"--image_size 32 {SMALL} --learn_sigma True --diffusion_steps 100 --noise_schedule cosine "
    "--use_kl True",
    f"--image_size 64 {SMALL} --learn_sigma True --class_cond True --diffusion_steps 100 "
    "--noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
    "--image_size 32 --num_channels 32 --num_heads 1 --use_scale_shift_norm False "
    "--attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear --sigma_small True",
]
TOLERANCE = 1e-4  # relative


def import_theirs(repo: Path):
    """Its unet and gaussian_diffusion modules, without its package __init__ (which imports
    its training utilities and their dependencies)."""
    package = types.ModuleType("improved_diffusion")
    package.__path__ = [str(repo / "improved_diffusion")]
    sys.modules["improved_diffusion"] = package
    from improved_diffusion import gaussian_diffusion, unet

    return unet, gaussian_diffusion


def their_model(unet_module, f: dict) -> torch.nn.Module:
    size = f["image_size"]
    model = unet_module.UNetModel(
        in_channels=3, model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
        attention_resolutions=tuple(size // int(r) for r in f["attention_resolutions"].split(",")),
        dropout=f["dropout"], channel_mult=CHANNEL_MULTS[size],
        num_classes=1000 if f["class_cond"] else None, num_heads=f["num_heads"],
        num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def their_diffusion(gd, f: dict, respacing: str = ""):
    """Its SpacedDiffusion for the flags (all T steps unless ``respacing``)."""
    from improved_diffusion import respace  # after import_theirs registered the package

    loss = (gd.LossType.RESCALED_KL if f["use_kl"] else gd.LossType.RESCALED_MSE
            if f["rescale_learned_sigmas"] else gd.LossType.MSE)  # fmt: skip
    var = (gd.ModelVarType.LEARNED_RANGE if f["learn_sigma"] else gd.ModelVarType.FIXED_SMALL
           if f["sigma_small"] else gd.ModelVarType.FIXED_LARGE)  # fmt: skip
    T = f["diffusion_steps"]
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(T, respacing or [T]),
        betas=gd.get_named_beta_schedule(f["noise_schedule"], T),
        model_mean_type=gd.ModelMeanType.START_X if f["predict_xstart"]
        else gd.ModelMeanType.EPSILON,
        model_var_type=var, loss_type=loss, rescale_timesteps=f["rescale_timesteps"],
    )  # fmt: skip


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def compare(flags: str, unet_module, gd) -> dict[str, float]:
    """The largest relative differences, ours against its code, for one flag set."""
    f = parse_flags(flags).values
    torch.manual_seed(0)
    theirs, their_d = their_model(unet_module, f), their_diffusion(gd, f)
    unet, diffusion_config, variance = configs_from_flags(parse_flags(flags))
    ours = UNet(unet).eval()
    ours.load_state_dict(state_from_improved(theirs.state_dict(), unet))
    our_d, T, size = GaussianDiffusion(diffusion_config), f["diffusion_steps"], f["image_size"]
    x0 = torch.randint(0, 256, (2, 3, size, size)) / 127.5 - 1
    y = torch.tensor([3, 999]) if f["class_cond"] else None
    kwargs = {} if y is None else {"y": y}
    out = {"betas": relative(make_betas(f["noise_schedule"], T),
                             torch.as_tensor(their_d.betas))}  # fmt: skip
    with torch.no_grad():
        t, x = torch.tensor([0, T - 1]), torch.randn_like(x0)
        scaled = t * (1000.0 / T) if f["rescale_timesteps"] else t  # what its wrapper feeds
        out["network"] = relative(ours(x, t, y), theirs(x, scaled, **kwargs))
        t, noise = torch.tensor([3, T // 2]), torch.randn_like(x0)
        their_loss = their_d.training_losses(theirs, x0, t, noise=noise, model_kwargs=kwargs)
        out["loss"] = relative(our_d.training_losses(ours, x0, t, noise, y)["loss"],
                               their_loss["loss"])  # fmt: skip
        out["bound terms t >= 1"] = bound_terms(ours, our_d, theirs, their_d, x0, y, variance)
        chain = respaced_steps(ours, our_d, theirs, gd, f, y, variance)
        out["10-step chain x sqrt(abar_t)"] = chain
    return out


def respaced_steps(ours, our_d, theirs, gd, f: dict, y, variance) -> float:
    """Its ancestral step on a 10-step respaced chain (``--timestep_respacing 10``: its mean
    and variance, clipped x0) against ours with ``linspace`` spacing, at every step. Each
    difference is weighed by sqrt(abar_t): x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    multiplies the network's float32 rounding by 1 / sqrt(abar_t), about 2,000 at the first
    step of the cosine schedule at T = 100, in both codes."""
    spaced = their_diffusion(gd, f, "10")
    timesteps = sampling_timesteps(our_d, 10, "linspace").tolist()
    assert timesteps == sorted(spaced.timestep_map, reverse=True), "another chain"
    kwargs, size, worst = ({} if y is None else {"y": y}), f["image_size"], 0.0
    for i, (t, t_prev) in enumerate(zip(timesteps, [*timesteps[1:], -1], strict=True)):
        x = torch.randn(2, 3, size, size)
        index = torch.full((2,), len(timesteps) - 1 - i)
        its = spaced.p_mean_variance(spaced._wrap_model(theirs), x, index, model_kwargs=kwargs)
        x0, _, v = predict_with_variance(ours, our_d, x, t, y)
        mean = ddpm_step(our_d, x, x0, t, t_prev, torch.zeros_like(x), variance, v)
        weight, diff = float(our_d.alphas_cumprod64[t].sqrt()), relative(mean, its["mean"])
        if t_prev >= 0:  # the last step adds no noise
            std = ddpm_step(our_d, x, x0, t, t_prev, torch.ones_like(x), variance, v) - mean
            diff = max(diff, relative(std, torch.exp(0.5 * its["log_variance"])))
        worst = max(worst, weight * diff)
    return worst


def bound_terms(ours, our_d, theirs, their_d, x0, y, variance) -> float:
    """The terms at several t, relative to the largest: the last ones are about 1e-6 bits,
    where its float32 KL keeps only a digit or two (ours is float64)."""
    chain, T, mine, its = strided_chain(our_d, 1), our_d.num_timesteps, [], []
    kwargs = {} if y is None else {"y": y}
    for step in (1, 2, T // 10, T // 2, T - 1):
        t = torch.full((x0.shape[0],), step)
        x_t = their_d.q_sample(x0, t, torch.randn_like(x0))
        its.append(their_d._vb_terms_bpd(theirs, x0, x_t, t, model_kwargs=kwargs)["output"])
        x0_pred, _, v = predict_with_variance(ours, our_d, x_t, step, y)
        mine.append(step_bpd(chain, step, x0, x_t, x0_pred, variance, v))
    return relative(torch.cat(mine), torch.cat(its))


def main(repo: Path) -> int:
    unet_module, gd = import_theirs(repo)
    failed = False
    for flags in FLAG_SETS:
        print(flags)
        for name, value in compare(flags, unet_module, gd).items():
            ok = value <= TOLERANCE
            failed |= not ok
            print(f"  {name:32s} max relative difference {value:.2e}{'' if ok else '  FAIL'}")
    return int(failed)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "improved_diffusion" / "unet.py").is_file():
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
