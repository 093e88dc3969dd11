"""Numba CPU backend."""

from .sampling import sample_backward, sample_forward

__all__ = ["sample_forward", "sample_backward"]
