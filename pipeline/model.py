"""The trained model as an MLflow model: a pyfunc that generates images.

The sample stage logs it with the run (``model/``), from models/ema.pt and its own settings;
with ``registry.enabled: true`` the track stage registers it under ``registry.model_name``,
the evaluation's scores as tags. Then, offline on the SQLite store as on a server::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/ddpm-cifar10-cars/1")
    images = model.predict(pd.DataFrame({"num_images": [4, 2], "seed": [0, 1]}))
    # uint8 (6, 32, 32, 3): row 1's four images, then row 2's two

Every column but ``num_images`` is optional and defaults to the experiment's ``sample`` settings
(``sampler``, ``steps``, ``eta``, ``spacing``, ``order``, ``bh``, ``clip_x0``,
``guidance_scale``, ``seed``; ``class`` for conditional models), so image i of a seed is the
image ``sample`` writes for that seed. ``mlflow models serve -m models:/ddpm-cifar10-cars/1
--env-manager local`` serves the same over HTTP. The model is logged from code
(:mod:`pipeline.pyfunc`), with ``ddpm`` copied in, so it loads without this project on the path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    "numpy",
    "pandas",
    "pydantic",
    "pillow",
]
WEIGHT_ENTRY = {"ema": "ema", "raw": "model"}  # sample.weights -> the checkpoint entry it reads


def signature(image_size: int, conditional: bool):
    """The request columns (only ``num_images`` required) and the uint8 image output."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    kinds = {"seed": "long", "sampler": "string", "steps": "long", "eta": "double",
             "spacing": "string", "order": "long", "bh": "string", "clip_x0": "boolean",
             "guidance_scale": "double"}  # fmt: skip
    if conditional:
        kinds["class"] = "long"
    columns = [ColSpec("long", "num_images")]
    columns += [ColSpec(kind, name, required=False) for name, kind in kinds.items()]
    output = TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))
    return ModelSignature(inputs=Schema(columns), outputs=Schema([output]))


def log_image_model(weights: Path, settings: dict[str, Any], tags: dict[str, str]):
    """Log ``weights`` (only the entry ``settings['weights']`` names, with the config) as the
    run's pyfunc ``model``, defaulting to ``settings``; returns MLflow's ModelInfo."""
    import mlflow.pyfunc  # here: a stage with tracking off runs where MLflow is not installed

    import pipeline.pyfunc as code

    payload = load_checkpoint(weights)
    unet = payload["config"]["unet"]
    other = set(WEIGHT_ENTRY.values()) - {WEIGHT_ENTRY[settings["weights"]]}
    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(tmp) / "weights.pt"
        save_checkpoint({k: v for k, v in payload.items() if k not in other}, kept)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=code.__file__,
            artifacts={"weights": str(kept)},
            model_config=settings,
            code_paths=[str(ROOT / "ddpm")],
            signature=signature(unet["image_size"], unet["num_classes"] is not None),
            input_example={"num_images": [1], "steps": [1]},
            pip_requirements=REQUIREMENTS,
            tags=tags,
        )
