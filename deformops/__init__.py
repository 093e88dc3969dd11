"""deformops: deformable sampling and deformable convolution kernels with exact gradients.

NumPy arrays run on the CPU through Numba kernels; objects with ``__dlpack__`` are taken
zero-copy. ``import deformops`` imports NumPy only: Numba compiles on first use.

Public API
----------
map_coordinates
    Drop-in for ``scipy.ndimage.map_coordinates`` on 2-D inputs, order 0 and 1.
sample, sample_backward
    Batched sampling at absolute coordinates, and its gradients.
deform_sample, deform_sample_backward
    Sampling at offsets from the regular grid, and its gradients.
deform_conv2d, deform_conv2d_backward
    Deformable convolution v1/v2 (torchvision semantics), and its gradients.
"""

from . import _forks  # noqa: F401  (the fork hook, before any Numba code runs)
from .deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from .interpolation import map_coordinates
from .sampling import (
    DeformSampleGrads,
    SampleGrads,
    deform_sample,
    deform_sample_backward,
    sample,
    sample_backward,
)

__version__ = "0.1.0"

__all__ = [
    "map_coordinates",
    "sample",
    "sample_backward",
    "deform_sample",
    "deform_sample_backward",
    "deform_conv2d",
    "deform_conv2d_backward",
    "SampleGrads",
    "DeformSampleGrads",
    "DeformConv2dGrads",
]
