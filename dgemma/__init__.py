"""dgemma: DiffusionGemma-style block-diffusion text generation in PyTorch."""

__version__ = "0.1.0"
