"""diffcodec: exact bits/dim and real compression with denoising diffusion models."""

__version__ = "0.1.0"
