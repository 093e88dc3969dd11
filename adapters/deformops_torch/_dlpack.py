"""Moving tensors between torch and deformops without copies.

CUDA tensors cross as CuPy views through DLPack (``cupy.from_dlpack`` / ``torch.from_dlpack``).
CPU tensors cross as NumPy views through ``Tensor.numpy`` / ``torch.from_numpy``: the same
zero-copy sharing as DLPack, measured at about 1 µs per tensor instead of 3 (this machine,
torch 2.14), which matters at the 50 µs per-call budget of small inputs. Either way the tensor
and the array share one buffer (same ``data_ptr``).
"""

import contextlib

import numpy as np
import torch

# deformops' CPU kernels take these; CUDA dtypes are checked by the CUDA backend itself.
_CPU_DTYPES = (torch.float32, torch.float64)


def to_array(t, name):
    """A NumPy (CPU) or CuPy (CUDA) view of tensor ``t``, detached from autograd; None stays None.

    Raises ``TypeError`` naming ``name`` for non-tensors and for CPU floating dtypes other than
    float32/float64 (NumPy cannot even represent bfloat16); other dtypes reach the core, whose
    ``TypeError`` names the argument.
    """
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.requires_grad:
        t = t.detach()
    if t.is_neg():  # a lazily negated view (x.conj().imag): DLPack would export it unnegated
        t = t.resolve_neg()
    if t.is_cpu and t.dtype in _CPU_DTYPES and t.layout == torch.strided:
        return t.numpy()  # the common case first: ~1 us instead of ~2 (5 tensors per call)
    if t.is_cpu:
        if t.dtype.is_floating_point and t.dtype not in _CPU_DTYPES:  # NumPy has no bfloat16
            raise TypeError(f"{name} must have dtype float32 or float64 on the CPU; got {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        return t.numpy()
    if t.is_cuda:
        return _cupy(name).from_dlpack(t)
    raise TypeError(f"{name} is on device {t.device}; deformops supports CPU and CUDA tensors")


def _cupy(name):
    """CuPy, or an ImportError that says how to get it (not a bare "No module named")."""
    try:
        import cupy
    except ImportError:
        raise ImportError(
            f"{name} is on a CUDA device; deformops runs CUDA tensors through CuPy, which is not "
            "installed: pip install 'deformops-kernels[cuda13]' (or [cuda12])") from None
    return cupy


def to_tensor(a):
    """A torch tensor sharing the memory of the NumPy or CuPy array ``a``."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def on_stream(t):
    """Context in which CuPy launches on torch's current stream of ``t``'s device (CUDA only)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    cupy = _cupy("a CUDA tensor")

    stream = torch.cuda.current_stream(t.device)
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(t.device.index))
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index))
    return stack


def is_channels_last(t):
    """True when a 4-D tensor is laid out (N, H, W, C) in memory and not plainly contiguous.

    The same rule as ``deformops._arrays.is_channels_last`` for the NumPy view of ``t``: such
    inputs run the NHWC sampling kernels and give channels_last outputs.
    """
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))
