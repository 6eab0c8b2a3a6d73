"""ddpm: denoising diffusion probabilistic models in plain PyTorch.

No file layout, tracking or CLI lives here; ``pipeline`` connects this library to DVC and MLflow.
"""

__version__ = "0.1.0"
