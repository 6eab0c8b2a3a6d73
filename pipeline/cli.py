"""The ``pipeline`` command: one subcommand per DVC stage.

Each stage reads params.yaml (``--params``), does its work through ``ddpm`` and writes its
outputs atomically. Run ``pipeline --help`` or ``pipeline STAGE --help``.
"""

from __future__ import annotations

import typer

from pipeline import data, evaluate, sample, train

app = typer.Typer(
    name="pipeline",
    help="DDPM experiment pipeline: the stages that dvc.yaml chains.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("download")(data.download)
app.command("prepare")(data.prepare)
app.command("train")(train.train_command)
app.command("sample")(sample.sample_command)
app.command("evaluate")(evaluate.evaluate_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
