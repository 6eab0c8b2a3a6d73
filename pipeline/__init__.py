"""The experiment pipeline: one Typer command per DVC stage, over the ``ddpm`` library."""
