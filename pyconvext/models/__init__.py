"""Architectures torchvision lacks, built from pyconvext's modules (or native
ones with native=True, for comparison)."""

from .mnist import MNISTNet

__all__ = ["MNISTNet"]
