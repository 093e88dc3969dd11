"""Keras 3 layers: the original project's ``ConvOffset2D`` and a DCNv1/v2 ``DeformConv2D``.

Both are registered with ``keras.saving.register_keras_serializable(package="deformops")``, so a
model using them survives a ``.keras`` save/load once ``deformops_tf`` is imported. They run on
Keras' TensorFlow backend only (the ops are TensorFlow ops) and set ``supports_jit = False``: their
kernels run in a ``tf.numpy_function`` inside ``model.fit``, which XLA cannot compile.

Internally both work channels-last (TF's CPU convolutions support NHWC only);
``data_format="channels_first"`` transposes at the layer boundary.
"""

import math
import numbers
import operator

import keras
import numpy as np
import tensorflow as tf
from keras import activations, constraints, initializers, regularizers

from . import ops

__all__ = ["ConvOffset2D", "DeformConv2D"]


def _pair(value, name):
    """A positive int or a pair of them (also as a NumPy array), as the ops check theirs: a
    float, string or bool is a ``TypeError``, never truncated."""
    return ops._pair(value.tolist() if isinstance(value, np.ndarray) else value, name, 1)


def _positive_int(value, name):
    """``value`` as a Python int >= 1 (NumPy integers too, as Keras' Conv2D takes them): a
    ``TypeError`` for a float, string or bool, a ``ValueError`` below 1."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} "
                        f"{value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _known_channels(C, layer, input_shape):
    """The input's channel count, which the layer needs known and positive."""
    if C is None:
        raise ValueError(f"{layer} needs a known channel count; got input shape "
                         f"{tuple(input_shape)}")
    if C < 1:
        raise ValueError(f"{layer} needs at least one input channel; got input shape "
                         f"{tuple(input_shape)}")
    return C


def _positive_number(value, name, zero_ok=False):
    """``value`` as a finite float > 0 (>= 0 with ``zero_ok``); NumPy scalars and 0-d arrays
    are numbers too."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        raise ValueError(f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got "
                         f"{value!r}")
    return value


def _data_format(data_format):
    data_format = data_format or keras.config.image_data_format()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError("data_format must be 'channels_last' or 'channels_first', got "
                         f"{data_format!r}")
    return data_format


def _input_spec(data_format, channels):
    """A built layer's input spec: 4-D with the channel count it was built for (another count
    would silently turn its convolutions into grouped ones, groups being inferred)."""
    axis = -1 if data_format == "channels_last" else 1
    return keras.layers.InputSpec(ndim=4, axes={axis: channels})


def _kernel_dtype(inputs):
    """The dtype a layer computes in: float32 where a mixed-precision policy hands a CPU layer
    half precision (the CPU kernels compute in float32 and float64 only; the layer returns its
    policy's dtype, as Keras' BatchNormalization does), else the inputs' own."""
    if inputs.dtype in (tf.float16, tf.bfloat16) and not ops._gpu_visible():
        return tf.float32
    return inputs.dtype


def _check_backend(cls):
    if keras.config.backend() != "tensorflow":
        raise ValueError(f"{cls} needs Keras' TensorFlow backend (KERAS_BACKEND='tensorflow'); "
                         f"the backend is {keras.config.backend()!r}")


def _same_padding(size, k, s, d):
    """Keras/TF 'same' padding (top, bottom) of one axis; None when ``size`` is unknown and the
    padding depends on it (strides > 1)."""
    if size is None and s != 1:
        return None
    if size is None:
        total = d * (k - 1)
    else:
        out = -(-size // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _output_size(size, k, s, d, padding):
    """Output rows (or columns) of a convolution along one axis of ``size`` (an int or a scalar
    tensor): ``ceil(size / s)`` for 'same', as Keras' ``Conv2D``."""
    if padding == "same":
        return (size + s - 1) // s
    return (size - d * (k - 1) - 1) // s + 1


def _spatial_sizes(x):
    """(H, W) of the channels-last ``x``: ints where static, else scalar tensors."""
    return [tf.shape(x)[1 + a] if x.shape[1 + a] is None else x.shape[1 + a] for a in (0, 1)]


def _with_shape(pred, sizes, channels):
    """``pred``, a ``tf.nn.convolution`` result, with the shape (N, Ho, Wo, channels): TF 2.21's
    oneDNN conv2d returns its input's shape for an empty batch (N = 0), which later ops refuse.
    ``sizes`` (Ho, Wo) as ints or scalar tensors. A reshape (that copies nothing), except in a
    graph where N may be 0: TF's graph optimizer removes a reshape where the static shapes
    agree, so there a ``tf.cond`` gives an empty batch the empty tensor of that shape."""
    batch = pred.shape[0]
    shape = [tf.shape(pred)[0] if batch is None else batch, sizes[0], sizes[1], channels]
    if batch is not None and (batch > 0 or tf.executing_eagerly()):
        return tf.reshape(pred, shape)
    return tf.cond(tf.shape(pred)[0] > 0, lambda: tf.reshape(pred, shape),
                   lambda: tf.zeros([0, sizes[0], sizes[1], channels], pred.dtype))


@keras.saving.register_keras_serializable(package="deformops")
class ConvOffset2D(keras.layers.Layer):
    """The deformable layer of the original Keras project (felixlaumon/deform-conv), done right.

    A 3x3 convolution without bias predicts one (dy, dx) pair per channel and pixel (2C outputs),
    and each channel of the input is resampled at its own offsets: channel c reads offset
    channels ``2c`` (dy) and ``2c + 1`` (dx), i.e. :func:`deformops_tf.deform_sample` with
    G = C offset groups. The original split its offsets by a transpose/reshape that mixed
    channels and pixels for anything but a channel count of 1; this one does not. Output shape =
    input shape; maps need not be square.

    Parameters
    ----------
    filters : int, optional
        The original signature's argument: if given it must equal the input's channel count.
    init_normal_stddev : float
        The offset kernel starts as N(0, init_normal_stddev) (0.01, as the original); 0 starts
        it at zero (the layer then begins as the identity).
    mode : str
        Boundary mode of the sampling, any deformops / ``scipy.ndimage`` mode. Default
        'nearest': the original clipped the coordinates to the image, which is 'nearest' for
        bilinear sampling.
    order : {0, 1}
        Interpolation order (1 = bilinear, the original's).
    cval : float
        Value outside the image for the constant modes.
    data_format : {'channels_last', 'channels_first'}, optional
        Default: ``keras.config.image_data_format()``.
    kernel_initializer : optional
        Overrides ``init_normal_stddev``.
    kernel_regularizer, kernel_constraint : optional
        Of the offset kernel.
    **kwargs
        Keras ``Layer`` arguments (``name``, ``dtype``, ``trainable``, ...).
    """

    def __init__(self, filters=None, init_normal_stddev=0.01, mode="nearest", order=1, cval=0.0,
                 data_format=None, kernel_initializer=None, kernel_regularizer=None,
                 kernel_constraint=None, **kwargs):
        _check_backend("ConvOffset2D")
        super().__init__(**kwargs)
        filters = None if filters is None else _positive_int(filters, "filters")
        self.init_normal_stddev = _positive_number(init_normal_stddev, "init_normal_stddev",
                                                   zero_ok=True)
        ops._check_options(order, mode, cval, tf.float32)
        self.filters = filters
        self.mode, self.order, self.cval = mode, int(order), float(cval)
        self.data_format = _data_format(data_format)
        if kernel_initializer is None:
            kernel_initializer = (initializers.RandomNormal(0.0, self.init_normal_stddev)
                                  if self.init_normal_stddev > 0 else initializers.Zeros())
            self._default_initializer = True
        else:
            self._default_initializer = False
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.supports_jit = False

    def _channels(self, input_shape):
        return input_shape[-1] if self.data_format == "channels_last" else input_shape[1]

    def build(self, input_shape):
        C = _known_channels(self._channels(input_shape), "ConvOffset2D", input_shape)
        if self.filters is not None and self.filters != C:
            raise ValueError(f"filters ({self.filters}) must equal the input's channel count "
                             f"({C}): ConvOffset2D resamples each channel in place")
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, C, 2 * C),
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint, autocast=False)
        self.input_spec = _input_spec(self.data_format, C)

    def call(self, inputs):
        x = tf.cast(inputs, _kernel_dtype(inputs))
        x = x if self.data_format == "channels_last" else tf.transpose(x, (0, 2, 3, 1))
        offset = tf.nn.convolution(x, tf.cast(self.kernel, x.dtype), 1, "SAME")
        offset = _with_shape(offset, _spatial_sizes(x), 2 * x.shape[-1])
        out = ops.deform_sample(x, offset, order=self.order, mode=self.mode, cval=self.cval)
        out = out if self.data_format == "channels_last" else tf.transpose(out, (0, 3, 1, 2))
        return tf.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            init_normal_stddev=self.init_normal_stddev,
            mode=self.mode,
            order=self.order,
            cval=self.cval,
            data_format=self.data_format,
            kernel_initializer=(None if self._default_initializer
                                else initializers.serialize(self.kernel_initializer)),
            kernel_regularizer=regularizers.serialize(self.kernel_regularizer),
            kernel_constraint=constraints.serialize(self.kernel_constraint),
        )
        return config


@keras.saving.register_keras_serializable(package="deformops")
class DeformConv2D(keras.layers.Layer):
    """Deformable convolution, DCNv1 (``use_mask=False``) or DCNv2 (``use_mask=True``), that
    predicts its own offsets (and mask), with ``keras.layers.Conv2D``'s arguments.

    A regular convolution with the same kernel size, strides, padding and dilation (the
    *offset predictor*, kernel and bias zero-initialised) maps the input to ``2*G*K`` offset
    channels (and ``G*K`` mask channels for DCNv2; K = kh*kw taps, G = ``offset_groups``), in
    the channel order of :func:`deformops_tf.deform_conv2d`: offsets first, then mask. The mask
    is ``mask_scale * sigmoid(logits)``.

    At initialisation the offsets are 0, so DCNv1 starts as exactly ``Conv2D``. The default
    ``mask_scale=1`` is mmcv's DCNv2 (and ``deformops_torch``'s): the mask starts at 0.5 and the
    layer at half a ``Conv2D``; ``mask_scale=2`` makes a DCNv2 start as exactly ``Conv2D`` too
    (useful to load a pretrained convolution's weights into it), with masks in [0, 2].

    Parameters
    ----------
    filters : int
        Output channels.
    kernel_size, strides, dilation_rate : int or (int, int)
        As ``Conv2D`` (strides > 1 together with dilation_rate > 1 is refused, as ``Conv2D``).
    padding : {'valid', 'same'}
        As ``Conv2D``: 'same' pads like TensorFlow (the odd extra row/column at the bottom/right)
        and gives ``ceil(H / stride)`` rows. Padding is zero padding; samples that move outside
        the image read 0.
    data_format : {'channels_last', 'channels_first'}, optional
    groups : int
        Convolution groups; must divide the input channels and ``filters``.
    offset_groups : int
        G: groups of input channels sharing one set of offsets; must divide the input channels.
    use_mask : bool
        DCNv2 modulation.
    use_bias : bool
    mask_scale : float
        Scale of the sigmoid mask (see above).
    activation : optional
    kernel_initializer, bias_initializer : optional
        Of the deformable convolution (default ``glorot_uniform`` / ``zeros``, as ``Conv2D``).
    offset_initializer : optional
        Of the offset predictor's kernel and bias (default ``zeros``).
    kernel_regularizer, bias_regularizer, offset_regularizer, activity_regularizer : optional
        ``offset_regularizer`` applies to the predictor's kernel.
    kernel_constraint, bias_constraint : optional
    **kwargs
        Keras ``Layer`` arguments.

    Weights: ``kernel`` [kh, kw, Cin/groups, filters], ``bias`` (filters,), ``offset_kernel``
    [kh, kw, Cin, (2 or 3)*G*K], ``offset_bias``.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", data_format=None,
                 dilation_rate=1, groups=1, offset_groups=1, use_mask=False, use_bias=True,
                 mask_scale=1.0, activation=None, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", offset_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, offset_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, **kwargs):
        _check_backend("DeformConv2D")
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        filters, groups = _positive_int(filters, "filters"), _positive_int(groups, "groups")
        offset_groups = _positive_int(offset_groups, "offset_groups")
        if filters % groups:
            raise ValueError(f"filters ({filters}) must be divisible by groups ({groups})")
        self.filters, self.groups, self.offset_groups = filters, groups, offset_groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError("strides > 1 is not supported together with dilation_rate > 1 "
                             f"(as keras.layers.Conv2D); got strides={self.strides}, "
                             f"dilation_rate={self.dilation_rate}")
        padding = padding.lower() if isinstance(padding, str) else padding
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding
        self.data_format = _data_format(data_format)
        self.use_mask, self.use_bias = bool(use_mask), bool(use_bias)
        self.mask_scale = _positive_number(mask_scale, "mask_scale")
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.offset_initializer = initializers.get(offset_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.offset_regularizer = regularizers.get(offset_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.supports_jit = False

    @property
    def _taps(self):
        return self.kernel_size[0] * self.kernel_size[1]

    def build(self, input_shape):
        Cin = _known_channels(input_shape[-1] if self.data_format == "channels_last"
                              else input_shape[1], "DeformConv2D", input_shape)
        if Cin % self.groups:
            raise ValueError(f"the input's {Cin} channels are not divisible by groups "
                             f"({self.groups})")
        if Cin % self.offset_groups:
            raise ValueError(f"the input's {Cin} channels are not divisible by offset_groups "
                             f"({self.offset_groups})")
        self.input_spec = _input_spec(self.data_format, Cin)
        kh, kw = self.kernel_size
        GK = self.offset_groups * self._taps
        self.kernel = self.add_weight(name="kernel", shape=(kh, kw, Cin // self.groups,
                                                            self.filters),
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint, autocast=False)
        self.bias = (self.add_weight(name="bias", shape=(self.filters,),
                                     initializer=self.bias_initializer,
                                     regularizer=self.bias_regularizer,
                                     constraint=self.bias_constraint, autocast=False)
                     if self.use_bias else None)
        n_pred = (3 if self.use_mask else 2) * GK
        self.offset_kernel = self.add_weight(name="offset_kernel", shape=(kh, kw, Cin, n_pred),
                                             initializer=self.offset_initializer,
                                             regularizer=self.offset_regularizer,
                                             autocast=False)
        self.offset_bias = self.add_weight(name="offset_bias", shape=(n_pred,),
                                           initializer=self.offset_initializer,
                                           autocast=False)

    def call(self, inputs):
        x = tf.cast(inputs, _kernel_dtype(inputs))
        x = x if self.data_format == "channels_last" else tf.transpose(x, (0, 2, 3, 1))
        if self.padding == "valid":
            self._check_valid_size(x.shape[1:3])
        dt = x.dtype
        # tf.nn.convolution, not conv2d: TF's CPU kernels without oneDNN (float64, or
        # TF_ENABLE_ONEDNN_OPTS=0) have no input gradient of a dilated conv2d
        pred = tf.nn.convolution(x, tf.cast(self.offset_kernel, dt), self.strides,
                                 self.padding.upper(), dilations=self.dilation_rate)
        pred = _with_shape(pred, self._output_sizes(x), self.offset_kernel.shape[-1])
        pred = tf.nn.bias_add(pred, tf.cast(self.offset_bias, dt))
        offset, mask = pred, None
        if self.use_mask:
            # tf.split, not two slices: the gradient of a slice pads it to the whole tensor
            # (1.1 ms more per training step at N=8, 28x28, 27 channels; tf.split's is a concat)
            offset, logits = tf.split(pred, [2 * self.offset_groups * self._taps,
                                             self.offset_groups * self._taps], axis=-1)
            mask = tf.sigmoid(logits)
            if self.mask_scale != 1.0:
                mask = mask * tf.constant(self.mask_scale, dt)
        pad = (0, 0)
        if self.padding == "same":
            x, pad = self._pad_same(x)
        out = ops.deform_conv2d(x, offset, tf.cast(self.kernel, dt),
                                None if self.bias is None else tf.cast(self.bias, dt),
                                strides=self.strides, padding=pad, dilations=self.dilation_rate,
                                mask=mask)
        if self.activation is not None:
            out = self.activation(out)
        out = out if self.data_format == "channels_last" else tf.transpose(out, (0, 3, 1, 2))
        return tf.cast(out, inputs.dtype)

    def _output_sizes(self, x):
        """(Ho, Wo) of the channels-last ``x``: ints where its sizes are static, else tensors."""
        return [_output_size(size, self.kernel_size[a], self.strides[a], self.dilation_rate[a],
                             self.padding) for a, size in enumerate(_spatial_sizes(x))]

    def _check_valid_size(self, sizes):
        """'valid' padding: a ValueError, as keras' Conv2D gives, where a known spatial size is
        smaller than the dilated kernel (TF's conv would fail with an InvalidArgumentError)."""
        for a, name in ((0, "height"), (1, "width")):
            span = self.dilation_rate[a] * (self.kernel_size[a] - 1) + 1
            if sizes[a] is not None and sizes[a] < span:
                raise ValueError(
                    f"the input's {name} ({sizes[a]}) is smaller than the kernel "
                    f"({self.kernel_size[a]} with dilation {self.dilation_rate[a]}: {span}); "
                    "with padding='valid' the output would be empty")

    def _pad_same(self, x):
        """TF 'same' padding as the deformable op's symmetric padding plus, where the total is
        odd, one explicit zero row/column at the bottom/right (zero padding and the op's
        zero-padding rule read the same values). Unknown sizes with strides > 1: all explicit."""
        sizes = x.shape[1:3]
        pads = [_same_padding(sizes[a], self.kernel_size[a], self.strides[a],
                              self.dilation_rate[a]) for a in (0, 1)]
        if all(p is not None for p in pads):
            sym = tuple(p[0] for p in pads)
            extra = [p[1] - p[0] for p in pads]
            if any(extra):
                x = tf.pad(x, [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]])
            return x, sym
        dyn = []
        shape = tf.shape(x)
        for a in (0, 1):
            size = shape[1 + a]
            k, s, d = self.kernel_size[a], self.strides[a], self.dilation_rate[a]
            total = tf.maximum(((size + s - 1) // s - 1) * s + d * (k - 1) + 1 - size, 0)
            dyn.append([total // 2, total - total // 2])
        return tf.pad(x, [[0, 0], dyn[0], dyn[1], [0, 0]]), (0, 0)

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            N, H, W = input_shape[0], input_shape[1], input_shape[2]
        else:
            N, H, W = input_shape[0], input_shape[2], input_shape[3]
        if self.padding == "valid":
            self._check_valid_size((H, W))
        sizes = [None if size is None else _output_size(size, k, s, d, self.padding)
                 for size, k, s, d in zip((H, W), self.kernel_size, self.strides,
                                          self.dilation_rate)]
        if self.data_format == "channels_last":
            return (N, sizes[0], sizes[1], self.filters)
        return (N, self.filters, sizes[0], sizes[1])

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            groups=self.groups,
            offset_groups=self.offset_groups,
            use_mask=self.use_mask,
            use_bias=self.use_bias,
            mask_scale=self.mask_scale,
            activation=activations.serialize(self.activation),
            kernel_initializer=initializers.serialize(self.kernel_initializer),
            bias_initializer=initializers.serialize(self.bias_initializer),
            offset_initializer=initializers.serialize(self.offset_initializer),
            kernel_regularizer=regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=regularizers.serialize(self.bias_regularizer),
            offset_regularizer=regularizers.serialize(self.offset_regularizer),
            kernel_constraint=constraints.serialize(self.kernel_constraint),
            bias_constraint=constraints.serialize(self.bias_constraint),
        )
        return config
