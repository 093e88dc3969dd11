"""deformops_tf ops: forward and gradients, eager and in tf.function.

Oracles, per test:
- the NumPy core (``deformops.*`` and ``*_backward`` called on the same arrays): the adapter must
  return exactly its values, in both data formats, eagerly and inside ``tf.function``;
- ``tf.test.compute_gradient``: float64 numerical Jacobians (central differences) of the ops,
  at sample points kept away from the integer kinks of bilinear interpolation;
- for ``deform_sample``: a pure-TensorFlow bilinear reference written here with ``tf.gather_nd``
  (modes 'grid-constant' and 'nearest'), forward and its TF-autodiff gradients.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import deformops as dops  # noqa: E402
import deformops_tf as dtf  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _t(a):
    return None if a is None else tf.constant(a)


def _frac_offsets(rng, shape, lo=-2, hi=2):
    """Offsets whose fractional part is in [0.15, 0.85]: no sample sits within 0.15 px of a
    grid line, so finite differences with delta 1e-3 never straddle a kink."""
    return rng.integers(lo, hi, size=shape) + rng.uniform(0.15, 0.85, size=shape)


def _conv_data(rng, N, Cin, Cout, H, W, k, stride, pad, dil, groups, G, with_mask, with_bias):
    kh, kw = k
    Ho = (H + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    K = kh * kw
    x = rng.random((N, H, W, Cin))
    offset = _frac_offsets(rng, (N, Ho, Wo, 2 * G * K))
    filters = rng.standard_normal((kh, kw, Cin // groups, Cout))
    bias = rng.standard_normal(Cout) if with_bias else None
    mask = rng.random((N, Ho, Wo, G * K)) if with_mask else None
    return x, offset, filters, bias, mask


def _nchw(a):
    return None if a is None else np.ascontiguousarray(a.transpose(0, 3, 1, 2))


CONV_CASES = [
    # N, Cin, Cout, H, W, k, stride, pad, dil, groups, G, mask, bias
    (2, 4, 6, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    (1, 4, 4, 8, 9, (3, 2), (2, 1), (1, 0), (1, 2), 2, 2, False, True),
    (2, 6, 3, 6, 6, (1, 3), (1, 2), (0, 2), (2, 1), 3, 3, True, False),
    (0, 2, 2, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),  # empty batch
]


def _conv_grads_tf(fn, tensors):
    with tf.GradientTape() as tape:
        tape.watch([t for t in tensors if t is not None])
        out = fn(*tensors)
        loss = tf.reduce_sum(out * tf.cos(out))  # a non-trivial grad_out
    grads = tape.gradient(loss, [t for t in tensors if t is not None])
    return out, grads


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("graph", [False, True])
def test_deform_conv2d_equals_numpy_core(case, data_format, graph):
    """Oracle: deformops.deform_conv2d / deform_conv2d_backward on the same NumPy arrays."""
    N, Cin, Cout, H, W, k, stride, pad, dil, groups, G, with_mask, with_bias = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x, offset, filters, bias, mask = _conv_data(rng, N, Cin, Cout, H, W, k, stride, pad, dil,
                                                groups, G, with_mask, with_bias)
    if data_format == "NCHW":
        x, offset, mask = _nchw(x), _nchw(offset), _nchw(mask)
    kw = dict(strides=stride, padding=pad, dilations=dil, data_format=data_format)

    def fn(x_, o_, f_, b_, m_):
        return dtf.deform_conv2d(x_, o_, f_, b_, mask=m_, **kw)

    run = tf.function(lambda *t: _conv_grads_tf(fn, t)) if graph else (
        lambda *t: _conv_grads_tf(fn, t))
    out, grads = run(*map(_t, (x, offset, filters, bias, mask)))

    weight = filters.transpose(3, 2, 0, 1)
    core_kw = dict(stride=stride, padding=pad, dilation=dil, mask=mask, layout=data_format)
    ref = dops.deform_conv2d(x, offset, weight, bias, **core_kw)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert tuple(out.shape) == ref.shape
    g = dops.deform_conv2d_backward(-ref * np.sin(ref) + np.cos(ref), x, offset, weight,
                                    needs_input_grad=(True, True, True, with_mask, with_bias),
                                    **core_kw)
    want = [g.grad_input, g.grad_offset, g.grad_weight.transpose(2, 3, 1, 0)]
    want += [g.grad_bias] if with_bias else []
    want += [g.grad_mask] if with_mask else []
    assert len(grads) == len(want)
    for got, exp in zip(grads, want):
        assert tuple(got.shape) == exp.shape
        np.testing.assert_allclose(got.numpy(), exp, rtol=0, atol=1e-12 * (1 + np.abs(exp).max(
            initial=0)))


def test_deform_conv2d_gradients_match_numerical_jacobians():
    """Oracle: tf.test.compute_gradient (float64 central differences) for all five inputs."""
    rng = np.random.default_rng(1)
    x, offset, filters, bias, mask = _conv_data(rng, 1, 2, 2, 4, 5, (3, 3), (1, 1), (1, 1),
                                                (1, 1), 1, 1, True, True)

    def f(x_, o_, f_, b_, m_):
        return dtf.deform_conv2d(x_, o_, f_, b_, padding=1, mask=m_)

    theo, num = tf.test.compute_gradient(f, [tf.constant(a) for a in
                                             (x, offset, filters, bias, mask)], delta=1e-4)
    for name, jt, jn in zip(("x", "offset", "filters", "bias", "mask"), theo, num):
        np.testing.assert_allclose(jt, jn, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("op", ["sample", "deform_sample"])
@pytest.mark.parametrize("mode", ["grid-constant", "nearest", "reflect", "wrap"])
def test_sampling_gradients_match_numerical_jacobians(op, mode):
    """Oracle: tf.test.compute_gradient (float64) for x and coords/offset, NHWC and G = 2."""
    rng = np.random.default_rng(2)
    N, H, W, C = 1, 4, 5, 4
    x = rng.random((N, H, W, C))
    if op == "sample":
        c = np.stack([rng.integers(-2, H + 1, (N, 3, 4, 2)), rng.integers(-2, W + 1, (N, 3, 4, 2))],
                     -1).reshape(N, 3, 4, 4).astype(float)
        c += rng.uniform(0.15, 0.85, c.shape)
    else:
        c = _frac_offsets(rng, (N, H, W, 4))
    fn = getattr(dtf, op)
    theo, num = tf.test.compute_gradient(lambda a, b: fn(a, b, mode=mode, cval=0.5),
                                         [tf.constant(x), tf.constant(c)], delta=1e-4)
    for jt, jn in zip(theo, num):
        np.testing.assert_allclose(jt, jn, rtol=1e-6, atol=1e-7)


def _tf_deform_sample_ref(x, offset, mode, cval):
    """Pure-TF bilinear deform_sample (NHWC, G offset groups) with tf.gather_nd.

    'grid-constant': the image padded with cval, interpolated. 'nearest': coordinates clipped to
    [0, n-1] first (the original Keras project's rule)."""
    N, H, W, C = x.shape
    G = offset.shape[-1] // 2
    dt = x.dtype
    y = tf.range(H, dtype=dt)[None, :, None, None] + offset[..., 0::2]
    xx = tf.range(W, dtype=dt)[None, None, :, None] + offset[..., 1::2]
    y, xx = tf.repeat(y, C // G, axis=-1), tf.repeat(xx, C // G, axis=-1)  # (N, H, W, C)
    if mode == "nearest":
        y, xx = tf.clip_by_value(y, 0, H - 1), tf.clip_by_value(xx, 0, W - 1)
    y0, x0 = tf.floor(y), tf.floor(xx)
    ly, lx = y - y0, xx - x0
    n = tf.broadcast_to(tf.range(N)[:, None, None, None], (N, H, W, C))
    c = tf.broadcast_to(tf.range(C)[None, None, None, :], (N, H, W, C))

    def corner(yc, xc):
        inside = (yc >= 0) & (yc <= H - 1) & (xc >= 0) & (xc <= W - 1)
        yi = tf.cast(tf.clip_by_value(yc, 0, H - 1), tf.int32)
        xi = tf.cast(tf.clip_by_value(xc, 0, W - 1), tf.int32)
        v = tf.gather_nd(x, tf.stack([n, yi, xi, c], -1))
        return tf.where(inside, v, tf.constant(cval, dt))

    return ((1 - ly) * (1 - lx) * corner(y0, x0) + (1 - ly) * lx * corner(y0, x0 + 1)
            + ly * (1 - lx) * corner(y0 + 1, x0) + ly * lx * corner(y0 + 1, x0 + 1))


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 2), H=st.integers(1, 7), W=st.integers(1, 7), G=st.sampled_from([1, 2, 3]),
    cpg=st.integers(1, 2), mode=st.sampled_from(["grid-constant", "nearest"]),
    seed=st.integers(0, 2**16),
)
def test_deform_sample_matches_gather_reference(N, H, W, G, cpg, mode, seed):
    """Oracle: the pure-TF gather_nd bilinear reference above, forward and autodiff gradients."""
    rng = np.random.default_rng(seed)
    C = G * cpg
    x = tf.constant(rng.standard_normal((N, H, W, C)))
    offset = tf.constant(_frac_offsets(rng, (N, H, W, 2 * G), -3, 3))
    cval = 0.0 if mode == "nearest" else 0.25
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, offset])
        got = dtf.deform_sample(x, offset, mode=mode, cval=cval)
        ref = _tf_deform_sample_ref(x, offset, mode, cval)
        w = tf.constant(rng.standard_normal(got.shape))
        lg, lr = tf.reduce_sum(got * w), tf.reduce_sum(ref * w)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-12)
    for a, b in zip(tape.gradient(lg, [x, offset]), tape.gradient(lr, [x, offset])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-11)


@settings(max_examples=12, deadline=None)
@given(
    op=st.sampled_from(["sample", "deform_sample"]), data_format=st.sampled_from(["NHWC", "NCHW"]),
    order=st.sampled_from([0, 1]),
    mode=st.sampled_from(["constant", "grid-constant", "nearest", "reflect", "mirror", "wrap",
                          "grid-wrap"]),
    dtype=st.sampled_from(["float32", "float64"]), N=st.integers(0, 2), G=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_sampling_ops_equal_numpy_core(op, data_format, order, mode, dtype, N, G, seed):
    """Oracle: deformops.sample / deform_sample and their *_backward on the same arrays."""
    rng = np.random.default_rng(seed)
    H, W, C, Ho, Wo = 5, 6, 2 * G, 3, 4
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    if op == "sample":
        c = rng.uniform(-3, 8, (N, Ho, Wo, 2 * G)).astype(dtype)
    else:
        c = rng.uniform(-3, 3, (N, H, W, 2 * G)).astype(dtype)
    if data_format == "NCHW":
        x, c = _nchw(x), _nchw(c)
    kw = dict(order=order, mode=mode, cval=0.5)
    xt, ct = tf.constant(x), tf.constant(c)
    with tf.GradientTape() as tape:
        tape.watch([xt, ct])
        out = getattr(dtf, op)(xt, ct, data_format=data_format, **kw)
        loss = tf.reduce_sum(out * out)
    gx, gc = tape.gradient(loss, [xt, ct])
    ref = getattr(dops, op)(x, c, layout=data_format, **kw)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert out.dtype == tf.as_dtype(dtype)
    g = getattr(dops, op + "_backward")(2 * ref, x, c, layout=data_format, **kw)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(gx.numpy(), g[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(gc.numpy(), g[1], rtol=tol, atol=tol)


def test_graph_mode_restores_static_shapes():
    """tf.function with an unknown batch: outputs and gradients keep every known dimension."""
    spec = [tf.TensorSpec((None, 9, 8, 4), tf.float32), tf.TensorSpec((None, 5, 4, 18), tf.float32),
            tf.TensorSpec((3, 3, 2, 6), tf.float32), tf.TensorSpec((None, 5, 4, 9), tf.float32)]
    seen = {}

    @tf.function(input_signature=spec)
    def f(x, off, w, m):
        with tf.GradientTape() as tape:
            tape.watch([x, off, w, m])
            y = dtf.deform_conv2d(x, off, w, strides=2, padding=1, mask=m)
            s = dtf.deform_sample(x, tf.zeros_like(x)[..., :2])
            c = dtf.sample(x, off[..., :2], mode="wrap")
            loss = tf.reduce_sum(y) + tf.reduce_sum(s) + tf.reduce_sum(c)
        grads = tape.gradient(loss, [x, off, w, m])
        seen.update(y=y.shape, s=s.shape, c=c.shape, grads=[g.shape for g in grads])
        return y, grads

    rng = np.random.default_rng(3)
    args = [tf.constant(rng.random((2,) + tuple(s.shape[1:]) if s.shape[0] is None
                                   else tuple(s.shape)).astype("float32")) for s in spec]
    y, grads = f(*args)
    assert seen["y"].as_list() == [None, 5, 4, 6]
    assert seen["s"].as_list() == [None, 9, 8, 4]
    assert seen["c"].as_list() == [None, 5, 4, 4]
    assert [g.as_list() for g in seen["grads"]] == [s.shape.as_list() for s in spec]
    assert tuple(y.shape) == (2, 5, 4, 6)


def test_variables_receive_gradients_and_outputs_are_owned_by_tf():
    """A tf.Variable passed as filters gets its gradient; outputs survive their NumPy source."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.random((1, 5, 5, 2)).astype("float32"))
    off = tf.constant(rng.uniform(-1, 1, (1, 5, 5, 18)).astype("float32"))
    w = tf.Variable(rng.standard_normal((3, 3, 2, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        y = dtf.deform_conv2d(x, off, w, padding=1)
        loss = tf.reduce_sum(y)
    gw = tape.gradient(loss, w)
    assert gw is not None and gw.shape == w.shape
    import gc

    gc.collect()
    ref = dops.deform_conv2d(x.numpy(), off.numpy(), w.numpy().transpose(3, 2, 0, 1), padding=1,
                             layout="NHWC")
    np.testing.assert_array_equal(y.numpy(), ref)


def test_dlpack_zero_copy_both_ways():
    """TF -> NumPy shares memory (read-only); an aligned contiguous NumPy result is shared too."""
    from deformops_tf import _convert

    t = tf.constant(np.arange(24.0).reshape(2, 3, 4))
    a = _convert.to_core(t)
    assert not a.flags.writeable
    assert a.ctypes.data == _convert.to_core(t).ctypes.data
    b = _convert.aligned_empty((3, 5), np.float32)
    b[...] = 1
    tb = _convert.to_tf(b)
    assert np.from_dlpack(tb).ctypes.data == b.ctypes.data
    assert float(tf.reduce_sum(tb)) == 15.0


def test_numpy_function_results_are_contiguous_and_aligned():
    """What a tf.numpy_function body returns: an aligned C-contiguous result as it is (TF adopts
    it without a copy), anything else (misaligned, transposed, strided) copied once into an
    aligned buffer with the same values."""
    from deformops_tf import _convert

    a = _convert.aligned_empty((4, 6), np.float32)
    a[...] = np.arange(24).reshape(4, 6)
    assert _convert.to_numpy(a) is a
    raw = np.arange(4 * 6 + 1, dtype=np.float32)
    misaligned = raw[1:].reshape(4, 6)  # NumPy aligns to 16 bytes: 4 bytes on is never 64
    assert misaligned.ctypes.data % 64
    for view in (misaligned, a.T, a[:, ::2], np.empty((0, 3), np.float32)):
        got = _convert.to_numpy(view)
        np.testing.assert_array_equal(got, view)
        assert got.flags.c_contiguous and (got.size == 0 or got.ctypes.data % 64 == 0)


def test_numpy_function_bodies_see_tf_buffers_read_only():
    """A tf.numpy_function body gets TF's own buffers: deformops code that wrote to an input
    would change a tensor TF still holds. The inputs arrive read-only (a write raises and the
    tensor keeps its values); an input returned as an output reaches TF with its values."""
    from deformops_tf import ops

    seen = []

    def write(a):
        seen.append(a.flags.writeable)
        a += 1
        return [a]

    x = tf.constant(np.arange(6.0).reshape(2, 3))

    @tf.function
    def f(t, fn):
        return ops._graph_call(fn, [t], [tf.float64], [t.shape])

    with pytest.raises(tf.errors.OpError, match="read-only"):
        f(x, write)
    assert seen == [False]
    np.testing.assert_array_equal(x.numpy(), np.arange(6.0).reshape(2, 3))
    inputs = []
    (y,) = f(x, lambda a: inputs.append(a) or [a])
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    assert not inputs[0].flags.writeable


def test_calls_from_tf_threads_through_the_worker_thread(monkeypatch):
    """Oracle: the NumPy core. Inside tf.function the kernels run on TF's inter-op threads;
    large calls go to one dedicated thread (forced here for small ones): same values, and a
    core error raised there (shapes only known at run time) reaches the caller."""
    from deformops_tf import ops

    monkeypatch.setattr(ops, "_HANDOVER_ELEMENTS", 0)
    rng = np.random.default_rng(8)
    x, offset, filters, bias, mask = _conv_data(rng, 2, 4, 6, 6, 5, (3, 3), (1, 1), (1, 1),
                                                (1, 1), 2, 2, True, True)

    @tf.function
    def f(*t):
        return _conv_grads_tf(lambda a, b, c, d, e: dtf.deform_conv2d(a, b, c, d, padding=1,
                                                                      mask=e), t)

    out, grads = f(*map(_t, (x, offset, filters, bias, mask)))
    ref = dops.deform_conv2d(x, offset, filters.transpose(3, 2, 0, 1), bias, padding=1, mask=mask,
                             layout="NHWC")
    np.testing.assert_array_equal(out.numpy(), ref)
    assert len(grads) == 5

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, None), tf.float64)] * 2)
    def g(a, b):
        return dtf.deform_sample(a, b)

    with pytest.raises(tf.errors.InvalidArgumentError, match="offset"):
        g(tf.constant(x), tf.constant(offset[:, :3, :, :8]))


@pytest.mark.parametrize("op", ["deform_conv2d", "deform_sample", "sample"])
def test_graph_nodes_run_plain_python_not_autograph(monkeypatch, op):
    """Inside tf.function (autograph on, as in Keras' train step) the graph nodes' bodies run
    the ops' own Python code: no frame of an AutoGraph-converted function is on the stack when
    a node calls the core (converted closures pay AutoGraph's dispatch at every step)."""
    import sys

    from deformops_tf import ops

    stacks = []

    def spy(fn, *args, _real=ops._core, **kwargs):
        frame, files = sys._getframe(1), []
        while frame is not None:
            files.append(frame.f_code.co_filename)
            frame = frame.f_back
        stacks.append(files)
        return _real(fn, *args, **kwargs)

    monkeypatch.setattr(ops, "_core", spy)
    rng = np.random.default_rng(3)
    x, offset, filters, bias, mask = _conv_data(rng, 1, 2, 2, 5, 4, (3, 3), (1, 1), (1, 1),
                                                (1, 1), 1, 1, True, True)
    coords = rng.uniform(-1, 5, (1, 5, 4, 2))
    call = {"deform_conv2d": lambda a: dtf.deform_conv2d(a, offset, filters, bias, padding=1,
                                                         mask=mask),
            "deform_sample": lambda a: dtf.deform_sample(a, _frac_offsets(rng, (1, 5, 4, 2))),
            "sample": lambda a: dtf.sample(a, coords)}[op]

    @tf.function(autograph=True)
    def f(a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            out = call(a)
        return tape.gradient(out, a)

    stacks.clear()
    f(tf.constant(x))
    assert len(stacks) == 2  # the forward node and the backward node
    converted = [p for files in stacks for p in files if "__autograph_generated" in p]
    assert not converted, converted


# ------------------------------------------------------------------------------------------------
# only the gradients the caller needs


def _spy_needs(monkeypatch):
    """Record the ``needs_input_grad`` of every backward call of the core (the adapter looks the
    functions up on ``deformops`` when it runs them)."""
    calls = []
    for name in ("deform_conv2d_backward", "deform_sample_backward", "sample_backward"):
        def spy(*args, needs_input_grad, _real=getattr(dops, name), **kwargs):
            calls.append(tuple(needs_input_grad))
            return _real(*args, needs_input_grad=needs_input_grad, **kwargs)

        monkeypatch.setattr(dops, name, spy)
    return calls


def _conv_case(seed):
    rng = np.random.default_rng(seed)
    x, offset, filters, bias, mask = _conv_data(rng, 2, 4, 6, 6, 5, (3, 3), (1, 1), (1, 1),
                                                (1, 1), 2, 2, True, True)
    grad_out = rng.standard_normal((2, 6, 5, 6))
    g = dops.deform_conv2d_backward(grad_out, x, offset, filters.transpose(3, 2, 0, 1),
                                    padding=1, mask=mask, layout="NHWC")
    ref = {"x": g.grad_input, "offset": g.grad_offset, "bias": g.grad_bias, "mask": g.grad_mask,
           "filters": g.grad_weight.transpose(2, 3, 1, 0)}
    return (x, offset, filters, bias, mask), grad_out, ref


NAMES = ("x", "offset", "filters", "bias", "mask")


@pytest.fixture(params=[False, True], ids=["numpy_function nodes", "py_function nodes"])
def node_kind(request, monkeypatch):
    """Graph nodes as on a machine without a GPU (tf.numpy_function) and with one
    (tf.py_function, forced here on the CPU): the gradient plumbing must hold for both. (Eager
    calls make no nodes; there both kinds must simply agree.)"""
    from deformops_tf import ops

    monkeypatch.setattr(ops, "_gpu_visible", lambda: request.param)
    return request.param


@pytest.mark.parametrize("how", ["eager tape", "tape in tf.function", "tape outside tf.function",
                                 "tf.gradients", "persistent tape"])
@pytest.mark.parametrize("wanted", [("filters", "bias"), ("x", "mask"), NAMES])
def test_deform_conv2d_computes_the_gradients_asked_for(monkeypatch, node_kind, how, wanted):
    """Oracle: the NumPy core's backward with all five gradients. A tape asks deformops for the
    gradients of the inputs it differentiates (x, a model's input in model.fit, is often not
    among them); differentiation without a tape (tf.gradients, a tape outside tf.function)
    asks for all. Either way the gradients returned are exactly the core's."""
    arrays, grad_out, ref = _conv_case(9)
    calls = _spy_needs(monkeypatch)
    go = tf.constant(grad_out)

    def op(x, offset, filters, bias, mask):
        return dtf.deform_conv2d(x, offset, filters, bias, padding=1, mask=mask)

    def taped(*t):
        with tf.GradientTape(persistent=how == "persistent tape") as tape:
            tape.watch([t[NAMES.index(n)] for n in wanted])
            out = op(*t)
        if how == "persistent tape":  # a first call for other inputs, then the ones wanted
            tape.gradient(out, t[2], output_gradients=go)
        return tape.gradient(out, [t[NAMES.index(n)] for n in wanted], output_gradients=go)

    tensors = [tf.constant(a) for a in arrays]
    if how in ("eager tape", "persistent tape"):
        grads = taped(*tensors)
    elif how == "tape in tf.function":
        grads = tf.function(taped)(*tensors)
    elif how == "tape outside tf.function":
        with tf.GradientTape() as tape:
            tape.watch([tensors[NAMES.index(n)] for n in wanted])
            out = tf.function(op)(*tensors)
        grads = tape.gradient(out, [tensors[NAMES.index(n)] for n in wanted],
                              output_gradients=go)
    else:
        @tf.function
        def symbolic(*t):
            return tf.gradients(op(*t), [t[NAMES.index(n)] for n in wanted], grad_ys=go)

        grads = symbolic(*tensors)
    for n, g in zip(wanted, grads):
        np.testing.assert_allclose(g.numpy(), ref[n], rtol=1e-12, atol=1e-12, err_msg=n)
    if how in ("tape outside tf.function", "tf.gradients"):
        assert calls == [(True,) * 5]
    else:
        asked = tuple(n in wanted for n in ("x", "offset", "filters", "mask", "bias"))
        assert calls[-1] == asked


@pytest.mark.parametrize("op", ["sample", "deform_sample"])
@pytest.mark.parametrize("graph", [False, True])
def test_sampling_ops_skip_the_input_gradient_nobody_asks_for(monkeypatch, node_kind, op, graph):
    """Oracle: the NumPy core. The coordinates' gradient alone (x not watched: the layer's
    input in a model's first layer) skips the input gradient and equals the core's."""
    rng = np.random.default_rng(10)
    x = rng.random((2, 5, 6, 4))
    coords = rng.uniform(-1, 6, (2, 5, 6, 4))
    grad_out = rng.standard_normal((2, 5, 6, 4))
    fn = getattr(dtf, op)
    ref = getattr(dops, f"{op}_backward")(grad_out, x, coords, mode="nearest", layout="NHWC")
    calls = _spy_needs(monkeypatch)

    def taped(x, c):
        with tf.GradientTape() as tape:
            tape.watch(c)
            out = fn(x, c, mode="nearest")
        return tape.gradient(out, c, output_gradients=tf.constant(grad_out))

    got = (tf.function(taped) if graph else taped)(tf.constant(x), tf.constant(coords))
    np.testing.assert_array_equal(got.numpy(), ref[1])
    assert calls == [(False, True)]


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("how", ["second order", "forward mode", "tf.gradients twice"])
def test_derivatives_of_gradients_raise(node_kind, graph, how):
    """The kernels have first derivatives only: differentiating a gradient again (or forward
    mode, which TF derives from the gradient) raises instead of treating it as a constant;
    a first-order gradient taken inside a persistent tape's context still works."""
    rng = np.random.default_rng(11)
    x, c = tf.constant(rng.random((1, 5, 6, 2))), tf.constant(rng.uniform(-1, 1, (1, 5, 6, 2)))

    def second_order():
        with tf.GradientTape() as outer:
            outer.watch(c)
            with tf.GradientTape() as inner:
                inner.watch(c)
                y = tf.reduce_sum(dtf.deform_sample(x, c) ** 2)
            g = inner.gradient(y, c)
        return outer.gradient(g, c)

    def forward_mode():
        with tf.autodiff.ForwardAccumulator(c, tf.ones_like(c)) as acc:
            y = dtf.deform_sample(x, c)
        return acc.jvp(y)

    def gradients_twice():  # no tape: the graph nodes' gradient overrides
        (g,) = tf.gradients(tf.reduce_sum(dtf.deform_sample(x, c) ** 2), c)
        return tf.gradients(tf.reduce_sum(g), c)

    if how == "tf.gradients twice" and not graph:
        return  # tf.gradients works in graphs only
    fn = {"second order": second_order, "forward mode": forward_mode,
          "tf.gradients twice": gradients_twice}[how]
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        (tf.function(fn) if graph else fn)()

    def first_order_in_context():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(c)
            y = tf.reduce_sum(dtf.deform_sample(x, c) ** 2)
            g = tape.gradient(y, c)
        return g

    ref = dops.deform_sample_backward(2 * dops.deform_sample(x.numpy(), c.numpy(), layout="NHWC"),
                                      x.numpy(), c.numpy(), layout="NHWC")[1]
    np.testing.assert_allclose((tf.function(first_order_in_context) if graph
                                else first_order_in_context)().numpy(), ref, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# the graph nodes: tf.numpy_function on the CPU, tf.py_function where a GPU is visible


@pytest.mark.parametrize("gpu_visible", [False, True])
def test_graph_nodes_and_their_values(monkeypatch, gpu_visible):
    """Oracle: the NumPy core. Without a GPU the kernels run in tf.numpy_function nodes (PyFunc);
    with one, in tf.py_function nodes (EagerPyFunc), so that GPU tensors reach CuPy. The latter
    path is forced here on the CPU, where it must give the same values."""
    from deformops_tf import ops

    monkeypatch.setattr(ops, "_gpu_visible", lambda: gpu_visible)
    rng = np.random.default_rng(9)
    x, offset, filters, bias, mask = _conv_data(rng, 2, 4, 6, 6, 5, (3, 3), (1, 1), (1, 1),
                                                (1, 1), 2, 2, True, True)
    tensors = list(map(_t, (x, offset, filters, bias, mask)))

    @tf.function
    def f(*t):
        return _conv_grads_tf(lambda a, b, c, d, e: dtf.deform_conv2d(a, b, c, d, padding=1,
                                                                      mask=e), t)

    graph = f.get_concrete_function(*tensors).graph
    types = {op.type for op in graph.get_operations()}
    want, other = ("EagerPyFunc", "PyFunc") if gpu_visible else ("PyFunc", "EagerPyFunc")
    assert want in types and other not in types
    out, grads = f(*tensors)
    weight = filters.transpose(3, 2, 0, 1)
    kw = dict(padding=1, mask=mask, layout="NHWC")
    ref = dops.deform_conv2d(x, offset, weight, bias, **kw)
    np.testing.assert_array_equal(out.numpy(), ref)
    g = dops.deform_conv2d_backward(-ref * np.sin(ref) + np.cos(ref), x, offset, weight,
                                    needs_input_grad=(True,) * 5, **kw)
    want = [g.grad_input, g.grad_offset, g.grad_weight.transpose(2, 3, 1, 0), g.grad_bias,
            g.grad_mask]
    for got, exp in zip(grads, want):
        np.testing.assert_allclose(got.numpy(), exp, rtol=0, atol=1e-12 * (1 + np.abs(exp).max()))


def test_op_determinism_asks_for_deterministic_cuda_gradients(monkeypatch):
    """``tf.config.experimental.enable_op_determinism()`` switches the CUDA backend to ordered
    input gradients, as ``torch.use_deterministic_algorithms(True)`` does; disabling it switches
    back [oracle: the backend's own switch, which the CUDA tests check]."""
    from deformops.backends import cuda as dcuda
    from tensorflow.python.framework import config

    monkeypatch.delenv("DEFORMOPS_DETERMINISTIC", raising=False)
    previous = dcuda.set_deterministic(None)
    try:
        assert not config.is_op_determinism_enabled() and not dcuda.is_deterministic()
        tf.config.experimental.enable_op_determinism()
        try:
            assert dcuda.is_deterministic()
        finally:
            config.disable_op_determinism()
        assert not dcuda.is_deterministic()
    finally:
        dcuda.set_deterministic(previous)


def test_a_forked_child_gets_a_free_lock_and_no_worker():
    """The fork hook gives a child a lock no thread holds and no worker thread: a TF thread of
    the parent may hold the lock at the fork (inside a kernel call), and would never release it
    in the child, whose first call then waited forever [oracle: the lock's state]."""
    import threading

    from deformops_tf import ops

    held, release = threading.Event(), threading.Event()

    def in_a_call():
        with ops._LOCK:
            held.set()
            release.wait()

    t = threading.Thread(target=in_a_call)
    t.start()
    held.wait()
    saved = ops._LOCK, list(ops._WORKER)
    try:
        ops._reset_worker()  # what os.register_at_fork runs in the child
        assert ops._LOCK.acquire(timeout=5)
        ops._LOCK.release()
        assert not ops._WORKER
    finally:
        release.set()
        t.join()
        ops._LOCK, ops._WORKER[:] = saved[0], saved[1]
