"""deformops_tf Keras 3 layers: ConvOffset2D and DeformConv2D.

Oracles, per test:
- ``keras.layers.Conv2D`` with the same kernel: a DeformConv2D at initialisation (zero offsets;
  mask 1 with ``mask_scale=2``) must equal it, for 'valid' and 'same' padding, strides,
  dilation and even kernels (TF's asymmetric 'same' padding);
- ``deformops.deform_sample`` called per channel: ConvOffset2D's clean per-channel split;
- training: the loss of ``model.fit`` decreases and the offset predictors learn;
- serialization: a ``.keras`` save/load round trip gives the same config, weights and outputs.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import deformops as dops  # noqa: E402
import deformops_tf as dtf  # noqa: E402

# Keras' own data adapter (model.fit on NumPy data) trips NumPy 2's __array__(copy=) warning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _x(shape, seed=0, dtype="float64"):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding="same", strides=2),
    dict(kernel_size=(2, 4), padding="same"),
    dict(kernel_size=(4, 3), padding="same", strides=(2, 3)),
    dict(kernel_size=3, padding="same", dilation_rate=(2, 1)),
])
@pytest.mark.parametrize("use_mask", [False, True])
def test_deform_conv2d_starts_as_conv2d(kw, use_mask):
    x = _x((2, 9, 8, 4))
    layer = dtf.DeformConv2D(5, use_mask=use_mask, mask_scale=2.0, bias_initializer="random_normal",
                             dtype="float64", **kw)
    conv = keras.layers.Conv2D(5, dtype="float64", **kw)
    out = layer(x)
    conv.build(x.shape)
    conv.set_weights([layer.kernel.numpy(), layer.bias.numpy()])
    ref = conv(x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=0, atol=1e-12)


def test_deform_conv2d_mask_scale_one_is_half_conv_at_init_and_channels_first():
    x = _x((2, 7, 6, 4))
    layer = dtf.DeformConv2D(3, 3, padding="same", use_mask=True, use_bias=False, dtype="float64")
    out = layer(x)
    first = dtf.DeformConv2D(3, 3, padding="same", use_mask=True, use_bias=False, dtype="float64",
                             data_format="channels_first")
    first.build((None, 4, 7, 6))
    first.set_weights(layer.get_weights())
    np.testing.assert_allclose(first(x.transpose(0, 3, 1, 2)).numpy().transpose(0, 2, 3, 1),
                               out.numpy(), rtol=0, atol=1e-13)
    conv = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, dtype="float64")
    conv.build(x.shape)
    conv.set_weights([layer.kernel.numpy()])
    np.testing.assert_allclose(out.numpy(), 0.5 * conv(x).numpy(), rtol=0, atol=1e-12)


def test_deform_conv2d_with_offsets_matches_core_and_dynamic_sizes():
    """Non-zero predictor weights, groups and offset groups: the layer equals the core op on the
    offsets its predictor computes; an Input of unknown spatial size gives the same values."""
    x = _x((2, 9, 7, 6), seed=1)
    kw = dict(filters=4, kernel_size=3, strides=2, padding="same", groups=2, offset_groups=3,
              use_mask=True, dtype="float64")
    layer = dtf.DeformConv2D(**kw)
    layer.build(x.shape)
    rng = np.random.default_rng(2)
    layer.offset_kernel.assign(rng.standard_normal(layer.offset_kernel.shape) * 0.3)
    layer.offset_bias.assign(rng.standard_normal(layer.offset_bias.shape) * 0.3)
    out = layer(x).numpy()
    pred = tf.nn.bias_add(tf.nn.conv2d(x, layer.offset_kernel, 2, "SAME"), layer.offset_bias)
    pred = pred.numpy()
    off, mask = pred[..., :54], 1 / (1 + np.exp(-pred[..., 54:]))
    # TF 'same' for 9 rows, k 3, s 2: total padding 2 -> (1, 1); 7 columns: 2 -> (1, 1)
    ref = dops.deform_conv2d(x, off, layer.kernel.numpy().transpose(3, 2, 0, 1),
                             layer.bias.numpy(), stride=2, padding=1, mask=mask, layout="NHWC")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)

    inp = keras.Input((None, None, 6), dtype="float64")
    model = keras.Model(inp, layer(inp))
    assert model.output_shape == (None, None, None, 4)
    np.testing.assert_allclose(model(x).numpy(), ref, rtol=0, atol=1e-12)
    x2 = _x((1, 10, 8, 6), seed=3)  # even sizes: 'same' pads (0, 1) -> an explicit extra row
    np.testing.assert_allclose(model(x2).numpy(), layer(x2).numpy(), rtol=0, atol=1e-12)


def test_conv_offset2d_is_a_clean_per_channel_split():
    """Channel c is deform_sample'd with offset channels (2c, 2c+1), mode 'nearest'."""
    x = _x((2, 6, 9, 3), seed=4)  # non-square
    layer = dtf.ConvOffset2D(3, init_normal_stddev=0.5, dtype="float64")
    out = layer(x).numpy()
    assert out.shape == x.shape
    off = tf.nn.conv2d(x, layer.kernel, 1, "SAME").numpy()
    for c in range(3):
        ref = dops.deform_sample(x[..., c:c + 1], off[..., 2 * c:2 * c + 2], mode="nearest",
                                 layout="NHWC")
        np.testing.assert_allclose(out[..., c:c + 1], ref, rtol=0, atol=1e-13)
    # zero initialisation: the identity
    ident = dtf.ConvOffset2D(init_normal_stddev=0, dtype="float64")
    np.testing.assert_array_equal(ident(x).numpy(), x)
    # another mode, channels_first
    cf = dtf.ConvOffset2D(mode="reflect", data_format="channels_first", dtype="float64")
    cf.build((None, 3, 6, 9))
    cf.set_weights(layer.get_weights())
    cl = dtf.ConvOffset2D(mode="reflect", dtype="float64")
    cl.build(x.shape)
    cl.set_weights(layer.get_weights())
    np.testing.assert_allclose(cf(x.transpose(0, 3, 1, 2)).numpy().transpose(0, 2, 3, 1),
                               cl(x).numpy(), rtol=0, atol=1e-13)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 10, 3))
    h = dtf.ConvOffset2D(3, name="offsets")(inp)
    h = dtf.DeformConv2D(8, 3, padding="same", use_mask=True, activation="relu", name="dcn2")(h)
    h = dtf.DeformConv2D(8, 3, strides=2, name="dcn1", kernel_regularizer="l2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


def test_model_fit_trains_and_the_offsets_learn(monkeypatch):
    """The loss decreases and every offset predictor moves. The first layer skips the gradient
    of the model's input (no one asks for it); the later layers compute their input's."""
    calls = set()
    for fn in ("deform_sample_backward", "deform_conv2d_backward"):
        def spy(*args, needs_input_grad, _fn=fn, _real=getattr(dops, fn), **kwargs):
            calls.add((_fn, tuple(needs_input_grad)))
            return _real(*args, needs_input_grad=needs_input_grad, **kwargs)

        monkeypatch.setattr(dops, fn, spy)
    model = _model()
    rng = np.random.default_rng(5)
    X = rng.random((32, 12, 10, 3)).astype("float32")
    Y = np.stack([X[:, :6].mean((1, 2, 3)), X[:, :, :5].std((1, 2, 3))], -1) * 4
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = {lay.name: [w.numpy().copy() for w in lay.weights] for lay in model.layers}
    hist = model.fit(X, Y, epochs=6, batch_size=8, verbose=0).history["loss"]
    assert hist[-1] < 0.7 * hist[0], hist
    for name, idx in (("offsets", 0), ("dcn2", 2), ("dcn1", 2)):  # the offset kernels moved
        w = model.get_layer(name).weights[idx].numpy()
        assert np.abs(w - before[name][idx]).max() > 1e-4, name
    assert calls == {("deform_sample_backward", (False, True)),
                     ("deform_conv2d_backward", (True, True, True, True, True)),  # dcn2, mask
                     ("deform_conv2d_backward", (True, True, True, False, True))}  # dcn1


def test_keras_save_load_round_trip(tmp_path):
    model = _model(seed=1)
    model.get_layer("dcn2").offset_kernel.assign(
        np.random.default_rng(6).standard_normal(model.get_layer("dcn2").offset_kernel.shape)
        .astype("float32") * 0.1)
    X = np.random.default_rng(7).random((4, 12, 10, 3)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in ("offsets", "dcn2", "dcn1"):
        a, b = model.get_layer(name), loaded.get_layer(name)
        assert type(b) is type(a)
        assert b.get_config() == a.get_config()
        for wa, wb in zip(a.weights, b.weights):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    assert keras.saving.get_registered_name(dtf.DeformConv2D) == "deformops>DeformConv2D"
    assert keras.saving.get_registered_name(dtf.ConvOffset2D) == "deformops>ConvOffset2D"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("make", [lambda f: dtf.DeformConv2D(4, 3, padding="same", data_format=f),
                                  lambda f: dtf.ConvOffset2D(data_format=f)],
                         ids=["DeformConv2D", "ConvOffset2D"])
def test_built_layers_reject_another_channel_count(make, data_format):
    """A layer built for 3 channels refuses 6 (as keras' Conv2D): otherwise its convolutions
    would silently become 2-group ones, groups being inferred from the kernel [oracle: the
    keras InputSpec contract]."""
    shape = (1, 5, 5, 3) if data_format == "channels_last" else (1, 3, 5, 5)
    layer = make(data_format)
    layer(np.zeros(shape, np.float32))
    other = shape[:3] + (6,) if data_format == "channels_last" else (1, 6, 5, 5)
    with pytest.raises(ValueError, match="axis"):
        layer(np.zeros(other, np.float32))
    with pytest.raises(ValueError, match="axis"):
        layer(keras.Input(other[1:]))


EMPTY_BATCH_LAYERS = {
    "DeformConv2D same": lambda f: dtf.DeformConv2D(4, 3, padding="same", data_format=f),
    "DeformConv2D valid, strides 2": lambda f: dtf.DeformConv2D(4, 3, strides=2, data_format=f),
    "DeformConv2D same, strides 2, mask": lambda f: dtf.DeformConv2D(
        4, (3, 2), strides=2, padding="same", use_mask=True, data_format=f),
    "DeformConv2D valid, dilation 2, groups": lambda f: dtf.DeformConv2D(
        6, 3, dilation_rate=2, groups=3, offset_groups=3, data_format=f),
    "ConvOffset2D": lambda f: dtf.ConvOffset2D(data_format=f),
}


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("name", list(EMPTY_BATCH_LAYERS))
def test_layers_take_an_empty_batch(name, data_format):
    """N = 0: the output has the layer's output shape with 0 images and every weight a zero
    gradient, eagerly and inside tf.function with unknown sizes and with known ones (as under
    keras.Input; TF's graph optimizer removed a reshape there) [oracles: compute_output_shape,
    and the same layer's output on one image]. (TF 2.21's conv2d returns its input's shape for
    an empty batch, which the offset predictors must not pass on.)"""
    last = data_format == "channels_last"
    shape = (7, 6, 3) if last else (3, 7, 6)
    layer = EMPTY_BATCH_LAYERS[name](data_format)
    one = layer(_x((1, *shape), dtype="float32"))
    empty = tf.zeros((0, *shape))
    with tf.GradientTape() as tape:
        out = layer(empty)
        loss = tf.reduce_sum(out)
    assert tuple(out.shape) == (0, *one.shape[1:]) == tuple(layer.compute_output_shape(
        (0, *shape)))
    grads = tape.gradient(loss, layer.trainable_weights)
    for g, w in zip(grads, layer.trainable_weights):
        np.testing.assert_array_equal(tf.convert_to_tensor(g).numpy(), np.zeros(w.shape))
    unknown = (None, None, None, 3) if last else (None, 3, None, None)
    for signature in (unknown, (None, *shape)):
        f = tf.function(layer.__call__, input_signature=[tf.TensorSpec(signature)])
        assert tuple(f(empty).shape) == tuple(out.shape)
        np.testing.assert_array_equal(f(_x((1, *shape), dtype="float32")).numpy(), one.numpy())

        @tf.function(input_signature=[tf.TensorSpec(signature)])
        def grads_of(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x))
            return tape.gradient(loss, layer.trainable_weights)

        for g, w in zip(grads_of(empty), layer.trainable_weights):
            np.testing.assert_array_equal(tf.convert_to_tensor(g).numpy(), np.zeros(w.shape))


@pytest.mark.parametrize("dilation_rate", [2, (1, 2)])
def test_dilated_deform_conv2d_input_gradient_in_float64(dilation_rate):
    """The input gradient of a dilated DeformConv2D in float64, where TF's CPU conv2d (without
    oneDNN) has no dilated input gradient, through the predictor too [oracle:
    tf.test.compute_gradient, float64 central differences]."""
    layer = dtf.DeformConv2D(2, 2, padding="same", dilation_rate=dilation_rate, use_mask=True,
                             offset_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=3),
                             dtype="float64")
    x = tf.constant(_x((1, 6, 5, 2), seed=4))
    layer(x)
    theo, num = tf.test.compute_gradient(layer, [x], delta=1e-6)
    np.testing.assert_allclose(theo[0], num[0], rtol=1e-6, atol=1e-7)


def test_conv_offset2d_on_empty_images():
    """H = W = 0 with N = 2: an empty output of the layer's shape, not an error about a batch of
    1 (a reshape to -1 images made one) [oracle: compute_output_shape]."""
    layer = dtf.ConvOffset2D()
    out = layer(np.zeros((2, 0, 0, 3), np.float32))
    assert tuple(out.shape) == tuple(layer.compute_output_shape((2, 0, 0, 3))) == (2, 0, 0, 3)


def test_valid_padding_on_an_input_smaller_than_the_kernel_is_a_value_error():
    """'valid' padding, 3x3 input, 5x5 kernel (or 3x3 dilated by 2): ValueError naming the size,
    as keras' Conv2D, at model-building time and when called [oracle: keras Conv2D]."""
    with pytest.raises(ValueError):
        keras.layers.Conv2D(2, 5)(keras.Input((3, 3, 1)))
    for kw in (dict(kernel_size=5), dict(kernel_size=3, dilation_rate=2)):
        with pytest.raises(ValueError, match="smaller than the kernel"):
            dtf.DeformConv2D(2, **kw)(keras.Input((3, 3, 1)))
        with pytest.raises(ValueError, match="smaller than the kernel"):
            dtf.DeformConv2D(2, **kw)(np.zeros((1, 3, 3, 1), np.float32))
    assert dtf.DeformConv2D(2, 5)(np.zeros((1, 5, 6, 1), np.float32)).shape == (1, 1, 2, 2)


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield tf.float16 if request.param == "mixed_float16" else tf.bfloat16
    keras.mixed_precision.set_global_policy("float32")


MIXED_LAYERS = {
    "ConvOffset2D": lambda **kw: dtf.ConvOffset2D(init_normal_stddev=0.5, **kw),
    "DeformConv2D": lambda **kw: dtf.DeformConv2D(
        4, 3, padding="same", use_mask=True, activation="relu",
        offset_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=1), **kw),
    "DeformConv2D channels_first": lambda **kw: dtf.DeformConv2D(
        3, 3, strides=2, padding="same", data_format="channels_first",
        offset_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=2), **kw),
}


@pytest.mark.parametrize("name", list(MIXED_LAYERS))
def test_mixed_precision_layers_compute_in_float32_on_the_cpu(mixed_policy, name):
    """Under a mixed policy the layers return the policy's half type, computed in float32 on
    the CPU (whose kernels have no half types): equal, bit for bit, to the same layer with
    dtype='float32' on the half-rounded input, cast to the half type; weights stay float32
    [oracle: the float32 layer with the same weights]."""
    x = np.random.default_rng(0).random((2, 8, 8, 2)).astype(np.float32)
    mixed = MIXED_LAYERS[name]()
    out = mixed(x)
    assert out.dtype == mixed_policy
    ref = MIXED_LAYERS[name](dtype="float32")
    ref.build(x.shape)
    ref.set_weights(mixed.get_weights())
    rounded = tf.cast(tf.cast(x, mixed_policy), tf.float32)
    np.testing.assert_array_equal(out.numpy(), tf.cast(ref(rounded), mixed_policy).numpy())
    assert {w.dtype for w in mixed.weights} == {"float32"}


def test_mixed_precision_model_trains_in_model_fit(mixed_policy):
    """A mixed-precision model with both layers (no dtype given) trains in model.fit: finite,
    decreasing loss [oracle: the loss of the first and last epoch]."""
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(2, 1)(inp)  # half precision under the policy
    h = dtf.ConvOffset2D()(h)
    out = dtf.DeformConv2D(3, 3, padding="same", use_mask=True)(h)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D(dtype="float32")(out))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(0)
    hist = model.fit(rng.random((16, 8, 8, 2)), rng.random((16, 3)), epochs=4, batch_size=8,
                     verbose=0)
    losses = hist.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
