"""Stage outputs, written atomically (see :mod:`ddpm.files`): JSON, PNGs and TSV curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddpm.files import atomic_write_bytes, temporary_sibling


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def save_png(path: Path, image: torch.Tensor) -> None:
    """Write uint8 (H, W, C) as a PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    Image.fromarray(image.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
