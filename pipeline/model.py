"""The trained EMA model as an MLflow model: a pyfunc that generates images.

The train stage logs it with the run (``model/``); with ``registry.enabled: true`` the
track stage registers it under ``registry.model_name``, its FID as a tag. Then, offline on
the SQLite store as on a server::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/ddpm-cifar10-cars/1")
    images = model.predict(pd.DataFrame(
        {"num_images": [4], "sampler": ["ddim"], "steps": [50], "seed": [0]}
    ))  # uint8 (4, 32, 32, 3); conditional models take a "class" column too

and ``mlflow models serve -m models:/ddpm-cifar10-cars/1 --env-manager local`` serves the same
over HTTP. Image i of a seed is the image ``sample`` makes for that seed and index.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from ddpm.checkpoint import load_sampling_model, save_checkpoint
from ddpm.config import SamplerConfig
from ddpm.generation import generate
from ddpm.pixels import to_uint8

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    "numpy",
    "pandas",
    "pydantic",
    "pillow",
]


class ImageGenerator(mlflow.pyfunc.PythonModel):
    """predict(DataFrame[num_images, sampler, steps, seed, (class)]) -> uint8 (N, H, W, 3)."""

    def load_context(self, context) -> None:
        self.net = load_sampling_model(Path(context.artifacts["weights"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        row = model_input.iloc[0]
        n = int(row["num_images"])
        config = SamplerConfig(sampler=str(row["sampler"]), steps=int(row["steps"]))
        labels = None
        if self.net.model.config.num_classes is not None:
            label = row.get("class")
            missing = label is None or (isinstance(label, float) and math.isnan(label))
            labels = torch.full((n,), self.net.model.null_class if missing else int(label))
        with torch.no_grad():
            x = generate(self.net.model, self.net.diffusion, range(n), int(row["seed"]), config,
                         labels=labels)  # fmt: skip
        return to_uint8(x).numpy()


def signature(image_size: int, conditional: bool):
    """The pyfunc's input columns and its uint8 image tensor output."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    columns = [ColSpec("long", "num_images"), ColSpec("string", "sampler"),
               ColSpec("long", "steps"), ColSpec("long", "seed")]  # fmt: skip
    if conditional:
        columns.append(ColSpec("long", "class", required=False))
    output = TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))
    return ModelSignature(inputs=Schema(columns), outputs=Schema([output]))


def log_image_model(payload: dict) -> None:
    """Log the EMA weights (with their config, nothing else) as the run's pyfunc ``model``."""
    unet = payload["config"]["unet"]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "ema.pt"
        save_checkpoint({k: v for k, v in payload.items() if k != "model"}, weights)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageGenerator(),
            artifacts={"weights": str(weights)},
            code_paths=[str(ROOT / "ddpm"), str(ROOT / "pipeline")],
            signature=signature(unet["image_size"], unet["num_classes"] is not None),
            pip_requirements=REQUIREMENTS,
        )
