"""The ``pipeline`` command: one subcommand per DVC stage.

Each stage reads params.yaml (``--params``), does its work through ``ddpm`` and writes its
outputs atomically. Run ``pipeline --help`` or ``pipeline STAGE --help``.

This file holds the whole command-line surface (options and help) and imports only typer:
each command imports its stage's module when it runs, so ``--help`` answers at once and a
stage loads exactly the project files it uses. dvc.yaml lists those files as the stage's
deps, and ``tests/test_dag.py`` computes them from the imports inside each command below.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="pipeline",
    help="DDPM experiment pipeline: the stages that dvc.yaml chains.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="The experiment's params file.")
RAW = typer.Option(Path("data/raw"), "--raw-dir", help="Folder of raw archives.")
PREPARED = typer.Option(Path("data/prepared"), "--data", help="The prepared data folder.")
MODELS = typer.Option(Path("models"), "--models", help="Where checkpoints/ and ema.pt live.")
METRICS = typer.Option(Path("metrics"), "--metrics", help="Where the metrics files go.")
SAMPLES = typer.Option(Path("samples"), "--samples", help="The sample stage's folder.")
REFERENCE = typer.Option(Path("data/prepared"), "--data", help="Prepared data (the reference).")


@app.command()
def download(params: Path = PARAMS, raw_dir: Path = RAW) -> None:
    """Fetch and verify the raw archive of the chosen dataset (skipped when already valid)."""
    from pipeline.download import download_stage

    download_stage(params, raw_dir)


@app.command()
def prepare(
    params: Path = PARAMS,
    raw_dir: Path = RAW,
    out_dir: Path = typer.Option(Path("data/prepared"), "--out-dir", help="Prepared folder."),
) -> None:
    """Extract the chosen dataset into train/val uint8 arrays, labels and a manifest."""
    from pipeline.prepare import prepare_stage

    prepare_stage(params, raw_dir, out_dir)


@app.command()
def train(
    params: Path = PARAMS,
    data: Path = PREPARED,
    models: Path = MODELS,
    metrics: Path = METRICS,
    fresh: bool = typer.Option(
        False, "--fresh", help="Discard this configuration's checkpoints and start over."
    ),
    resume_from: Path | None = typer.Option(
        None, help="Resume from this checkpoint (it must match the model params)."
    ),
) -> None:
    """Train the UNet, resuming from this configuration's last checkpoint when there is one.

    Checkpoints go to models/checkpoints/<key>/, where the key hashes the model, diffusion,
    optimisation, EMA, seed and data: rerunning the same experiment resumes, changing one of
    those starts a new run in its own folder. Under torchrun, one process per GPU (DDP).
    DDPM_CHECKPOINT_DIR moves models/checkpoints/ elsewhere (a bucket that outlives the machine).
    """
    from pipeline.train import train_stage

    train_stage(params, data, models, metrics, fresh, resume_from)


@app.command()
def sample(
    params: Path = PARAMS,
    models: Path = MODELS,
    data: Path = typer.Option(
        Path("data/prepared"), "--data", help="Prepared data (forward figure)."
    ),
    out: Path = typer.Option(Path("samples"), "--out", help="The samples folder to write."),
    metrics: Path = METRICS,
) -> None:
    """Sample images from the trained weights (sharded across processes under torchrun).

    Writes samples/ (the images, a grid, a GIF, figures, manifest.json) and
    metrics/sample.json (the rate), and logs the run's model: a pyfunc that makes the same
    images, defaulting to these sample settings.
    """
    from pipeline.sample import sample_stage

    sample_stage(params, models, data, out, metrics)


@app.command()
def evaluate(
    params: Path = PARAMS,
    models: Path = MODELS,
    data: Path = REFERENCE,
    samples: Path = SAMPLES,
    metrics: Path = METRICS,
) -> None:
    """FID, IS and KID (and precision/recall) of the samples against a prepared split.

    With evaluate.repeats k > 1, also of k - 1 further seed ranges of as many images, sampled
    here from models/ema.pt with the samples' settings: eval.json gives each range, their mean,
    standard deviation and minimum.
    """
    from pipeline.evaluate import evaluate_stage

    evaluate_stage(params, models, data, samples, metrics)


@app.command()
def frontier(
    params: Path = PARAMS,
    models: Path = MODELS,
    data: Path = REFERENCE,
    out: Path = typer.Option(Path("frontier"), "--out", help="Where the figures go."),
    metrics: Path = METRICS,
) -> None:
    """FID, KID and IS for each sampler and step count of params' frontier, from the same noises.

    Writes metrics/frontier.json and .tsv (dvc plots show metrics/frontier.tsv: FID against
    NFE, a line per sampler), frontier/fid_vs_nfe.png and frontier/grid.png.
    """
    from pipeline.frontier import frontier_stage

    frontier_stage(params, models, data, out, metrics)


@app.command()
def nll(
    params: Path = PARAMS,
    models: Path = MODELS,
    data: Path = typer.Option(Path("data/prepared"), "--data", help="Prepared data (nll.split)."),
    metrics: Path = METRICS,
) -> None:
    """The variational bound of held-out images in bits per dimension (the papers' NLL).

    Scores the first nll.num_images images of nll.split (test: CIFAR-10's test batch) with
    the weights and x0 clipping of the sample settings, over every step (nll.stride: 1) or
    every k-th. Writes metrics/nll.json (bits/dim, its standard error, the prior and decoder
    terms) and metrics/nll_terms.tsv (dvc plots show metrics/nll_terms.tsv: bits per step).
    """
    from pipeline.nll import nll_stage

    nll_stage(params, models, data, metrics)


@app.command()
def edit(
    params: Path = PARAMS,
    models: Path = MODELS,
    data: Path = typer.Option(Path("data/prepared"), "--data", help="Prepared data (edit.split)."),
    out: Path = typer.Option(Path("edits"), "--out", help="The results and their grid."),
    metrics: Path = METRICS,
) -> None:
    """Edit held-out images with the trained model: inpaint, sdedit or reconstruct.

    edit.mode inpaint fills a seeded mask (edit.mask: box, half, lines, random) by RePaint's
    resampled ancestral chain (edit.steps, edit.jump_length, edit.resample); sdedit noises
    each image to t0 = edit.strength T and samples back with the sample section's sampler;
    reconstruct inverts each image to x_T with DDIM (edit.steps) and samples it back. The
    first edit.num_images of edit.split; writes edits/ (grid.png: input, mask or noised
    input, result) and metrics/edit.json (the errors, PSNR or KID, NFE per image).
    """
    from pipeline.edit import edit_stage

    edit_stage(params, models, data, out, metrics)


@app.command()
def track(
    params: Path = PARAMS,
    data: Path = REFERENCE,
    models: Path = MODELS,
    samples: Path = SAMPLES,
    frontier: Path = typer.Option(Path("frontier"), "--frontier", help="The frontier's figures."),
    metrics: Path = METRICS,
    edits: Path = typer.Option(Path("edits"), "--edits", help="The edit stage's results."),
) -> None:
    """Complete the experiment's MLflow run from the results on disk; the last stage.

    A stage DVC restores from its run cache logs nothing; for each such stage this logs what
    the stage would have logged, read from the same files: its metrics, the loss curves, the
    dataset inputs, its artifacts and the model. With registry.enabled it registers the model.
    """
    from pipeline.projection import Layout
    from pipeline.track import track_stage

    track_stage(params, Layout(data, models, samples, frontier, metrics, edits))


@app.command()
def convert(
    from_diffusers: Path | None = typer.Option(
        None, help="A diffusers UNet2DModel folder (config.json + weights) to import."
    ),
    from_improved_diffusion: Path | None = typer.Option(
        None,
        help="An openai/improved-diffusion checkpoint (.pt) to import; needs --flags.",
    ),
    flags: str | None = typer.Option(
        None,
        help="With --from-improved-diffusion: its MODEL_FLAGS and DIFFUSION_FLAGS as its README "
        "gives them for the checkpoint (its scripts' defaults fill the rest).",
    ),
    out: Path | None = typer.Option(None, help="With --from-*: the weights file to write."),
    to_diffusers: Path | None = typer.Option(
        None, help="Write our weights as a diffusers DDPMPipeline folder here."
    ),
    to_improved_diffusion: Path | None = typer.Option(
        None, help="Write our weights as an improved-diffusion .pt here (prints its flags)."
    ),
    weights: Path = typer.Option(
        Path("models/ema.pt"), help="With --to-*: our weights file to export."
    ),
    which: str = typer.Option("ema", help="With --to-*: ema or raw weights."),
) -> None:
    """Published weights in, ours out: diffusers and improved-diffusion, converted exactly.

    pipeline convert --from-diffusers ddpm-cifar10-32/ --out models/ema.pt imports the DDPM
    paper's CIFAR-10 model; pipeline convert --from-improved-diffusion
    cifar10_uncond_50M_500K.pt --flags "--image_size 32 --num_channels 128 --num_res_blocks 3
    --learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine" --out
    models/ema.pt imports Nichol & Dhariwal's; --to-diffusers DIR and --to-improved-diffusion
    FILE write ours out.
    """
    from pipeline.convert import convert_stage

    sources = {
        "from-diffusers": from_diffusers,
        "to-diffusers": to_diffusers,
        "from-improved-diffusion": from_improved_diffusion,
        "to-improved-diffusion": to_improved_diffusion,
    }
    convert_stage(sources, out, flags, weights, which)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
