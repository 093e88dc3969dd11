"""Differentiable TensorFlow ops over the deformops kernels.

Conventions are TensorFlow's (``tf.nn.conv2d``): ``data_format="NHWC"`` by default (``"NCHW"``
accepted), filters shaped ``[kh, kw, Cin/groups, Cout]``, ``strides`` / ``dilations`` / ``padding``
as an int or a pair (padding is explicit zero padding, as in deformops). Offset and mask channel
orders are deformops' (see :func:`deformops.deform_conv2d`); shapes in NHWC (K = kh*kw taps, G
offset groups):

==========================  ===================  ===============================================
array                       shape (NHWC)         channel order
==========================  ===================  ===============================================
deform_conv2d ``offset``    (N, Ho, Wo, 2*G*K)   ``g*2*K + 2*k`` = Δy, ``+1`` = Δx, k = i*kw + j
deform_conv2d ``mask``      (N, Ho, Wo, G*K)     ``g*K + k``
sample ``coords``           (N, Ho, Wo, 2*G)     ``2*g`` = y (row), ``2*g + 1`` = x (column)
deform_sample ``offset``    (N, H, W, 2*G)       ``2*g`` = dy, ``2*g + 1`` = dx
==========================  ===================  ===============================================

Offset group g covers the contiguous channels ``[g*C/G, (g+1)*C/G)``.

Every op's gradient calls the matching ``*_backward`` function of deformops for the inputs whose
gradients are needed: under a ``tf.GradientTape`` (Keras ``model.fit`` included) those the tape
differentiates, so that a model's first layer skips the gradient of the model's input; without a
tape (``tf.gradients``, a tape outside ``tf.function``) all of them. Eagerly, tensors cross zero-
copy (see :mod:`deformops_tf._convert`). Inside ``tf.function`` (Keras ``model.fit`` included) the
same code runs in a ``tf.numpy_function`` (a ``tf.py_function`` where a GPU is visible), and the
static shapes TF cannot infer through it are restored with ``set_shape``. Such graphs cannot be
compiled with XLA (``jit_compile=True``) or saved as a SavedModel (a ``ValueError`` says so);
``.keras`` files (configuration + weights) are fine. AutoGraph leaves the ops unconverted
(``tf.autograph.experimental.do_not_convert``): their Python runs as written, when traced and,
in the graph nodes, at each step.

Arguments are checked when the op is called (also when a ``tf.function`` is traced): a
``ValueError`` for shapes and values, a ``TypeError`` for dtypes and types, naming the argument.
"""

import functools
import operator
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import deformops as dops
import numpy as np
import tensorflow as tf
from deformops.backends import cuda as deformops_cuda
from deformops.backends.cpu import limit_threads

from ._convert import to_core, to_numpy, to_tf

try:  # TF's own query (private; tf.config.experimental has the setters only)
    from tensorflow.python.framework.config import is_op_determinism_enabled
except ImportError:  # pragma: no cover
    is_op_determinism_enabled = None
try:  # private too: whether tf.saved_model.save (also Keras' model.export) is tracing
    from tensorflow.python.saved_model.save_context import in_save_context
except ImportError:  # pragma: no cover
    def in_save_context():
        return False
if is_op_determinism_enabled is not None:
    # tf.config.experimental.enable_op_determinism() also makes the CUDA input gradients
    # deterministic (ordered gathers instead of atomicAdd scatters)
    deformops_cuda.register_framework_switch(is_op_determinism_enabled)

__all__ = ["deform_conv2d", "deform_sample", "sample"]

_DATA_FORMATS = ("NHWC", "NCHW")
_CPU_DTYPES = (tf.float32, tf.float64)
_GPU_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

# deformops' CPU backend limits BLAS threads process-wide during a call and keeps its workspace
# per thread: TF may run independent ops on several inter-op threads at once, so calls into
# deformops take turns (each call is multi-threaded inside).
_LOCK = threading.RLock()
_WORKER = []  # the one thread that runs the kernels for calls from TF's threads
_HANDOVER_ELEMENTS = 1 << 17  # input elements from which such calls go to _WORKER


# AutoGraph converts the Python functions that a tf.function calls, closures included, and the
# converted closures are what the graph nodes run: every call and conditional expression in
# them then went through AutoGraph's dispatch at each step (about 0.5 ms per forward + backward
# of deform_conv2d in a tf.function, N=8, 64 channels, 28x28; Keras calls layers unconverted).
# The ops need no conversion: their Python control flow depends on static arguments only.
_not_converted = tf.autograph.experimental.do_not_convert


def _reset_worker():
    """After a fork: no worker thread (it does not exist in the child), and a fresh lock (a
    TF thread of the parent may have held it, and would never release it here)."""
    global _LOCK
    _WORKER.clear()
    _LOCK = threading.RLock()


os.register_at_fork(after_in_child=_reset_worker)


def _core(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a deformops call), in turn with every other call.

    Large calls from threads other than the main thread (graph-node bodies inside
    ``tf.function``, which TF runs on whichever inter-op thread is free) go to one dedicated
    thread. On TF's own threads the kernels' buffers come from the malloc arenas TF's ops
    allocate from, where glibc's adaptive thresholds hand memory back to the OS and take it
    again: a DeformConv2D training step run there page-faulted about 1200 times (3-5 times
    through the worker) and its backward took 20-25 ms instead of 15-17 (N=8, 64 channels,
    28x28; with glibc's thresholds fixed by ``mallopt``, as ``keep_freed_memory`` in
    ``examples/scaled_mnist.py`` does, the faults go away too). The kernels' workspace is also
    kept per calling thread. Small calls stay where they are: there the hand-over (two thread
    wake-ups, about 0.15 ms per call in median on a 2-core VM) costs more than it saves.
    """
    if (threading.current_thread() is threading.main_thread()
            or sum(getattr(a, "size", 0) for a in args) < _HANDOVER_ELEMENTS):
        return _locked(fn, args, kwargs)
    if not _WORKER:
        with _LOCK:
            if not _WORKER:
                _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="deformops-tf"))
    return _WORKER[0].submit(_locked, fn, args, kwargs).result()


def _locked(fn, args, kwargs):
    with _LOCK, limit_threads(_intra_op_threads()):
        return fn(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _intra_op_threads():
    """TF's intra-op thread count where set (``tf.config.threading``), which the CPU kernels do
    not exceed; None when TF chooses. Read once, at the first call: TF fixes it when its
    runtime starts, and each read costs about 17 us."""
    return tf.config.threading.get_intra_op_parallelism_threads() or None


# ------------------------------------------------------------------------------------------------
# argument checks


def _pair(value, name, minimum):
    try:
        pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
        if any(isinstance(v, bool) for v in pair):
            raise TypeError
        pair = tuple(operator.index(v) for v in pair)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _data_format(data_format):
    if data_format not in _DATA_FORMATS:
        raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {data_format!r}")
    return data_format


def _tensor(value, name, rank, doc, optional=False):
    """``value`` as a tensor of the given rank (a tf.Variable is read here, outside the gradient
    function, so that its gradient flows through the read); None stays None where
    ``optional``."""
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a tensor or array, got None")
    try:
        t = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__} "
                        f"({e})") from None
    if not t.dtype.is_floating:
        raise TypeError(f"{name} must be a floating tensor (float32 or float64 on the CPU); got "
                        f"dtype {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != rank:
        raise ValueError(f"{name} must be {rank}-D {doc}; got shape {t.shape}")
    return t


@functools.lru_cache(maxsize=1)
def _gpu_visible():
    return bool(tf.config.list_logical_devices("GPU"))


def _check_dtypes(named):
    allowed = _GPU_DTYPES if _gpu_visible() else _CPU_DTYPES
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype not in allowed:
            names = ", ".join(d.name for d in allowed)
            raise TypeError(f"{name} must have dtype {names}; got {t.dtype.name}")
        if first is None:
            first = (name, t.dtype)
        elif t.dtype != first[1]:
            raise TypeError(f"{name} has dtype {t.dtype.name} but {first[0]} has dtype "
                            f"{first[1].name}; all floating inputs of one call must share a dtype "
                            "(no silent promotion)")
    return first[1]


def _dims(t, nhwc):
    """Static (N, H, W, C) of a 4-D tensor in either format (None where unknown)."""
    s = t.shape.as_list() if t.shape.rank is not None else [None] * 4
    return (s[0], s[1], s[2], s[3]) if nhwc else (s[0], s[2], s[3], s[1])


def _fmt(nhwc, n, h, w, c):
    return (n, h, w, c) if nhwc else (n, c, h, w)


def _known(*vals):
    return all(v is not None for v in vals)


@functools.lru_cache(maxsize=64, typed=True)  # typed: 1, 1.0 and True are not one key
def _check_sampling_options(order, mode, cval, dtype_name):
    """Validate order, mode and cval with deformops itself (a call on an empty batch), so that the
    rules and messages are the core's and a ``tf.function`` fails when traced, not when run."""
    x = np.zeros((0, 1, 1, 1), dtype_name)
    dops.sample(x, np.zeros((0, 1, 1, 2), dtype_name), order=order, mode=mode, cval=cval,
                layout="NHWC")


def _check_options(order, mode, cval, dtype):
    # the options do not depend on the dtype: a CPU dtype NumPy knows (no bfloat16) will do
    name = dtype.name if dtype in _CPU_DTYPES else "float32"
    try:
        _check_sampling_options(order, mode, cval, name)
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        _check_sampling_options.__wrapped__(order, mode, cval, name)


# ------------------------------------------------------------------------------------------------
# running deformops eagerly or inside a graph


def _graph_call(fn, inputs, dtypes, shapes):
    """``fn(*inputs)`` (core arrays out, None for a gradient not needed) as a node of the graph
    being built: a list of tensors, with the static shapes TF cannot infer through it.

    Without a visible GPU the node is a ``tf.numpy_function``: its arrays share TF's buffers
    both ways (TF adopts a C-contiguous, 64-byte aligned result without copying), and it costs
    about 0.1 ms less per call than a ``tf.py_function``, which wraps every input and output
    in an eager tensor. With a GPU the node is a ``tf.py_function``, so that GPU tensors reach
    CuPy where they are.
    """
    _refuse_saving()
    if _gpu_visible():
        def body(*tensors):
            return [to_tf(a) for a in fn(*tensors) if a is not None]

        outs = tf.py_function(body, list(inputs), list(dtypes))
    else:
        def body(*arrays):
            for a in arrays:
                a.flags.writeable = False  # TF's own buffers
            return [to_numpy(a) for a in fn(*arrays) if a is not None]

        outs = tf.numpy_function(body, list(inputs), list(dtypes), stateful=True)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for o, s in zip(outs, shapes):
        o.set_shape(s)
    return outs


def _refuse_saving():
    """A clear ``ValueError`` while a SavedModel is being written: its graphs would hold the
    ops' Python bodies by reference only, and fail to run in any other process (TF's own
    message, when saving gradients, points at its options instead)."""
    if in_save_context():
        raise ValueError(
            "deformops_tf ops cannot be saved in a SavedModel (tf.saved_model.save, Keras' "
            "model.export): their graph nodes run Python (tf.numpy_function / tf.py_function), "
            "which a SavedModel cannot hold. Save the model as a .keras file (model.save("
            "'model.keras')) or its weights, and load it where deformops_tf is installed.")


# Gradients. Every op is recorded on the gradient tapes as one "DeformopsOp" whose gradient
# function learns from the tape which inputs' gradients are wanted (``skip_input_indices``: an
# input neither watched nor computed from a watched tensor, such as a model's input in
# ``model.fit``) and computes only those. ``tf.custom_gradient`` cannot: its gradient function
# gets the output gradient alone, so the first layer of every model computed an input gradient
# nobody reads (3.5 of 12 ms of DeformConv2D's backward at N=8, 64 channels, 28x28).
# Differentiation without a tape (``tf.gradients``, or a tape outside a ``tf.function``, which
# differentiates the function's graph) finds the same function through the graph node's
# gradient override, and then computes every gradient.
_GRAD_OP, _GRAD_OF_GRAD_OP = "DeformopsOp", "DeformopsOpGradient"
_GRAPH_BACKWARDS = weakref.WeakKeyDictionary()  # graph -> {graph node name: backward}
_PY_FUNC_TYPES = ("EagerPyFunc", "PyFunc")  # the op types of tf.py_function, tf.numpy_function


def _differentiable(forward, backward, inputs, dtype, out_shape):
    """``forward(*inputs)``, differentiable through ``backward(needed, dy, *inputs)``.

    ``forward`` and ``backward`` take eager tensors or NumPy arrays (what :func:`to_core`
    accepts) and return deformops arrays; ``backward`` returns one gradient per input, None
    where ``needed`` is False. Eagerly both run now; in a graph each runs in a node of its own
    (:func:`_graph_call`).
    """
    inputs = list(inputs)
    if tf.executing_eagerly():
        out = to_tf(forward(*inputs))
    else:
        graph = tf.compat.v1.get_default_graph()
        with graph.gradient_override_map(dict.fromkeys(_PY_FUNC_TYPES, _GRAD_OP)):
            (out,) = _graph_call(lambda *a: [forward(*a)], inputs, [dtype], [out_shape])
        _GRAPH_BACKWARDS.setdefault(graph, {})[out.op.name] = backward
    # On the tapes, this record replaces the graph node's own (its output is ours).
    tf.__internal__.record_gradient(_GRAD_OP, inputs, ("backward", backward), [out])
    return out


@tf.RegisterGradient(_GRAD_OP)
def _gradient(op, dy, *_):
    """The gradients of a deformops op that its caller needs (all when unknown). (A SavedModel's
    gradient tracing passes more arguments: :func:`_refuse_saving` then explains.)"""
    _refuse_saving()
    if isinstance(op, tf.Operation):  # a graph's op, differentiated without a tape
        backward, skip = _GRAPH_BACKWARDS[op.graph][op.name], None
    else:  # the tape's record
        backward, skip = op.attrs[1], op.skip_input_indices
    inputs = list(op.inputs)
    needed = [skip is None or i not in skip for i in range(len(inputs))]
    if not any(needed):
        return [None] * len(inputs)
    if tf.executing_eagerly():
        grads = [None if g is None else to_tf(g) for g in backward(needed, dy, *inputs)]
    else:
        graph = tf.compat.v1.get_default_graph()
        with graph.gradient_override_map(dict.fromkeys(_PY_FUNC_TYPES, _GRAD_OF_GRAD_OP)):
            outs = iter(_graph_call(functools.partial(backward, needed), [dy, *inputs],
                                    [t.dtype for t, n in zip(inputs, needed) if n],
                                    [t.shape for t, n in zip(inputs, needed) if n]))
        grads = [next(outs) if n else None for n in needed]
    # Differentiating these gradients (second order, or forward mode, which TF derives from
    # them) must fail loudly rather than see constants: the kernels have no derivatives.
    tf.__internal__.record_gradient(_GRAD_OF_GRAD_OP, [dy, *inputs], (),
                                    [g for g in grads if g is not None])
    return grads


@tf.RegisterGradient(_GRAD_OF_GRAD_OP)
def _no_gradient_of_gradient(op, *grads):
    raise NotImplementedError(
        "deformops_tf ops have first derivatives only: their gradients cannot be differentiated "
        "again (second-order derivatives, tf.autodiff.ForwardAccumulator)")


# ------------------------------------------------------------------------------------------------
# deform_conv2d


@_not_converted
def deform_conv2d(x, offset, filters, bias=None, *, strides=1, padding=0, dilations=1, mask=None,
                  data_format="NHWC", name=None):
    """Deformable convolution: DCNv1 (``mask=None``) and DCNv2 (``mask`` given).

    ``torchvision.ops.deform_conv2d`` semantics in ``tf.nn.conv2d`` conventions.

    Parameters
    ----------
    x : tensor, (N, H, W, Cin) (NHWC) or (N, Cin, H, W) (NCHW)
        float32 or float64 on the CPU.
    offset : tensor, (N, Ho, Wo, 2*G*K) or (N, 2*G*K, Ho, Wo)
        Per-tap (Δy, Δx) in pixels: channel ``g*2*K + 2*k`` is Δy of offset group g, tap
        ``k = i*kw + j``, and ``+1`` is Δx. ``G`` (offset groups) is inferred and must divide Cin.
    filters : tensor, [kh, kw, Cin/groups, Cout]
        As ``tf.nn.conv2d``; ``groups = Cin // filters.shape[2]`` is inferred.
    bias : tensor, (Cout,), optional
    strides, dilations : int or (int, int)
    padding : int or (int, int)
        Explicit zero padding (pad_h, pad_w) on both sides. For Keras' ``'same'`` see
        :class:`deformops_tf.DeformConv2D`.
    mask : tensor, (N, Ho, Wo, G*K) or (N, G*K, Ho, Wo), optional
        DCNv2 modulation of each sample, channel ``g*K + k``.
    data_format : {'NHWC', 'NCHW'}
    name : str, optional

    Returns
    -------
    tensor, (N, Ho, Wo, Cout) or (N, Cout, Ho, Wo)
        ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``, likewise Wo. Samples outside
        the image are 0 (zero padding: 0 at y <= -1 or y >= H, bilinear with outside corners 0).

    Gradients flow to ``x``, ``offset``, ``filters``, ``bias`` and ``mask``.
    """
    nhwc = _data_format(data_format) == "NHWC"
    stride = _pair(strides, "strides", 1)
    pad = _pair(padding, "padding", 0)
    dil = _pair(dilations, "dilations", 1)
    with tf.name_scope(name or "deform_conv2d"):
        xd = "(N, H, W, Cin)" if nhwc else "(N, Cin, H, W)"
        od = "(N, Ho, Wo, 2*G*K)" if nhwc else "(N, 2*G*K, Ho, Wo)"
        md = "(N, Ho, Wo, G*K)" if nhwc else "(N, G*K, Ho, Wo)"
        x = _tensor(x, "x", 4, xd)
        offset = _tensor(offset, "offset", 4, od)
        filters = _tensor(filters, "filters", 4, "[kh, kw, Cin/groups, Cout]")
        bias = _tensor(bias, "bias", 1, "(Cout,)", optional=True)
        mask = _tensor(mask, "mask", 4, md, optional=True)
        dtype = _check_dtypes({"x": x, "offset": offset, "filters": filters, "bias": bias,
                               "mask": mask})
        out_shape = _conv_shapes(x, offset, filters, bias, mask, stride, pad, dil, nhwc)
        layout = "NHWC" if nhwc else "NCHW"
        kw = dict(stride=stride, padding=pad, dilation=dil, layout=layout)
        has_bias, has_mask = bias is not None, mask is not None

        def reraise_shapes(*arrays):
            """In a ValueError's handler inside a graph node (shapes unknown when traced): the
            shape error in this op's words (filters, strides, ...), not the core's."""
            for a, name, rank, doc in zip(
                    arrays, ("x", "offset", "filters", "bias", "mask"), (4, 4, 4, 1, 4),
                    (xd, od, "[kh, kw, Cin/groups, Cout]", "(Cout,)", md)):
                if a is not None and len(a.shape) != rank:
                    raise ValueError(f"{name} must be {rank}-D {doc}; got shape "
                                     f"{tuple(a.shape)}") from None
            try:
                _conv_shapes(*(None if a is None else _Shaped(a.shape) for a in arrays),
                             stride, pad, dil, nhwc)
            except ValueError as named:
                raise named from None

        def forward(x_, off_, f_, *rest):
            b_ = rest[0] if has_bias else None
            m_ = rest[-1] if has_mask else None
            try:
                return _core(dops.deform_conv2d, to_core(x_), to_core(off_),
                             to_core(f_, (3, 2, 0, 1)), to_core(b_), mask=to_core(m_), **kw)
            except ValueError:
                reraise_shapes(x_, off_, f_, b_, m_)
                raise

        def backward(needed, dy, x_, off_, f_, *rest):
            need = dict(zip(names, needed))
            m_ = rest[-1] if has_mask else None
            try:
                g = _core(dops.deform_conv2d_backward, to_core(dy), to_core(x_), to_core(off_),
                          to_core(f_, (3, 2, 0, 1)), mask=to_core(m_),
                          needs_input_grad=(need["x"], need["offset"], need["filters"],
                                            need.get("mask", False), need.get("bias", False)),
                          **kw)
            except ValueError:
                reraise_shapes(x_, off_, f_, None, m_)
                raise
            grads = {"x": g.grad_input, "offset": g.grad_offset, "bias": g.grad_bias,
                     "mask": g.grad_mask,
                     "filters": None if g.grad_weight is None
                     else g.grad_weight.transpose(2, 3, 1, 0)}
            return [grads[n] if k else None for n, k in zip(names, needed)]

        named = [(n, t) for n, t in (("x", x), ("offset", offset), ("filters", filters),
                                     ("bias", bias), ("mask", mask)) if t is not None]
        names = [n for n, _ in named]
        return _differentiable(forward, backward, [t for _, t in named], dtype, out_shape)


class _Shaped:
    """A concrete shape where :func:`_conv_shapes` expects a tensor (it reads ``.shape``)."""

    def __init__(self, shape):
        self.shape = tf.TensorShape(shape)


def _conv_shapes(x, offset, filters, bias, mask, stride, pad, dil, nhwc):
    """Check every statically known shape (ValueError naming the argument); the output shape."""
    N, H, W, Cin = _dims(x, nhwc)
    kh, kw, cpg, Cout = filters.shape.as_list() if filters.shape.rank else [None] * 4
    if 0 in (kh, kw, cpg):  # each as soon as it is known: the checks below divide by them
        raise ValueError(f"filters must have non-empty [kh, kw, Cin/groups]; got {filters.shape}")
    groups = None
    if _known(Cin, cpg):
        if Cin % cpg:
            raise ValueError(f"x has {Cin} channels, not a multiple of filters.shape[2] = {cpg} "
                             "(Cin/groups)")
        groups = Cin // cpg
        if groups == 0 or (_known(Cout) and Cout % groups):
            raise ValueError(f"filters has {Cout} output channels, not divisible by groups = "
                             f"{groups} (= Cin {Cin} // filters.shape[2] {cpg})")
    if bias is not None and _known(Cout) and bias.shape[0] is not None and bias.shape[0] != Cout:
        raise ValueError(f"bias must have shape ({Cout},); got {bias.shape}")
    Ho = Wo = None
    if _known(H, kh):
        Ho = (H + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    if _known(W, kw):
        Wo = (W + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    if (Ho is not None and Ho <= 0) or (Wo is not None and Wo <= 0):
        raise ValueError(f"the kernel ({kh}, {kw}) with dilations {dil} is larger than the padded "
                         f"input ({H + 2 * pad[0]}, {W + 2 * pad[1]}): the output would be empty")
    if (H == 0 or W == 0) and N != 0 and _known(N) and Cin:
        raise ValueError(f"x has an empty spatial size {(H, W)}: there is nothing to sample")
    On, Oh, Ow, Oc = _dims(offset, nhwc)
    K = kh * kw if _known(kh, kw) else None
    if _known(N, On) and On != N:
        raise ValueError(f"offset has batch size {On} but x has {N}")
    if _known(K, Oc):
        if Oc == 0 or Oc % (2 * K) or (_known(Cin) and Cin % (Oc // (2 * K))):
            raise ValueError(f"offset must have 2*G*K channels for K = {K} taps and G offset "
                             f"groups dividing Cin = {Cin}; got shape {offset.shape}")
    for got, want, axis in ((Oh, Ho, "Ho"), (Ow, Wo, "Wo")):
        if _known(got, want) and got != want:
            raise ValueError(f"offset must have the output's spatial size (Ho, Wo) = {(Ho, Wo)}; "
                             f"got shape {offset.shape}")
    if mask is not None:
        Mn, Mh, Mw, Mc = _dims(mask, nhwc)
        if _known(N, Mn) and Mn != N:
            raise ValueError(f"mask has batch size {Mn} but x has {N}")
        if _known(K, Oc, Mc) and Oc % (2 * K) == 0 and Mc != Oc // 2:
            raise ValueError(f"mask must have G*K = {Oc // 2} channels (offset has {Oc}); got "
                             f"shape {mask.shape}")
        for got, want in ((Mh, Ho), (Mw, Wo)):
            if _known(got, want) and got != want:
                raise ValueError(f"mask must have the output's spatial size (Ho, Wo) = "
                                 f"{(Ho, Wo)}; got shape {mask.shape}")
    return tf.TensorShape(_fmt(nhwc, N if N is not None else On, Ho, Wo, Cout))


# ------------------------------------------------------------------------------------------------
# sample / deform_sample


def _sampling(x, coords, order, mode, cval, data_format, name, coords_name, relative):
    nhwc = _data_format(data_format) == "NHWC"
    layout = "NHWC" if nhwc else "NCHW"
    with tf.name_scope(name):
        x = _tensor(x, "x", 4, "(N, H, W, C)" if nhwc else "(N, C, H, W)")
        coords = _tensor(coords, coords_name, 4,
                         "(N, Ho, Wo, 2G)" if nhwc else "(N, 2G, Ho, Wo)")
        dtype = _check_dtypes({"x": x, coords_name: coords})
        _check_options(order, mode, cval, dtype)
        N, H, W, C = _dims(x, nhwc)
        Nc, Ho, Wo, G2 = _dims(coords, nhwc)
        if _known(N, Nc) and N != Nc:
            raise ValueError(f"{coords_name} has batch size {Nc} but x has {N}")
        if _known(G2) and (G2 < 2 or G2 % 2):
            raise ValueError(f"{coords_name} must have 2G channels (a (y, x) pair per offset "
                             f"group); got {G2}")
        if _known(G2, C) and G2 >= 2 and C % (G2 // 2):
            raise ValueError(f"x has {C} channels, which {G2 // 2} offset groups of "
                             f"{coords_name} do not divide")
        if relative:
            for got, want in ((Ho, H), (Wo, W)):
                if _known(got, want) and got != want:
                    raise ValueError(f"{coords_name} must have the spatial size of x, {(H, W)}; "
                                     f"got {(Ho, Wo)}")
            Ho = H if Ho is None else Ho
            Wo = W if Wo is None else Wo
        out_shape = tf.TensorShape(_fmt(nhwc, N if N is not None else Nc, Ho, Wo, C))
        kw = dict(order=order, mode=mode, cval=cval, layout=layout)
        fwd_fn = dops.deform_sample if relative else dops.sample
        bwd_fn = dops.deform_sample_backward if relative else dops.sample_backward

        def forward(x_, c_):
            return _core(fwd_fn, to_core(x_), to_core(c_), **kw)

        def backward(needed, dy, x_, c_):
            g = _core(bwd_fn, to_core(dy), to_core(x_), to_core(c_), needs_input_grad=needed,
                      **kw)
            return [a if k else None for a, k in zip(g, needed)]

        return _differentiable(forward, backward, [x, coords], dtype, out_shape)


@_not_converted
def sample(x, coords, *, order=1, mode="grid-constant", cval=0.0, data_format="NHWC", name=None):
    """Sample every channel of ``x`` at absolute pixel coordinates (differentiable).

    ``out[n, i, j, c] = interp(x[n, :, :, c], coords[n, i, j, 2g], coords[n, i, j, 2g + 1])`` for
    channel c in offset group g (NHWC shown), exactly ``scipy.ndimage.map_coordinates`` with the
    same order, mode and cval (see :func:`deformops.sample`).

    Parameters
    ----------
    x : tensor, (N, H, W, C) or (N, C, H, W)
    coords : tensor, (N, Ho, Wo, 2G) or (N, 2G, Ho, Wo)
        (y, x) pixel coordinates per offset group; same dtype as ``x``.
    order : {0, 1}
        Nearest or bilinear.
    mode : str
        'constant', 'grid-constant', 'nearest', 'reflect' (= 'grid-mirror'), 'mirror', 'wrap' or
        'grid-wrap', as in ``scipy.ndimage``.
    cval : float
    data_format : {'NHWC', 'NCHW'}
    name : str, optional

    Returns
    -------
    tensor, (N, Ho, Wo, C) or (N, C, Ho, Wo)

    Gradients flow to ``x`` and ``coords``.
    """
    return _sampling(x, coords, order, mode, cval, data_format, name or "sample", "coords",
                     relative=False)


@_not_converted
def deform_sample(x, offset, *, order=1, mode="grid-constant", cval=0.0, data_format="NHWC",
                  name=None):
    """Sample every channel of ``x`` at offsets from its own pixel grid (differentiable).

    Output (i, j) of channel c in offset group g reads ``x`` at ``(i + offset[n, i, j, 2g],
    j + offset[n, i, j, 2g + 1])`` (NHWC shown); a zero offset returns ``x``.

    Parameters
    ----------
    x : tensor, (N, H, W, C) or (N, C, H, W)
    offset : tensor, (N, H, W, 2G) or (N, 2G, H, W)
        (dy, dx) in pixels per offset group; same dtype as ``x``.
    order, mode, cval, data_format, name
        As for :func:`sample`.

    Returns
    -------
    tensor, the shape of ``x``

    Gradients flow to ``x`` and ``offset``.
    """
    return _sampling(x, offset, order, mode, cval, data_format, name or "deform_sample", "offset",
                     relative=True)
