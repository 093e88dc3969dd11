"""Array dispatch: which backend runs a call, and argument checks shared by every op.

NumPy arrays run on the CPU backend (Numba), CuPy arrays on the CUDA backend (raw kernels
through CuPy). Any other object with ``__dlpack__`` is taken zero-copy: CPU memory through
``np.from_dlpack``, CUDA memory through ``cupy.from_dlpack``. Nothing here imports Numba, CuPy
or a framework at module level.
"""

import contextlib

import numpy as np

# DLPack device types (dlpack.h)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13

CPU_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# CUDA: by name, since bfloat16 is not a NumPy type (CuPy >= 14 represents it with ml_dtypes).
GPU_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
LAYOUTS = ("NCHW", "NHWC")


def _is_cupy(obj):
    return type(obj).__module__.split(".")[0] == "cupy"


def device_of(a):
    """Context: for a CuPy array, its GPU made the current device (CuPy allocates outputs,
    caches compiled modules and launches kernels on the current device); nothing otherwise."""
    if _is_cupy(a):
        import cupy

        return cupy.cuda.Device(a.device.id)
    return contextlib.nullcontext()


def as_array(obj, name):
    """Return ``(array, device)`` for one argument; ``device`` is "cpu" or "cuda".

    Raises ``TypeError`` naming ``name`` for objects that are neither NumPy/CuPy arrays nor
    DLPack exporters.
    """
    if isinstance(obj, np.ndarray):
        return obj, "cpu"
    if _is_cupy(obj):
        return obj, "cuda"
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        dtype = getattr(obj, "dtype", None)
        if hasattr(dtype, "is_floating") and not (dtype.is_floating or dtype.is_integer
                                                  or dtype.is_complex or dtype.is_bool):
            # a TensorFlow string, variant or resource tensor: TF aborts the whole process
            # when asked to export one through DLPack
            raise TypeError(f"{name} must be a numeric array; got dtype {dtype.name}")
        if callable(getattr(obj, "is_neg", None)) and (obj.is_neg() or obj.is_conj()):
            # a torch tensor with a lazy negation or conjugation (``z.conj().imag``): DLPack
            # would hand over the stored values, without the sign. On the CPU resolve it here;
            # a GPU copy could be freed and reused on torch's stream while our kernel reads it.
            if getattr(obj, "is_cuda", False):
                raise TypeError(f"{name} is a CUDA tensor with a lazy negation or conjugation "
                                "(is_neg() or is_conj()): pass x.resolve_neg().resolve_conj()")
            obj = obj.resolve_neg().resolve_conj()
        try:
            device_type = int(obj.__dlpack_device__()[0])
        except Exception as err:  # e.g. a torch meta tensor: no storage to share
            raise TypeError(f"{name} cannot be shared through DLPack ({err})") from None
        if device_type in (_DL_CPU, _DL_CUDA_HOST):
            try:
                return np.from_dlpack(obj), "cpu"
            except (TypeError, ValueError, BufferError, RuntimeError) as err:
                # a dtype NumPy lacks (bfloat16), a tensor that requires grad, ...
                raise TypeError(f"{name} is a CPU array that NumPy cannot take through DLPack "
                                f"({err})") from None
        if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            cupy = _import_cupy(name)
            try:
                return cupy.from_dlpack(obj), "cuda"
            except (TypeError, ValueError, BufferError) as err:
                raise TypeError(
                    f"{name} is a CUDA array that CuPy cannot take through DLPack ({err}); "
                    "bfloat16 needs CuPy >= 14 with ml_dtypes"
                ) from None
        raise TypeError(f"{name} lives on DLPack device type {device_type}; only CPU and CUDA are supported")
    raise TypeError(
        f"{name} must be a NumPy or CuPy array or an object with __dlpack__, got {type(obj).__name__}"
    )


def as_arrays(optional=(), **named):
    """Convert every argument with :func:`as_array`; return ``(dict, device)``.

    Arguments named in ``optional`` may be None (and stay None). Raises ``TypeError`` when
    NumPy and CuPy (CPU and GPU) arrays are mixed, ``ValueError`` when GPU arrays live on
    different devices.
    """
    # the device types first, so that a mix is reported as one (not as a missing CuPy)
    _check_one_device_type({n: _device_kind(o) for n, o in named.items()})
    arrays, devices = {}, {}
    for name, obj in named.items():
        if obj is None and name in optional:
            arrays[name] = None
            continue
        arrays[name], devices[name] = as_array(obj, name)
    kinds = set(devices.values())  # one kind at most: checked above
    device = kinds.pop() if kinds else "cpu"
    if device == "cuda":
        check_one_gpu(**arrays)
    return arrays, device


def check_one_gpu(**arrays):
    """``ValueError`` naming the devices when the CuPy arrays among ``arrays`` (others and None
    are ignored) live on more than one GPU: a kernel on one GPU cannot read another's memory."""
    ids = {n: a.device.id for n, a in arrays.items() if _is_cupy(a)}
    if len(set(ids.values())) > 1:
        raise ValueError(f"all arrays of one call must be on the same GPU; got devices {ids}")


def _device_kind(obj):
    """"cpu", "cuda", or None (not an array, or a device :func:`as_array` will refuse)."""
    if isinstance(obj, np.ndarray):
        return "cpu"
    if _is_cupy(obj):
        return "cuda"
    try:
        device_type = int(obj.__dlpack_device__()[0])
    except Exception:
        return None
    if device_type in (_DL_CPU, _DL_CUDA_HOST):
        return "cpu"
    return "cuda" if device_type in (_DL_CUDA, _DL_CUDA_MANAGED) else None


def _check_one_device_type(devices):
    """TypeError when ``devices`` ({name: "cpu" / "cuda" / None}) mixes CPU and GPU arrays."""
    if len({d for d in devices.values() if d is not None}) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items() if d is not None)
        raise TypeError(f"all arrays of one call must be on the same device type; got {where}")


class CUDAUnavailableError(RuntimeError):
    """CUDA arrays were given but CuPy finds no usable GPU (``cupy.is_available()`` is False)."""


def _import_cupy(name="the arrays"):
    try:
        import cupy
    except ImportError:
        raise ImportError(
            f"{name} lives on a CUDA device, which deformops runs through CuPy: install it, e.g. "
            "pip install 'deformops-kernels[cuda13]' (or [cuda12])"
        ) from None
    return cupy


_CUDA_OK = []


def _cuda_available(cupy):
    if not _CUDA_OK and cupy.is_available():
        _CUDA_OK.append(True)
    return bool(_CUDA_OK)


def backend(device):
    """Return the backend package for ``device``: ``backends.cpu`` (Numba) for "cpu",
    ``backends.cuda`` (CuPy) for "cuda".

    Raises :class:`CUDAUnavailableError` for "cuda" when CuPy sees no usable GPU.
    """
    if device == "cuda":
        cupy = _import_cupy()
        if not _cuda_available(cupy):
            raise CUDAUnavailableError(
                "CUDA arrays were given but CuPy finds no usable GPU (cupy.is_available() is "
                "False: no device or no driver); pass NumPy arrays or CPU tensors instead"
            )
        from .backends import cuda

        return cuda
    from .backends import cpu

    return cpu


def xp_of(a):
    """The array module of ``a``: ``cupy`` for CuPy arrays, else ``numpy``."""
    if _is_cupy(a):
        import cupy

        return cupy
    return np


def check_dtypes(arrays, allowed=CPU_DTYPES, device="cpu"):
    """Every non-None array must have one shared dtype, from ``allowed`` on the CPU and from
    :data:`GPU_DTYPE_NAMES` on CUDA (``TypeError``)."""
    first = None
    for name, a in arrays.items():
        if a is None:
            continue
        ok = a.dtype.name in GPU_DTYPE_NAMES if device == "cuda" else a.dtype in allowed
        if not ok:
            names = (GPU_DTYPE_NAMES if device == "cuda" else [str(d) for d in allowed])
            swapped = not a.dtype.isnative and a.dtype.newbyteorder("=") in allowed
            raise TypeError(f"{name} must have dtype {', '.join(names)}; got {a.dtype}"
                            + (" (non-native byte order: convert it with .astype("
                               f"{a.dtype.newbyteorder('=').name!r}))" if swapped else ""))
        if first is None:
            first = (name, a.dtype)
        elif a.dtype != first[1]:
            raise TypeError(
                f"{name} has dtype {a.dtype} but {first[0]} has dtype {first[1]}; "
                "all floating inputs of one call must share a dtype (no silent promotion)"
            )
    return first[1]


def check_ndim(a, name, ndim, shape_doc):
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}; got shape {tuple(a.shape)}")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def check_cval(cval):
    if isinstance(cval, (str, bytes)):  # float("1.5") would take a string
        raise TypeError(f"cval must be a real number, got {type(cval).__name__}")
    try:
        return float(cval)
    except (TypeError, ValueError):
        raise TypeError(f"cval must be a real number, got {type(cval).__name__}") from None
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"cval must be within the float range, got an int of "
                         f"{int(cval).bit_length()} bits") from None


def check_needs(needs_input_grad, count):
    """``needs_input_grad`` as a tuple of ``count`` bools: a sequence of bools (or of integers,
    as truth values); a string, or entries of any other type (None, floats, arrays), are a
    ``TypeError``, not their truthiness."""
    wrong = TypeError(f"needs_input_grad must be a sequence of {count} booleans, got "
                      f"{needs_input_grad!r}")
    if isinstance(needs_input_grad, (str, bytes)):
        raise wrong
    try:
        items = tuple(needs_input_grad)
    except TypeError:
        raise wrong from None
    if not all(isinstance(v, (bool, int, np.bool_, np.integer)) for v in items):
        raise wrong
    needs = tuple(bool(v) for v in items)
    if len(needs) != count:
        raise ValueError(f"needs_input_grad must have {count} entries, got {len(needs)}")
    return needs


def to_kernel_order(a, channels_last):
    """A C-contiguous view (or copy) of a 4-D NCHW-indexed array in the kernel's memory order.

    ``channels_last=True`` returns the array as (N, H, W, C) memory. A view with the wanted
    memory order is never copied.
    """
    m = a.transpose(0, 2, 3, 1) if channels_last else a
    return xp_of(a).ascontiguousarray(m)


ALIGN = 64  # bytes: results start on a cache line (and where TensorFlow can share them)


def empty(xp, shape, dtype):
    """An uninitialised C-contiguous result array; NumPy buffers start on an ALIGN-byte
    boundary (NumPy's own aligns to 16 only; TensorFlow refuses to share a buffer that is not
    64-byte aligned, so the TF adapter would copy it)."""
    if xp is not np:
        return xp.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def empty_like(xp, a):
    """:func:`empty` with the shape and dtype of ``a`` when ``a`` is C-contiguous, else
    ``xp.empty_like(a)`` (which keeps a's memory order)."""
    if xp is np and a.flags.c_contiguous:
        return empty(xp, a.shape, a.dtype)
    return xp.empty_like(a)


def is_channels_last(a):
    """True when a 4-D NCHW-indexed array is C-contiguous in (N, H, W, C) order and not in NCHW."""
    return (not a.flags.c_contiguous) and a.transpose(0, 2, 3, 1).flags.c_contiguous
