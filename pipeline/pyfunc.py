"""The MLflow pyfunc that generates images: the file MLflow logs as the model's code.

MLflow 3 logs a model from code: this file is copied into the model and run when it loads,
with ``ddpm`` (copied too, as code_paths) and the weights file as its artifact, so a
registered model keeps loading whatever later happens to the project's classes. It imports
nothing from ``pipeline``. ``model_config`` holds the experiment's sample settings, which
every column of a request defaults to; :mod:`pipeline.model` logs it.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import set_model

from ddpm.checkpoint import load_sampling_model
from ddpm.config import SamplerConfig
from ddpm.generation import generate, image_labels
from ddpm.pixels import to_uint8
from ddpm.sampling.api import model_problems
from ddpm.sampling.table import SAMPLERS

# request column -> the type a served JSON request may turn it into: every setting a row of the
# samplers' table reads, typed as its default
SAMPLER_COLUMNS = {
    name: type(SamplerConfig.model_fields[name].default)
    for name in ("sampler", *(key for row in SAMPLERS.values() for key in row.settings))
}


def _given(row: Any, column: str) -> bool:
    """Whether a request row sets ``column`` (pandas fills a missing cell with NaN or None)."""
    value = row.get(column) if hasattr(row, "get") else None
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class ImageGenerator(mlflow.pyfunc.PythonModel):
    """predict(DataFrame) -> uint8 (N, H, W, 3): every row's images, in row order.

    A row holds ``num_images`` and optionally ``seed``, any sampler setting
    (:data:`SAMPLER_COLUMNS`: ``sampler``, ``steps``, ``eta``, ``spacing``, ``order`` ...) and
    (conditional models) ``class``; what it leaves out is the experiment's own ``sample``
    setting. Image i of a seed
    is the image the sample stage writes as ``samples/images/<i>.png`` for that seed and those
    settings.
    """

    def load_context(self, context) -> None:
        self.settings: dict[str, Any] = dict(context.model_config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = context.artifacts["weights"]
        self.net = load_sampling_model(weights, self.settings["weights"], self.device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else model_input
        images = [self._row(row) for row in rows]
        cfg = self.net.model.config
        empty = np.zeros((0, cfg.image_size, cfg.image_size, cfg.in_channels), np.uint8)
        return np.concatenate(images) if images else empty

    def _row(self, row: dict[str, Any]) -> np.ndarray:
        s = self.settings
        asked = {c: kind(row[c]) for c, kind in SAMPLER_COLUMNS.items() if _given(row, c)}
        sampler = SamplerConfig(**{**{k: s[k] for k in SamplerConfig.model_fields}, **asked})
        n, seed = int(row["num_images"]), int(row["seed"]) if _given(row, "seed") else s["seed"]
        if n < 1:
            raise ValueError(f"num_images={n}: ask for at least one image")
        wrong = model_problems(sampler, self.net.model, self.net.diffusion)
        if wrong:
            raise ValueError(f"this request cannot be served: {'; '.join(wrong)}")
        classes, out = [int(row["class"])] if _given(row, "class") else s["classes"], []
        if self.net.model.config.num_classes is not None:
            image_labels([0], self.net.model.config.num_classes, classes)  # in range, or refused
        with torch.no_grad():
            for start in range(0, n, s["batch_size"]):  # sample's batches: the same images
                batch = range(start, min(start + s["batch_size"], n))
                x = generate(self.net.model, self.net.diffusion, batch, seed, sampler,
                             classes=classes, device=self.device, bf16=s["bf16"])  # fmt: skip
                out.append(to_uint8(x).numpy())
        return np.concatenate(out)


set_model(ImageGenerator())
