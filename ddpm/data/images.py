"""Decoding and resizing single images, the same way for every data set.

Every image is converted to 8-bit RGB (greyscale, palette, CMYK and alpha images occur in real
folders; transparent pixels are composited over white) and brought to ``size x size`` by a
centre crop to a square followed by an antialiased bicubic resize (PIL's, which filters over the
whole footprint when downscaling). The prepared split, the FID reference and training then see
identically processed pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESAMPLE = Image.Resampling.BICUBIC


def decode_rgb(source: bytes | Path) -> Image.Image:
    """Open an encoded image (bytes or a path), fully decoded, as an RGB PIL image.

    Raises:
        OSError: the data is not a readable image (PIL's ``UnidentifiedImageError`` included),
            or it is truncated.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")


def decode_square(path: Path, size: int) -> tuple[np.ndarray | None, bool]:
    """One image file decoded and squared: ``(uint8 (size, size, 3), upscaled)``, or
    ``(None, False)`` when the file cannot be read as an image."""
    try:
        image = decode_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # broken
        return None, False
    return to_square_array(image, size), min(image.size) < size


def to_square_array(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize: uint8 array (size, size, 3)."""
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=RESAMPLE, centering=(0.5, 0.5))
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    assert array.shape == (size, size, 3), array.shape
    return array


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a batch of square images (N, H, H, 3) uint8 to (N, size, size, 3); a no-op at H."""
    assert images.ndim == 4 and images.shape[1] == images.shape[2] and images.shape[3] == 3
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = to_square_array(Image.fromarray(image), size)
    return out
