"""Dataset loaders: MNIST from its original IDX files (pyconvext.data.mnist)."""

from . import mnist

__all__ = ["mnist"]
