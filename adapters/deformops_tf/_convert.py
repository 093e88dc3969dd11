"""Moving tensors between TensorFlow and deformops.

TF → deformops: a CPU tensor crosses zero-copy as a read-only NumPy view (``np.from_dlpack``;
deformops accepts read-only input). A GPU tensor crosses zero-copy as a CuPy view (through a
legacy DLPack capsule, after TF's queued GPU work: ``tf.Tensor.__dlpack__`` refuses CuPy's
stream argument); without CuPy it is handed to deformops as it is, whose error says what to
install. CuPy results are synchronised before TF reads them. (The GPU path has not been run
here: this project's CI carries tensorflow-cpu only.)

deformops → TF: TensorFlow aborts the whole process (``Check failed: IsAligned()``) when a kernel
reads a tensor whose buffer is not 64-byte aligned, and ``tf.experimental.dlpack.from_dlpack``
does not check. NumPy's allocator aligns to 16 bytes only, so an array is shared with TF only when
it is C-contiguous and 64-byte aligned (deformops allocates its results so); any other array
is first copied into a buffer allocated 64-byte aligned here (one memcpy, as cheap as
``tf.convert_to_tensor``'s own copy).

Inside a graph on the CPU the ops run in ``tf.numpy_function`` bodies: TF hands them its
buffers as NumPy arrays, and adopts a C-contiguous, 64-byte aligned result without a copy
(:func:`to_numpy` prepares one).
"""

import numpy as np
import tensorflow as tf

# bytes: TensorFlow's EIGEN_MAX_ALIGN_BYTES on AVX-512 machines (deformops' CPU results start
# on such a boundary too)
ALIGN = 64

_DL_CPU, _DL_CUDA_HOST = 1, 3


def is_cpu(t):
    """True when the eager tensor ``t`` lives in host memory."""
    return int(t.__dlpack_device__()[0]) in (_DL_CPU, _DL_CUDA_HOST)


def to_core(t, perm=None):
    """What deformops receives for the eager tensor ``t`` (optionally transposed by ``perm``).

    CPU: a read-only NumPy view (no copy; a transposed view for ``perm``). Other devices: the
    tensor itself (transposed by TF), for deformops' own DLPack dispatch. A NumPy array (what
    a ``tf.numpy_function`` body receives) is used as it is.
    """
    if t is None:
        return None
    if isinstance(t, np.ndarray):
        return t if perm is None else t.transpose(perm)
    if is_cpu(t):
        a = np.from_dlpack(t)
        return a if perm is None else a.transpose(perm)
    if perm is not None:
        t = tf.transpose(t, perm)
    try:
        import cupy
    except ImportError:
        return t  # deformops raises its own error naming what to install
    # tf.Tensor.__dlpack__ refuses the stream argument that cupy.from_dlpack passes: go through
    # a legacy capsule, after TF's queued GPU work is done (DLPack capsules carry no stream).
    try:
        tf.test.experimental.sync_devices()
    except RuntimeError:  # refused outside eager mode; py_function bodies run eagerly
        pass
    capsule = tf.experimental.dlpack.to_dlpack(t)
    from_capsule = getattr(cupy, "fromDlpack", None) or cupy.from_dlpack
    return from_capsule(capsule)


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


def to_numpy(a):
    """``a`` (a NumPy result of deformops) as a ``tf.numpy_function`` returns it: C-contiguous and
    64-byte aligned, so that TF adopts the buffer without a copy (a transposed view or a
    misaligned buffer is copied once, here)."""
    shared = _shareable(a) if a.size else a
    if shared is not None:
        return shared
    b = aligned_empty(a.shape, a.dtype)
    np.copyto(b, a)
    return b


def _share(a):
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())


def to_tf(a):
    """A TF tensor with the values of ``a`` (a NumPy array, or a CuPy array from the CUDA backend).

    NumPy: shared without a copy when ``a`` is C-contiguous and 64-byte aligned; anything else
    (a misaligned buffer, a transposed view) is copied once into a 64-byte aligned buffer first.
    Never hands TF a misaligned buffer.
    """
    if not isinstance(a, np.ndarray):  # a CuPy array (CUDA allocations are 256-byte aligned)
        import cupy

        a = cupy.ascontiguousarray(a)
        cupy.cuda.get_current_stream().synchronize()  # TF reads it on its own stream
        return tf.experimental.dlpack.from_dlpack(a.toDlpack())
    if a.size == 0:
        return tf.zeros(a.shape, tf.as_dtype(a.dtype))
    # A strided NumPy copy (to_numpy) measured faster than sharing the base and a tf.transpose,
    # whose dispatch and thread-pool wake-up cost more than the copy at this package's sizes.
    return _share(to_numpy(a))
