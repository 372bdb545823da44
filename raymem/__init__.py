"""raymem: distributed scans of text-to-image diffusion models for training-data memorization."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API loads lazily: `import raymem` stays cheap (no Ray, torch or DuckDB until used).
    if name in ("scan", "load", "query"):
        from raymem import api

        return getattr(api, name)
    raise AttributeError(f"module 'raymem' has no attribute {name!r}")


__all__ = ["scan", "load", "query", "__version__"]
