"""scvi_fast: a fast, drop-in backend for scVI."""

__version__ = "0.1.0"
