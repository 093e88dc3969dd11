"""The Keras 3 side of the scaled-MNIST experiment (``--framework keras``), with deformops_tf layers.

The same primitives as mnist_torch.py, run by scaled_mnist.py's driver step by step (same images
in the same order, same schedule, same result schema); see scaled_mnist.py for the protocol. The CNN is the
original's Keras model: conv11 (32) -> conv12 (64, stride 2) -> conv21 (128) -> conv22 (128,
stride 2), 3x3 'same' with bias, each Conv -> ReLU -> BatchNormalization(epsilon=1e-3,
momentum=0.99), global average pooling, Dense(10) (logits; the loss takes ``from_logits``).
Input (28, 28, 1), channels last. Training is ``model.fit`` (one call per epoch, since every
fine-tuning epoch draws freshly scaled images) with a callback that keeps the running loss and
accuracy, the tqdm bar and the step times.

Freezing follows Keras 3: a layer with ``trainable = False`` gets no updates, and a frozen
``BatchNormalization`` runs in inference mode (moving statistics, no updates) even inside
``fit``. Variant (e) freezes the copied kernel and bias of each ``DeformConv2D`` variable by
variable, so only its offset predictor learns.
"""

import logging
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's C++ start-up notices

import deformops_tf as dtf
import keras
import mnist_data
import numpy as np
import tensorflow as tf
from scaled_mnist_results import BATCH, EVAL_BATCH, LR_CNN, LR_FINETUNE
from tqdm import tqdm

# name, filters, stride (as mnist_models.CONVS, channels last)
CONVS = (("conv11", 32, 1), ("conv12", 64, 2), ("conv21", 128, 1), ("conv22", 128, 2))
DEFORMED = ("conv12", "conv21", "conv22")
BN_EPS, BN_MOMENTUM = 1e-3, 0.99


class _NoRetracingWarning(logging.Filter):
    """Drops TF's warning about retraced functions: every variant is a new model with its own
    train and predict functions, traced once each, which TF counts as retracing."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


tf.get_logger().addFilter(_NoRetracingWarning())


def build_cnn(kind="regular", init_normal_stddev=0.01, mode="nearest"):
    """The CNN as a functional Keras model.

    ``kind``: ``"regular"``; ``"offset2d"`` (a ``ConvOffset2D`` named ``<conv>_offset`` in front
    of conv12, conv21 and conv22); ``"dcn"`` (those three convs are ``DeformConv2D`` layers with
    'same' padding and zero-initialised offset predictors). Layers are named ``conv11`` ...,
    ``<conv>_relu``, ``<conv>_bn``, ``gap``, ``dense``.
    """
    if kind not in ("regular", "offset2d", "dcn"):
        raise ValueError(f"kind must be 'regular', 'offset2d' or 'dcn', got {kind!r}")
    inp = keras.Input((28, 28, 1), name="image")
    x = inp
    for name, filters, stride in CONVS:
        deformed = name in DEFORMED
        if kind == "offset2d" and deformed:
            x = dtf.ConvOffset2D(init_normal_stddev=init_normal_stddev, mode=mode,
                                 name=f"{name}_offset")(x)
        if kind == "dcn" and deformed:
            x = dtf.DeformConv2D(filters, 3, strides=stride, padding="same", name=name)(x)
        else:
            x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=name)(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM,
                                            name=f"{name}_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="dense")(x), name=f"cnn_{kind}")


def copy_cnn(cnn, kind="regular", **kwargs):
    """A new model of ``kind`` (see :func:`build_cnn`) carrying ``cnn``'s weights; a
    ``DeformConv2D`` gets the regular conv's kernel and bias (its offset predictor stays zero)."""
    model = build_cnn(kind, **kwargs)
    for name, _, _ in CONVS:
        src, dst = cnn.get_layer(name), model.get_layer(name)
        if isinstance(dst, dtf.DeformConv2D):
            dst.kernel.assign(src.kernel)
            dst.bias.assign(src.bias)
        else:
            dst.set_weights(src.get_weights())
        model.get_layer(f"{name}_bn").set_weights(cnn.get_layer(f"{name}_bn").get_weights())
    model.get_layer("dense").set_weights(cnn.get_layer("dense").get_weights())
    return model


def batchnorms(model):
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def offset_layers(model):
    """The layers that predict offsets: ConvOffset2D and DeformConv2D."""
    return [layer for layer in model.layers
            if isinstance(layer, (dtf.ConvOffset2D, dtf.DeformConv2D))]


def predicted_offsets(layer, inputs):
    """The offsets (no mask channels) that ``layer`` predicts from its input (channels last)."""
    if isinstance(layer, dtf.ConvOffset2D):
        return tf.nn.conv2d(inputs, layer.kernel, 1, "SAME")
    pred = tf.nn.conv2d(inputs, layer.offset_kernel, layer.strides, layer.padding.upper(),
                        dilations=layer.dilation_rate)
    pred = tf.nn.bias_add(pred, layer.offset_bias)
    return pred[..., :2 * layer.offset_groups * layer.kernel_size[0] * layer.kernel_size[1]]


# ----------------------------------------------------------------------------------------------
# training


class _BatchValue(keras.metrics.Metric):
    """The value of ``fn(y_true, y_pred)`` averaged over the last batch only (Keras' own loss and
    metrics in the logs are epoch averages; the running curves need each batch's value)."""

    def __init__(self, fn, name):
        super().__init__(name=name)
        self.fn = fn
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.value.assign(keras.ops.mean(keras.ops.cast(self.fn(y_true, y_pred), "float32")))

    def result(self):
        return self.value

    def reset_state(self):
        self.value.assign(0.0)


def _batch_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def _batch_acc(y_true, y_pred):
    return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)


class _Progress(keras.callbacks.Callback):
    """Running loss and accuracy (exponential, 0.98 as the torch side), a point every 25
    batches, the tqdm bar and the time of every training step."""

    def __init__(self, desc, epochs):
        super().__init__()
        self.desc, self.epochs = desc, epochs
        self.history, self.step_s = [], []
        self.seen, self.run_loss, self.run_acc = 0, None, None
        self.epoch, self.size, self.bar, self.t0 = 0, 0, None, 0.0

    def start_epoch(self, epoch, size):
        """Before each ``fit`` call: the epoch's index and number of images."""
        self.epoch, self.size = epoch, size

    def on_train_begin(self, logs=None):
        self.bar = tqdm(total=math.ceil(self.size / BATCH), desc=f"{self.desc} epoch {self.epoch + 1}/{self.epochs}",
                        unit="step", leave=False, mininterval=1.0)

    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_s.append(time.perf_counter() - self.t0)
        loss, acc = float(logs["batch_loss"]), float(logs["batch_acc"])
        self.run_loss = loss if self.run_loss is None else 0.98 * self.run_loss + 0.02 * loss
        self.run_acc = acc if self.run_acc is None else 0.98 * self.run_acc + 0.02 * acc
        self.seen += min(BATCH, self.size - batch * BATCH)
        if batch % 25 == 0:
            self.history.append((self.seen, self.run_loss, self.run_acc))
            self.bar.set_postfix(loss=f"{self.run_loss:.3f}", acc=f"{100 * self.run_acc:.1f}%")
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()
        print(f"  {self.desc} epoch {self.epoch + 1}/{self.epochs}: running loss "
              f"{self.run_loss:.3f}, accuracy {100 * self.run_acc:.1f}%")


_PROGRESS_STATE = ("history", "step_s", "seen", "run_loss", "run_acc")


def train(model, images, labels, *, epochs, images_per_epoch, lr, scale, rng, desc,
          epoch_state=None):
    """Adam on ``model``'s trainable variables with ``model.fit``, one call per epoch on the
    epoch's images (a fresh permutation, freshly scaled with ``scale``); returns the history and
    the median step time, as :func:`mnist_torch.train` (``epoch_state`` too). Set the layers'
    ``trainable`` first."""
    t_start = time.perf_counter()
    optimizer = keras.optimizers.Adam(lr)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[_BatchValue(_batch_loss, "batch_loss"),
                           _BatchValue(_batch_acc, "batch_acc")])
    progress = _Progress(desc, epochs)
    first, earlier_s = 0, 0.0
    state = epoch_state.load() if epoch_state is not None else None
    if state is not None:
        model.set_weights(state["model"])
        optimizer.build(model.trainable_variables)
        for var, value in zip(optimizer.variables, state["optimizer"], strict=True):
            var.assign(value)
        rng.bit_generator.state = state["rng"]
        for name in _PROGRESS_STATE:
            setattr(progress, name, state[name])
        first, earlier_s = state["epoch"], state["seconds"]
    for epoch in range(first, epochs):
        idx = rng.permutation(len(images))[:images_per_epoch]
        x = images[idx]
        if scale:
            x = mnist_data.scale_images(x, rng)
        progress.start_epoch(epoch, len(x))
        model.fit(x[..., None], labels[idx], batch_size=BATCH, epochs=1, shuffle=False,
                  verbose=0, callbacks=[progress])
        if epoch_state is not None and epoch + 1 < epochs:
            epoch_state.save({
                "epoch": epoch + 1, "model": model.get_weights(),
                "optimizer": [np.array(v) for v in optimizer.variables],
                "rng": rng.bit_generator.state,
                **{name: getattr(progress, name) for name in _PROGRESS_STATE},
                "seconds": earlier_s + time.perf_counter() - t_start})
    # the median step, skipping the first steps (tracing, allocator warm-up)
    step_s = progress.step_s
    steady = step_s[min(20, len(step_s) // 2):]
    return {"history": progress.history,
            "step_ms": 1e3 * float(np.median(steady)) if steady else None,
            "earlier_s": earlier_s}


def evaluate(model, images, labels, offset_stats=False):
    """Accuracy (%) on (n, 28, 28) images (inference mode); with ``offset_stats`` also the mean
    |offset| (px) that the model's offset predictors output on them."""
    layers = offset_layers(model) if offset_stats else []
    probe = keras.Model(model.inputs, [model.outputs[0]] + [layer.input for layer in layers])
    total, count, correct = 0.0, 0, 0
    for s in range(0, len(images), EVAL_BATCH):
        # eager: no tf.function to trace for each model and test set
        outs = probe(tf.constant(images[s:s + EVAL_BATCH, ..., None]), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        correct += (np.argmax(outs[0].numpy(), 1) == labels[s:s + EVAL_BATCH]).sum()
        for layer, inp in zip(layers, outs[1:]):
            off = predicted_offsets(layer, inp).numpy()
            total += float(np.abs(off).sum(dtype=np.float64))
            count += off.size
    return 100.0 * correct / len(images), (total / count if count else None)


# ----------------------------------------------------------------------------------------------
# the variants


def finetune_setup(variant, cnn):
    """A fine-tuning copy of ``cnn`` for ``variant`` with its trainable layers (and variables)
    set; frozen BatchNorm layers run in inference mode."""
    kind = {"c": "offset2d", "d": "offset2d", "e": "dcn"}.get(variant, "regular")
    if variant not in "bcdef" or len(variant) != 1:
        raise ValueError(variant)
    model = copy_cnn(cnn, kind)
    train_bn = variant in ("b", "d", "f")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = train_bn
        elif isinstance(layer, (dtf.ConvOffset2D, dtf.DeformConv2D)):
            layer.trainable = True
        else:
            layer.trainable = variant == "f"
    if variant == "e":
        for layer in offset_layers(model):
            layer.kernel.trainable = False
            layer.bias.trainable = False
    return model


def set_threads(threads):
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:  # the TF runtime was already initialised
        print(f"--threads: TensorFlow's thread pools are already set up ({e})")


def seed(value):
    keras.utils.set_random_seed(value)


def new_cnn():
    return build_cnn("regular")


def train_cnn(cnn, images, labels, args, rng, epoch_state=None):
    """Phase 1: the whole CNN on plain images; returns the history and median step time."""
    return train(cnn, images, labels, epochs=args.epochs_cnn, images_per_epoch=args.cnn_images,
                 lr=LR_CNN, scale=False, rng=rng, desc="phase 1", epoch_state=epoch_state)


variant_model = finetune_setup


def finetune(key, cnn, images, labels, args, rng, epoch_state=None):
    """Phase 2 of variant ``key`` on scaled images; returns (model, history and median step
    time, number of parameters trained)."""
    model = finetune_setup(key, cnn)
    run = train(model, images, labels, epochs=args.epochs_finetune,
                images_per_epoch=args.finetune_images, lr=LR_FINETUNE, scale=True, rng=rng,
                desc=f"({key})", epoch_state=epoch_state)
    return model, run, sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def get_weights(model):
    """Every variable (BatchNorm's moving statistics included) as NumPy arrays."""
    return model.get_weights()


def set_weights(model, weights):
    model.set_weights(weights)
