"""raymem: distributed scans of text-to-image diffusion models for training-data memorization."""

__version__ = "0.1.0"
