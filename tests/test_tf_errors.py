"""deformops_tf: user errors (DESIGN §5) and buffers TensorFlow must never see misaligned.

Oracles: DESIGN §5 (a ValueError for shapes and values, a TypeError for dtypes and types, the
message naming the argument); for alignment, the return code of a subprocess that feeds the ops
and the NumPy → TF conversion misaligned and strided arrays and runs TF kernels on the results
(TensorFlow aborts the process with ``Check failed: IsAligned()`` if it ever reads a misaligned
buffer), plus the values those kernels compute.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import deformops_tf as dtf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

f32 = np.float32
X = np.zeros((1, 5, 6, 4), f32)
OFF = np.zeros((1, 5, 6, 18), f32)  # 3x3, padding 1, G = 1
FIL = np.zeros((3, 3, 4, 2), f32)
MSK = np.zeros((1, 5, 6, 9), f32)


def conv(**kw):
    args = dict(x=X, offset=OFF, filters=FIL, bias=None, padding=1, mask=None)
    args.update(kw)
    return dtf.deform_conv2d(args.pop("x"), args.pop("offset"), args.pop("filters"),
                             args.pop("bias"), **args)


CASES = [
    # (call, exception, words the message must contain)
    (lambda: conv(x=X.astype(np.int32)), TypeError, ["x", "int32"]),
    (lambda: conv(offset=OFF.astype(np.float64)), TypeError, ["offset", "float64"]),
    (lambda: conv(x="image"), TypeError, ["x"]),
    (lambda: conv(x=X[0]), ValueError, ["x", "4-D"]),
    (lambda: conv(filters=np.zeros((3, 3, 3, 2), f32)), ValueError, ["filters"]),
    (lambda: conv(filters=np.zeros((3, 3, 2, 3), f32)), ValueError, ["groups"]),
    (lambda: conv(offset=np.zeros((1, 5, 6, 17), f32)), ValueError, ["offset", "2*G*K"]),
    (lambda: conv(offset=np.zeros((1, 4, 6, 18), f32)), ValueError, ["offset", "spatial"]),
    (lambda: conv(offset=np.zeros((2, 5, 6, 18), f32)), ValueError, ["offset", "batch"]),
    (lambda: conv(mask=np.zeros((1, 5, 6, 8), f32)), ValueError, ["mask"]),
    (lambda: conv(bias=np.zeros(3, f32)), ValueError, ["bias"]),
    (lambda: conv(strides=0), ValueError, ["strides"]),
    (lambda: conv(strides="2"), TypeError, ["strides"]),
    (lambda: conv(strides=(1, 1.0)), TypeError, ["strides"]),
    (lambda: conv(strides=True), TypeError, ["strides"]),
    (lambda: conv(padding=(1, False)), TypeError, ["padding"]),
    (lambda: conv(dilations=(1, 1, 1)), ValueError, ["dilations"]),
    (lambda: conv(padding=-1), ValueError, ["padding"]),
    (lambda: conv(padding=0, dilations=4, offset=np.zeros((1, 1, 1, 18), f32)), ValueError,
     ["larger"]),
    (lambda: conv(data_format="NWHC"), ValueError, ["data_format"]),
    (lambda: dtf.deform_sample(X, OFF[..., :2], mode="bogus"), ValueError, ["mode"]),
    (lambda: dtf.deform_sample(X, OFF[..., :2], order=1.5), TypeError, ["order"]),
    (lambda: dtf.deform_sample(X, OFF[..., :2], order=7), ValueError, ["order"]),
    (lambda: dtf.deform_sample(X, OFF[..., :2], cval="zero"), TypeError, ["cval"]),
    (lambda: dtf.deform_sample(X, OFF[:, :4, :, :2]), ValueError, ["offset", "spatial"]),
    (lambda: dtf.deform_sample(X, OFF[..., :3]), ValueError, ["offset", "2G"]),
    (lambda: dtf.deform_sample(X, OFF[..., :6]), ValueError, ["offset groups"]),
    (lambda: dtf.sample(X, OFF[..., :2].astype(np.float64)), TypeError, ["coords"]),
    (lambda: dtf.sample(X, OFF[0, ..., :2]), ValueError, ["coords", "4-D"]),
]


@pytest.mark.parametrize("k", range(len(CASES)))
def test_errors_name_the_argument(k):
    call, exc, words = CASES[k]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, msg


def test_errors_are_raised_when_a_tf_function_is_traced():
    @tf.function(input_signature=[tf.TensorSpec((None, 5, 6, 4), tf.float32),
                                  tf.TensorSpec((None, 5, 6, 16), tf.float32)])
    def f(x, off):
        return dtf.deform_conv2d(x, off, FIL, padding=1)

    with pytest.raises(ValueError, match="offset"):
        f.get_concrete_function()


def test_errors_of_shapes_unknown_when_traced_name_the_ops_arguments():
    """Shapes only known when the graph runs: the error (TF wraps it) names this op's
    arguments, as at trace time (filters, not the core's weight)."""
    @tf.function(input_signature=[tf.TensorSpec((None, None, None, None), tf.float32)] * 3)
    def f(x, off, fil):
        return dtf.deform_conv2d(x, off, fil, padding=1)

    x = tf.zeros((2, 5, 6, 6))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"x has 6 channels, not a multiple of filters.shape\[2\] = 4"):
        f(x, tf.zeros((2, 5, 6, 18)), tf.zeros((3, 3, 4, 2)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"offset must have the output's spatial size \(Ho, Wo\)"):
        f(x, tf.zeros((2, 4, 6, 18)), tf.zeros((3, 3, 3, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, None), tf.float32)] * 3)
    def grads(x, off, fil):
        with tf.GradientTape() as tape:
            tape.watch(fil)
            y = dtf.deform_conv2d(x, off, fil, padding=1)
        return tape.gradient(y, fil)

    assert grads(x, tf.zeros((2, 5, 6, 18)), tf.zeros((3, 3, 3, 2))).shape == (3, 3, 3, 2)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)] * 3)  # unknown ranks
    def g(x, off, fil):
        return dtf.deform_conv2d(x, off, fil, padding=1)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"filters must be 4-D \[kh, kw, Cin/groups, Cout\]"):
        g(x, tf.zeros((2, 5, 6, 18)), tf.zeros((3, 3, 6)))


def test_zero_input_channels_are_a_value_error():
    """Cin = 0 makes groups 0: a ValueError naming the numbers (it was a ZeroDivisionError in
    the op's own check), eagerly and in a graph node with shapes unknown when traced."""
    args = (tf.zeros((2, 5, 6, 0)), tf.zeros((2, 5, 6, 18)), tf.zeros((3, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"not divisible by groups = 0"):
        dtf.deform_conv2d(*args, padding=1)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, None), tf.float32)] * 3)
    def f(x, off, fil):
        return dtf.deform_conv2d(x, off, fil, padding=1)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not divisible by groups = 0"):
        f(*args)


def test_missing_tensors_and_empty_filters_known_in_part():
    """A required tensor given as None is a TypeError naming it (it was an AttributeError);
    filters with a zero size known while tracing, other sizes not, a ValueError (it was a
    ZeroDivisionError in the shape checks)."""
    fil = np.zeros((3, 3, 4, 2), f32)
    for name, call in (("x", lambda: dtf.deform_conv2d(None, OFF, fil, padding=1)),
                       ("offset", lambda: dtf.deform_conv2d(X, None, fil, padding=1)),
                       ("filters", lambda: dtf.deform_conv2d(X, OFF, None, padding=1)),
                       ("x", lambda: dtf.sample(None, OFF[..., :2])),
                       ("coords", lambda: dtf.sample(X, None)),
                       ("offset", lambda: dtf.deform_sample(X, None))):
        with pytest.raises(TypeError, match=f"{name} must be a tensor or array, got None"):
            call()
    for spec in ((None, 3, 0, 2), (0, 3, None, 2), (3, None, 0, None)):
        f = tf.function(lambda x, o, w: dtf.deform_conv2d(x, o, w), input_signature=[
            tf.TensorSpec((None, 6, 6, 4)), tf.TensorSpec((None, 4, 4, 18)), tf.TensorSpec(spec)])
        with pytest.raises(ValueError, match=r"filters must have non-empty \[kh, kw, Cin/groups\]"):
            f.get_concrete_function()


def test_saved_model_export_is_a_clear_error(tmp_path):
    """tf.saved_model.save and Keras' model.export, of a function traced before or while
    saving: a ValueError saying why and what to save instead (TF's own error pointed at its
    gradient options, and a model saved without gradients failed in any other process)."""
    import keras

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 2))] * 2)
        def f(self, x, offset):
            return dtf.deform_sample(x, offset)

    module = Module()
    module.f(tf.zeros((1, 6, 6, 2)), tf.zeros((1, 6, 6, 2)))
    for options in (None, tf.saved_model.SaveOptions(experimental_custom_gradients=False)):
        with pytest.raises(ValueError, match=r"cannot be saved in a SavedModel.*\.keras"):
            tf.saved_model.save(module, str(tmp_path / "module"), options=options)
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, dtf.DeformConv2D(4, 3)(inp))
    with pytest.raises(ValueError, match=r"cannot be saved in a SavedModel"):
        model.export(str(tmp_path / "model"), verbose=False)


def test_order_above_one_is_not_implemented():
    with pytest.raises(NotImplementedError, match="order"):
        dtf.sample(X, OFF[..., :2], order=3)


def test_layer_arguments_are_checked():
    import keras

    with pytest.raises(ValueError, match="filters"):
        dtf.ConvOffset2D(5)(keras.Input((6, 7, 3)))
    with pytest.raises(ValueError, match="mode"):
        dtf.ConvOffset2D(mode="clamp")
    with pytest.raises(ValueError, match="padding"):
        dtf.DeformConv2D(4, 3, padding="full")
    with pytest.raises(ValueError, match="groups"):
        dtf.DeformConv2D(4, 3, groups=3)
    with pytest.raises(ValueError, match="offset_groups"):
        dtf.DeformConv2D(4, 3, offset_groups=2)(keras.Input((6, 7, 3)))
    with pytest.raises(ValueError, match="dilation_rate"):
        dtf.DeformConv2D(4, 3, strides=2, dilation_rate=2)
    with pytest.raises(ValueError, match="mask_scale"):
        dtf.DeformConv2D(4, 3, mask_scale=0)
    with pytest.raises(ValueError, match="mask_scale"):
        dtf.DeformConv2D(4, 3, mask_scale=float("inf"))
    with pytest.raises(TypeError, match="mask_scale"):
        dtf.DeformConv2D(4, 3, mask_scale=True)
    assert dtf.DeformConv2D(4, 3, mask_scale=np.float32(2)).mask_scale == 2.0
    # never truncated or parsed: a float, string or bool size is a TypeError, as in the ops
    for bad in ((2.7, 3), "33", (True, 3), 3.0):
        with pytest.raises(TypeError, match="kernel_size"):
            dtf.DeformConv2D(4, bad)
    with pytest.raises(TypeError, match="strides"):
        dtf.DeformConv2D(4, 3, strides=(1.9, 1))
    assert dtf.DeformConv2D(4, [3, np.int64(1)]).kernel_size == (3, 1)
    assert dtf.DeformConv2D(4, np.array([3, 1])).kernel_size == (3, 1)
    assert dtf.ConvOffset2D(init_normal_stddev=np.array(0.02)).init_normal_stddev == 0.02
    with pytest.raises(TypeError, match="init_normal_stddev"):
        dtf.ConvOffset2D(init_normal_stddev="a")
    with pytest.raises(ValueError, match="init_normal_stddev"):
        dtf.ConvOffset2D(init_normal_stddev=-1)
    # counts: NumPy integers taken (as Keras' Conv2D does), floats and bools a TypeError
    layer = dtf.DeformConv2D(np.int64(4), 3, groups=np.int32(2), offset_groups=np.int64(2))
    assert (layer.filters, layer.groups, layer.offset_groups) == (4, 2, 2)
    assert type(layer.get_config()["filters"]) is int
    assert dtf.ConvOffset2D(np.int64(3)).filters == 3
    for name in ("filters", "groups", "offset_groups"):
        for bad in (4.0, True, "4"):
            with pytest.raises(TypeError, match=name):
                dtf.DeformConv2D(**{"filters": 4, "kernel_size": 3, name: bad})
        with pytest.raises(ValueError, match=name):
            dtf.DeformConv2D(**{"filters": 4, "kernel_size": 3, name: 0})
    with pytest.raises(TypeError, match="filters"):
        dtf.ConvOffset2D(3.0)
    # no input channels: a ValueError when built, not TF's error from the predictor's conv
    for make in (lambda: dtf.DeformConv2D(3, 3), dtf.ConvOffset2D):
        with pytest.raises(ValueError, match="at least one input channel"):
            make()(np.zeros((2, 6, 6, 0), np.float32))


@pytest.mark.parametrize("order", [1.0, True])
def test_sampling_options_are_checked_whatever_was_checked_before(order):
    """The options are checked once per distinct value: 1, 1.0 and True compare and hash
    equal, and a check of order=1 let a later order=1.0 or True through."""
    dtf.ConvOffset2D(order=1)
    dtf.sample(X, OFF[..., :2], order=1)
    with pytest.raises(TypeError, match="order"):
        dtf.ConvOffset2D(order=order)
    with pytest.raises(TypeError, match="order"):
        dtf.sample(X, OFF[..., :2], order=order)


RISKY = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    import deformops as dops, deformops_tf as dtf
    from deformops_tf import _convert

    def misaligned(shape, dtype, shift):
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        buf = np.empty(n + 128, np.uint8)
        start = (-buf.ctypes.data) % 64 + shift
        a = buf[start:start + n].view(dtype).reshape(shape)
        assert a.ctypes.data % 64 == shift
        a[...] = np.random.default_rng(shift).random(shape)
        return a

    checked = 0
    for dtype, shifts in (("float32", (4, 16, 32, 60)), ("float64", (8, 16, 24, 56))):
        for shift in shifts:
            a = misaligned((6, 10, 7, 3), dtype, shift)
            for view in (a, a[:, ::2], a.transpose(0, 3, 1, 2), a[..., 1:], a[::-1], a.T):
                t = _convert.to_tf(view)
                assert np.from_dlpack(t).ctypes.data % 64 == 0
                # TF kernels that read the whole buffer (reduce, matmul, conv)
                np.testing.assert_allclose(float(tf.reduce_sum(t)), view.sum(), rtol=1e-5)
                m = tf.reshape(t, (-1, view.shape[-1]))
                np.testing.assert_allclose(tf.matmul(m, m, transpose_a=True).numpy(),
                                           view.reshape(-1, view.shape[-1]).T @
                                           view.reshape(-1, view.shape[-1]), rtol=1e-5)
                checked += 1
            # the ops on misaligned inputs (and the core's own, mostly misaligned, outputs)
            x = misaligned((2, 5, 7, 4), dtype, shift)
            off = misaligned((2, 5, 7, 8), dtype, shift) * 4 - 2
            xt, ot = tf.constant(x), tf.constant(off)
            with tf.GradientTape() as tape:
                tape.watch([xt, ot])
                y = dtf.deform_sample(xt, ot, mode="reflect")
                z = dtf.deform_conv2d(y, tf.concat([ot] * 9, -1)[..., :18 * 2], tf.ones(
                    (3, 3, 2, 6), dtype), padding=1)
                s = tf.reduce_sum(tf.nn.conv2d(z, tf.ones((3, 3, 6, 2), dtype), 1, "SAME"))
            gx, go = tape.gradient(s, [xt, ot])
            assert np.isfinite(float(s)) and np.isfinite(gx.numpy()).all()
            assert float(tf.reduce_sum(gx * gx)) > 0 and float(tf.reduce_sum(go * go)) > 0
            ref = dops.deform_sample(x, off, mode="reflect", layout="NHWC")
            np.testing.assert_array_equal(y.numpy(), ref)
    # odd sizes and empty arrays
    for shape in ((1,), (3, 1, 1, 5), (0, 4, 4, 2), (1, 1, 1, 1)):
        t = _convert.to_tf(misaligned(shape, "float32", 4) if np.prod(shape) else
                           np.zeros(shape, np.float32))
        float(tf.reduce_sum(t))
    print("OK", checked)
    """
)


def test_misaligned_buffers_never_crash_the_process():
    """The risky case runs in a subprocess: an abort there would kill pytest itself."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "adapters")
               + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", RISKY], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"return code {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "OK 48" in r.stdout


NON_NUMERIC = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    import deformops as dops
    for bad in (tf.constant(["a", "b"]), tf.constant([[b"x"]])):
        try:
            dops.sample(bad, np.zeros((1, 2, 1, 1)))
        except TypeError as e:
            assert "x must be a numeric array" in str(e), e
        else:
            raise AssertionError("no TypeError")
    print("OK")
    """
)


def test_non_numeric_tensors_are_refused_before_dlpack():
    """TensorFlow aborts the whole process when a string tensor is exported through DLPack:
    the core refuses such tensors first, with a TypeError naming the argument (in a
    subprocess: an abort would kill pytest)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "adapters")
               + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", NON_NUMERIC], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"return code {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "OK" in r.stdout
