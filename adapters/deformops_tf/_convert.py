"""Moving tensors between TensorFlow and deformops.

TF → deformops: a CPU tensor crosses zero-copy as a read-only NumPy view (``np.from_dlpack``;
deformops accepts read-only input). A GPU tensor is handed to deformops as it is: deformops takes
any ``__dlpack__`` exporter and moves CUDA memory to CuPy itself (or says clearly that its CUDA
backend is missing).

deformops → TF: TensorFlow aborts the whole process (``Check failed: IsAligned()``) when a kernel
reads a tensor whose buffer is not 64-byte aligned, and ``tf.experimental.dlpack.from_dlpack``
does not check. NumPy's allocator aligns to 16 bytes only, so an array is shared with TF only when
it is C-contiguous and 64-byte aligned; any other array
is first copied into a buffer allocated 64-byte aligned here (one memcpy, as cheap as
``tf.convert_to_tensor``'s own copy).
"""

import numpy as np
import tensorflow as tf

ALIGN = 64  # bytes: TensorFlow's EIGEN_MAX_ALIGN_BYTES on AVX-512 machines

_DL_CPU, _DL_CUDA_HOST = 1, 3


def is_cpu(t):
    """True when the eager tensor ``t`` lives in host memory."""
    return int(t.__dlpack_device__()[0]) in (_DL_CPU, _DL_CUDA_HOST)


def to_core(t, perm=None):
    """What deformops receives for the eager tensor ``t`` (optionally transposed by ``perm``).

    CPU: a read-only NumPy view (no copy; a transposed view for ``perm``). Other devices: the
    tensor itself (transposed by TF), for deformops' own DLPack dispatch.
    """
    if t is None:
        return None
    if is_cpu(t):
        a = np.from_dlpack(t)
        return a if perm is None else a.transpose(perm)
    return t if perm is None else tf.transpose(t, perm)


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array whose buffer starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _shareable(a):
    """A C-contiguous, 64-byte aligned, writable array with canonical strides, or None."""
    if not (a.flags.c_contiguous and a.flags.writeable) or a.ctypes.data % ALIGN:
        return None
    # NumPy lets axes of length 1 carry any stride; DLPack consumers want the canonical ones.
    strides, step = [], a.itemsize
    for n in reversed(a.shape):
        strides.append(step)
        step *= max(n, 1)
    if tuple(reversed(strides)) != a.strides:
        a = np.lib.stride_tricks.as_strided(a, a.shape, tuple(reversed(strides)))
    return a


def _share(a):
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())


def to_tf(a):
    """A TF tensor with the values of ``a`` (a NumPy array, or a CuPy array from the CUDA backend).

    NumPy: shared without a copy when ``a`` is C-contiguous and 64-byte aligned; anything else
    (a misaligned buffer, a transposed view) is copied once into a 64-byte aligned buffer first.
    Never hands TF a misaligned buffer.
    """
    if not isinstance(a, np.ndarray):  # a CuPy array (CUDA allocations are 256-byte aligned)
        if not a.flags.c_contiguous:
            import cupy

            a = cupy.ascontiguousarray(a)
        return tf.experimental.dlpack.from_dlpack(a.toDlpack())
    if a.size == 0:
        return tf.zeros(a.shape, tf.as_dtype(a.dtype))
    shared = _shareable(a)
    if shared is not None:
        return _share(shared)
    # One NumPy copy into an aligned buffer (also for a transposed view: a strided NumPy copy
    # measured faster than sharing the base and a tf.transpose, whose dispatch and thread-pool
    # wake-up cost more than the copy at the sizes of this package's outputs).
    b = aligned_empty(a.shape, a.dtype)
    np.copyto(b, a)
    return _share(b)
