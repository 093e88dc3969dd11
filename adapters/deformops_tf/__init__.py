"""TensorFlow / Keras 3 bindings of deformops: differentiable ops and Keras layers.

>>> import tensorflow as tf, keras, deformops_tf as dtf
>>> x = keras.Input((28, 28, 8))
>>> y = dtf.DeformConv2D(16, 3, padding="same", use_mask=True)(dtf.ConvOffset2D()(x))

Ops (differentiable, eager and inside ``tf.function`` / ``model.fit``; ``tf.nn.conv2d``
conventions, NHWC by default): :func:`deform_conv2d`, :func:`deform_sample`, :func:`sample`.
Keras layers (registered as ``deformops>ConvOffset2D`` and ``deformops>DeformConv2D``):
:class:`ConvOffset2D` (the original felixlaumon/deform-conv layer) and :class:`DeformConv2D`
(DCNv1/v2 with its own offset/mask predictor).
"""

from .layers import ConvOffset2D, DeformConv2D
from .ops import deform_conv2d, deform_sample, sample

__all__ = ["deform_conv2d", "deform_sample", "sample", "ConvOffset2D", "DeformConv2D"]
