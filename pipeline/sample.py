"""``pipeline sample``: images from the trained weights, with a grid, a GIF and figures.

Outputs, in ``samples/`` (DVC ``cache: false``: thousands of PNGs)::

    images/000000.png ...     every image, at the training resolution (what evaluate reads)
    grid.png                  the first ``sample.grid_images`` images
    denoising.gif             x_t of the first ``sample.gif_images`` images along the sampler
    interpolation.png         slerp between the noises of images 0 and 1 (``sample.interpolation``)
    figures/schedule.png      beta_t, alpha-bar_t and log-SNR over t, the sampled steps marked
    figures/forward_process.png   real training images noised at a few t
    manifest.json             what was sampled, how (evaluate reads it)

and ``metrics/sample.json`` (the rate; a file of its own, so that evaluate, which reads
``samples/``, is not rerun for a timing).

Image ``i`` draws its noise from a generator seeded by (seed, i), and batch k always holds
images [k B, (k + 1) B); under torchrun rank r renders batches r, r + world_size, ..., so the
set is the one a single process makes, bit for bit (on the same device and thread count).
Everything is written into a temporary sibling folder that replaces ``samples/`` at the end.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import typer
from PIL import Image

from ddpm.checkpoint import SamplingModel, load_sampling_model
from ddpm.data.prepared import load_prepared
from ddpm.distributed import Distributed
from ddpm.errors import CheckpointError, NonFiniteSamplesError
from ddpm.figures import forward_process_figure, schedule_figure
from ddpm.files import atomic_write_bytes, file_sha256, replace_dir
from ddpm.generation import generate, image_generators, image_labels, slerp
from ddpm.pixels import grid, to_float, to_uint8
from ddpm.progress import Progress
from ddpm.sampling.api import model_problems
from ddpm.sampling.spacing import sampling_timesteps
from pipeline.errors import Problems, stage_errors
from pipeline.model import log_image_model
from pipeline.outputs import save_png, write_json
from pipeline.projection import Layout, project, sample_record
from pipeline.render import rendered
from pipeline.runtime import distributed
from pipeline.settings import Machine, SampleParams, load_params, prefixed
from pipeline.tracking import Tracker

FORWARD_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # of T - 1, in the forward figure
FORWARD_IMAGES = 4


def sample_stage(params: Path, models: Path, data: Path, out: Path, metrics: Path) -> None:
    """The sample stage (``pipeline sample --help``), sharded across processes under torchrun."""
    with stage_errors():
        p = load_params(params)
        s = p.sample
        path = models / "ema.pt"
        with (
            distributed(Machine()) as (dist, device),
            Tracker(p.model_dump(mode="json"), "sample", enabled=dist.is_main) as tracker,
        ):
            net, real = check_inputs(s, path, data, device, dist.is_main)
            tmp = out.with_name(f".{out.name}.tmp")
            try:
                start = time.perf_counter()
                render_shared(net, s, p.seed, tmp, dist, device)
                seconds = time.perf_counter() - start
                if dist.is_main:
                    write_extras(net, s, p.seed, tmp, real, device)
                    write_json(tmp / "manifest.json", manifest(net, s, p.seed, path))
                    replace_dir(tmp, out)
                    write_json(metrics / "sample.json", {
                        "images_per_second": round(s.num_images / seconds, 2),
                        "wall_time_s": round(seconds, 2),
                    })  # fmt: skip
                    layout = Layout(models=models, samples=out, metrics=metrics)
                    project(tracker, sample_record(layout), log_image_model)
                    typer.echo(
                        f"{out}/images: {s.num_images} images ({s.sampler}, {s.steps} steps)"
                    )
            finally:
                if dist.is_main:  # a failed run leaves no half folder behind
                    shutil.rmtree(tmp, ignore_errors=True)
            _barrier(dist)


def render_shared(
    net: SamplingModel,
    s: SampleParams,
    seed: int,
    tmp: Path,
    dist: Distributed,
    device: torch.device,
) -> None:
    """All processes render their batches into a fresh ``tmp/images``; returns when all did."""
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
    _barrier(dist)
    try:
        render_images(
            net, s, seed, my_batches(s, dist), tmp / "images", device, progress=dist.is_main
        )
    except NonFiniteSamplesError as exc:
        raise blame(exc, net, s) from exc
    _barrier(dist)


def blame(exc: NonFiniteSamplesError, net: SamplingModel, s: SampleParams) -> RuntimeError:
    """The error to report for non-finite samples: the weights when some of them are not
    finite, else the sampler settings, which made finite weights diverge."""
    if not all(bool(torch.isfinite(p).all()) for p in net.model.state_dict().values()):
        return CheckpointError(f"{s.weights} weights: {exc}; some weights are NaN or inf")
    read = s.sampler_config().read_settings()  # what this sampler reads: its row of the table
    settings = ", ".join(f"{key}={value}" for key, value in {**read, "bf16": s.bf16}.items())
    return NonFiniteSamplesError(
        f"{exc}; the {s.weights} weights are finite, so the sampler settings diverge ({settings}): "
        "change them in params.yaml's sample section"
    )


def check_inputs(
    s: SampleParams, weights: Path, data: Path, device: torch.device, main: bool
) -> tuple[SamplingModel, torch.Tensor | None]:
    """Every input of the stage, checked before any work, every problem reported: the
    weights, the sample settings against them, and (rank 0) the training images of the
    forward-process figure."""
    problems = Problems("sample")
    net = problems.load(load_sampling_model, weights, s.weights, device)
    split = problems.load(load_prepared, data, "train", mmap=True) if main else None
    if net is not None:
        problems.add(sampler_problems(s, net))
        if main and s.sampler == "ddpm" and net.variance not in (None, s.variance):
            typer.echo(f"sample: {weights} was published to sample with variance {net.variance}; "
                       f"sample.variance is {s.variance}")  # fmt: skip
    problems.check()
    if split is None:
        return net, None
    # the figure's few images, read from the memory-mapped split rather than all of it
    return net, torch.from_numpy(np.array(split.images[:FORWARD_IMAGES]))


def sampler_problems(s: SampleParams, net: SamplingModel) -> list[str]:
    """The sample settings the checkpoint must allow: steps, guidance and classes."""
    problems = prefixed("sample.", model_problems(s, net.model, net.diffusion))
    try:
        image_labels([0], net.model.config.num_classes, s.classes)
    except ValueError as exc:
        problems.append(f"sample.classes: {exc}")
    return problems


def my_batches(s: SampleParams, dist: Distributed) -> list[range]:
    """This process's share: batches k = rank, rank + world_size, ... of the whole set.

    Batch k is always images [k B, (k + 1) B): an image is sampled with the same companions
    whatever the number of processes, so even the network's float rounding, which can depend
    on the batch's shape, is the same, and the images are bit-identical.
    """
    starts = range(dist.rank * s.batch_size, s.num_images, dist.world_size * s.batch_size)
    return [range(i, min(i + s.batch_size, s.num_images)) for i in starts]


def render_images(
    net: SamplingModel,
    s: SampleParams,
    seed: int,
    batches: Sequence[range],
    folder: Path,
    device: torch.device,
    progress: bool = True,
) -> None:
    """Sample each batch of image indices and write image i as ``folder/<i:06d>.png``."""
    with Progress(sum(len(b) for b in batches), "sample", "img", enabled=progress) as bar:
        for batch, images in rendered(net, s, seed, batches, device):
            for index, image in zip(batch, images, strict=True):
                save_png(folder / f"{index:06d}.png", image)
            bar.update(len(batch))


def write_extras(
    net: SamplingModel,
    s: SampleParams,
    seed: int,
    folder: Path,
    real: torch.Tensor,
    device: torch.device,
) -> list[str]:
    """Grid, GIF, figures and interpolation into ``folder``; returns their relative paths.

    Args:
        real: uint8 (N, H, W, 3) training images for the forward-process figure.
    """
    names = ["grid.png", "denoising.gif", "figures/schedule.png", "figures/forward_process.png"]
    first = read_pngs(folder / "images", range(min(s.grid_images, s.num_images)))
    save_png(folder / names[0], grid(first))
    atomic_write_bytes(folder / names[1], denoising_gif(net, s, seed, device))
    steps = sampling_timesteps(net.diffusion, s.steps, s.spacing)
    save_png(folder / names[2], schedule_figure(net.diffusion, steps))
    save_png(folder / names[3], forward_figure(net, real, seed))
    if s.interpolation:
        names.append("interpolation.png")
        save_png(folder / names[-1], interpolation(net, s, seed, device))
    return names


def denoising_gif(net: SamplingModel, s: SampleParams, seed: int, device: torch.device) -> bytes:
    """An animated GIF of x_t along the sampler for the first ``gif_images`` images."""
    indices = list(range(min(s.gif_images, s.num_images)))
    total = len(sampling_timesteps(net.diffusion, s.steps, s.spacing))
    keep = set(torch.linspace(0, total - 1, min(s.gif_frames, total)).round().long().tolist())
    frames = []

    def capture(step: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if step in keep:
            frames.append(_frame(to_uint8(x_t)))

    generate(net.model, net.diffusion, indices, seed, s.sampler_config(), classes=s.classes,
             device=device, callback=capture, bf16=s.bf16)  # fmt: skip
    buffer = io.BytesIO()
    durations = [80] * (len(frames) - 1) + [1500]  # hold the final images
    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0
    )
    return buffer.getvalue()


def interpolation(
    net: SamplingModel, s: SampleParams, seed: int, device: torch.device
) -> torch.Tensor:
    """A row of images sampled from slerp(noise of image 0, noise of image 1, alpha)."""
    cfg = net.model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    a, b = (torch.randn(shape, generator=g) for g in image_generators(seed, [0, 1]))
    x_T = slerp(a, b, torch.linspace(0, 1, s.interpolation_steps))
    indices = [0] * s.interpolation_steps  # one seed: the stochastic samplers' noise is shared
    x = generate(net.model, net.diffusion, indices, seed, s.sampler_config(), classes=s.classes,
                 x_T=x_T, device=device, bf16=s.bf16)  # fmt: skip
    return grid(to_uint8(x), nrow=s.interpolation_steps)


def forward_figure(net: SamplingModel, real: torch.Tensor, seed: int) -> torch.Tensor:
    """Training images, uint8 (N, H, W, 3), noised by q(x_t | x0) at a few t."""
    last = net.diffusion.num_timesteps - 1
    timesteps = sorted({round(f * last) for f in FORWARD_FRACTIONS})
    x0 = to_float(real.permute(0, 3, 1, 2))
    generator = torch.Generator().manual_seed(seed)
    return forward_process_figure(net.diffusion, x0, timesteps, generator)


def manifest(net: SamplingModel, s: SampleParams, seed: int, path: Path) -> dict:
    """What the samples are: evaluate reports the sampler and steps from here."""
    cfg = net.model.config
    labels = image_labels(range(s.num_images), cfg.num_classes, s.classes)
    return {
        **s.model_dump(mode="json"),
        "seed": seed,
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),  # evaluate's extra ranges check it
        "checkpoint_step": net.step,
        "image_size": cfg.image_size,
        "num_timesteps": net.diffusion.num_timesteps,
        "class_names": net.class_names,
        "labels": None if labels is None else labels.tolist(),
    }


def _barrier(dist: Distributed) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def read_pngs(folder: Path, indices: Sequence[int]) -> torch.Tensor:
    """The images ``folder/<index>.png`` as uint8 (B, H, W, 3)."""
    arrays = []
    for i in indices:
        with Image.open(folder / f"{i:06d}.png") as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays))


def _frame(images: torch.Tensor, scale: int = 2) -> Image.Image:
    canvas = Image.fromarray(grid(images).numpy())
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
