"""CUDA backend: raw CUDA kernels compiled and launched through CuPy.

Importing this package does not import CuPy (CuPy loads on the first kernel call), so the
deterministic switch can be set anywhere:

- :func:`set_deterministic` / :func:`deterministic` (a context manager) / the environment
  variable ``DEFORMOPS_DETERMINISTIC=1``: the input gradients of ``sample_backward``,
  ``deform_sample_backward`` and ``deform_conv2d_backward`` are then gathered in a fixed order
  (bit-identical from run to run) instead of scattered with ``atomicAdd`` (the default, faster).
  Every other gradient is deterministic in both modes (no atomics). The setting is the
  process's (backward passes run on the frameworks' own threads); ``deformops_torch`` also
  follows ``torch.use_deterministic_algorithms`` (:func:`register_framework_switch`).

Kernel sources: ``kernels/*.cu`` and ``*.cuh``, C++ templates over the scalar type (``__half``,
``__nv_bfloat16``, ``float``, ``double``; half types accumulate in float) and the index type
(``int``, or ``long long`` when any element count exceeds 2^31 - 1 less 1024, the headroom of
the kernels' strided loops). One ``cupy.RawModule`` per
(device, dtype, index type, options), compiled on first use and cached; every launch goes to
CuPy's current stream.
"""

from ._switch import (deterministic, is_deterministic, register_framework_switch,
                      set_deterministic)
from .deform_conv import deform_conv2d_backward, deform_conv2d_forward
from .sampling import sample_backward, sample_forward

__all__ = [
    "sample_forward",
    "sample_backward",
    "deform_conv2d_forward",
    "deform_conv2d_backward",
    "set_deterministic",
    "is_deterministic",
    "deterministic",
    "register_framework_switch",
]
