"""``python -m deformops.bench tf`` runs end to end on a tiny shape (no timing is asserted).

Oracle: the command's own check of the TF op (forward and all gradients) against the NumPy op,
which makes it exit non-zero on a mismatch.
"""

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tf_runs_on_a_tiny_shape():
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-m", "deformops.bench", "tf", "--shape", "1,4,4,6,6,v2",
                        "--repeat", "1", "--min-time", "0.01", "--passes", "3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "check: tf.function op vs numpy op" in r.stdout and ": OK" in r.stdout
    for row in ("| numpy op ", "| numpy op, no x grad ", "| DeformConv2D step ", "| Conv2D step ",
                "| predictor step ", "| DeformConv2D step, 2nd layer ",
                "| predictor step, 2nd layer ", "| numpy_function floor ",
                "| Keras step, bias only ",
                "DeformConv2D step / numpy op",
                "| Keras step, bias only, predictor's size ",
                "1st layer: DeformConv2D net / numpy op, no x grad",
                "2nd layer: DeformConv2D net / numpy op",
                "(DeformConv2D step - predictor step) / numpy op, no x grad",
                "(DeformConv2D step - Keras step, bias only) / numpy op, no x grad",
                "(tf op tf.function - numpy_function floor) / numpy op",
                "1st layer: DeformConv2D net / numpy op, no x grad, per pass",
                "2nd layer: DeformConv2D net / numpy op, per pass",
                "| DeformConv2D step, kernels slept ",
                "| DeformConv2D step, 2nd layer, kernels slept ",
                "1st layer, kernels slept: DeformConv2D net / numpy op, no x grad",
                "2nd layer, kernels slept: DeformConv2D net / numpy op",
                "1st layer: kernel calls in its step / the numpy op, no x grad's",
                "2nd layer: kernel calls in its step / the numpy op's"):
        assert row in r.stdout, r.stdout
    # every kernel call of the slept steps had its stand-in
    (note,) = [ln for ln in r.stdout.splitlines() if "kernel calls of the slept steps:" in ln]
    slept, real = note.split(": ")[-1].split(", ")
    assert int(slept.split()[0]) > 0 and real == "0 real", note
    # Per pass: a note per layer with the range over the --passes passes, which holds the median
    # that the ratio row reports [oracle: min <= median <= max]; and a note with the ratio's 90%
    # bootstrap interval over the passes, two ordered finite numbers (its values are tested
    # below, on made-up times).
    lines = r.stdout.splitlines()
    for layer in ("1st", "2nd"):
        (row,) = [ln for ln in lines if ln.startswith(f"| {layer} layer: ") and ", per pass" in ln]
        median = float(row.split("|")[4])
        start = f"- N1 4->4 6x6 v2 [float32], {layer} layer: "
        (note,) = [ln for ln in lines if ln.startswith(start) and "per pass (" in ln]
        low, high = (float(v) for v in note.split("per pass (3 passes): ")[1].split(" to "))
        assert low - 0.01 <= median <= high + 0.01, (row, note)
        (note,) = [ln for ln in lines if ln.startswith(start) and "90% interval" in ln]
        lo, hi = (float(v) for v in
                  note.split("90% interval (bootstrap over 3 passes): ")[1].split(" to "))
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi, note


def _blocks(times_by_peer):
    """{peer: [Measurement of each pass]} from {peer: [[ms of each call] of each pass]}."""
    from deformops.bench._timing import Measurement

    return {peer: [Measurement("op", peer, "float32", sorted(t)[len(t) // 2], min(t), t[0],
                               len(t), times_ms=tuple(t)) for t in passes]
            for peer, passes in times_by_peer.items()}


def test_overhead_interval_resamples_whole_passes():
    """The bootstrap interval of the layer ratio: a point where every pass gives the same ratio,
    else the spread of the ratio over resampled passes.

    Oracles: ((layer - bias) - (pred - bias of pred's size)) / numpy computed by hand. Every
    pass alike: each resample equals the whole. Passes whose five times are all scaled together
    (x1, x2, x3: a slow spell that hits the whole pass) each give the same ratio, so resampling
    whole passes gives exactly that point, where resampling calls, or each callable's passes
    on their own, mixes slow and fast callables and spreads it. Passes of two kinds that give
    1.0 and 2.0 bound the interval to [1.0, 2.0], and with 8 passes, 4 of each, the 5th
    percentile is below 1.5 and the 95th above (a resample's median is 1.5 or beyond only
    where it draws 4 or more of that kind). One pass, or a callable missing: None."""
    np = pytest.importorskip("numpy")
    from deformops.bench import tf as btf

    names = (btf.LAYER, btf.EMPTY, btf.PRED, btf.EMPTY_PRED, btf.NUMPY_NO_X)

    def one_pass(layer, numpy):  # bias 1 ms, pred 3 ms, bias of pred's size 1 ms
        return dict(zip(names, ([layer] * 3, [1.0] * 3, [3.0] * 3, [1.0] * 3, [numpy] * 3)))

    alike = [one_pass(14.0, 12.0)] * 5  # ((14 - 1) - (3 - 1)) / 12 = 11/12
    blocks = _blocks({k: [p[k] for p in alike] for k in names})
    rng = np.random.default_rng(0)
    lo, hi = btf._overhead_interval(blocks, btf.LAYER, btf.PRED, btf.NUMPY_NO_X, rng, 200)
    assert lo == pytest.approx(11 / 12) and hi == pytest.approx(11 / 12)

    scaled = [{k: [v * f for v in t] for k, t in one_pass(14.0, 12.0).items()}
              for f in (1.0, 2.0, 3.0, 1.0, 2.0, 3.0)]
    blocks = _blocks({k: [p[k] for p in scaled] for k in names})
    lo, hi = btf._overhead_interval(blocks, btf.LAYER, btf.PRED, btf.NUMPY_NO_X, rng, 500)
    assert lo == pytest.approx(11 / 12) and hi == pytest.approx(11 / 12)

    mixed = [one_pass(13.0, 10.0), one_pass(23.0, 10.0)] * 4  # 10/10 and 20/10
    blocks = _blocks({k: [p[k] for p in mixed] for k in names})
    lo, hi = btf._overhead_interval(blocks, btf.LAYER, btf.PRED, btf.NUMPY_NO_X, rng, 2000)
    assert 1.0 <= lo < hi <= 2.0 and lo < 1.5 < hi, (lo, hi)
    one = _blocks({k: [p[k] for p in mixed[:1]] for k in names})
    assert btf._overhead_interval(one, btf.LAYER, btf.PRED, btf.NUMPY_NO_X, rng) is None
    # a callable missing: no interval
    del blocks[btf.EMPTY]
    assert btf._overhead_interval(blocks, btf.LAYER, btf.PRED, btf.NUMPY_NO_X, rng) is None


class _FakeOps:
    """A stand-in for ``deformops_tf.ops``: ``_locked`` runs the call and counts it."""

    def __init__(self):
        self.calls = 0
        self._locked = self.locked

    def locked(self, fn, args, kwargs):
        self.calls += 1
        return fn(*args, **kwargs)


def test_kernel_clock_times_real_calls_and_sleeps_for_stand_ins():
    """KernelClock: calls made under a tag run and are timed by key (the kernel's name and the
    gradients it computes), each key's first call after new_block left out (a warm-up); the
    first call of a key keeps a copy of its result. Under stand_ins a call of a key that has a
    duration and a result does not run (the fake kernel's counter stays), takes at least that
    duration [oracle: the clock], and returns an equal copy in a new, 64-byte aligned buffer (a
    NamedTuple keeps its type and its None fields), unchanged when the caller writes into what
    it got; every other call runs and is counted apart. Untagged calls pass through untimed. On
    exit the original ``_locked`` is back."""
    np = pytest.importorskip("numpy")
    import time

    from deformops import DeformConv2dGrads
    from deformops.bench import _stand_ins

    def deform_conv2d(x):
        return x * 2.0

    def deform_conv2d_backward(x, needs_input_grad):
        return DeformConv2dGrads(x + 1.0, None, x - 1.0, None, None)

    ops = _FakeOps()
    original = ops._locked
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    needs = (False, True, True, True, True)
    fwd, bwd = ("deform_conv2d", None), ("deform_conv2d_backward", needs)
    with _stand_ins.KernelClock(ops) as clock:
        assert ops._locked == clock._call
        with clock.tagged("layer"):
            for _ in range(3):
                out = ops._locked(deform_conv2d, (x,), {})
                grads = ops._locked(deform_conv2d_backward, (x,), {"needs_input_grad": needs})
        assert np.array_equal(out, x * 2.0) and ops.calls == 6
        timed = clock._samples["layer"].times
        assert set(timed) == {fwd, bwd} and all(len(t) == 2 for t in timed.values())
        clock.new_block()
        with clock.tagged("layer"):
            ops._locked(deform_conv2d, (x,), {})  # a warm-up again: left out
        assert len(timed[fwd]) == 2
        with clock.tagged("layer"):
            ops._locked(deform_conv2d, (x,), {})
        assert len(timed[fwd]) == 3 and set(clock.seconds("layer")) == {fwd, bwd}
        assert clock.seconds("other") == {}
        out[...] = -1.0  # the caller (TF) writes into a buffer it was handed

        with clock.stand_ins({fwd: 0.02, bwd: 0.03}):
            t0 = time.perf_counter()
            out2 = ops._locked(deform_conv2d, (x,), {})
            t1 = time.perf_counter()
            grads2 = ops._locked(deform_conv2d_backward, (x,), {"needs_input_grad": needs})
            t2 = time.perf_counter()
            assert ops.calls == 8 and clock.stand_in_calls == 2
            assert clock.real_under_stand_ins == 0
            assert t1 - t0 >= 0.02 and t2 - t1 >= 0.03
            # another key (all five gradients): no stand-in, it runs
            ops._locked(deform_conv2d_backward, (x,), {"needs_input_grad": (True,) * 5})
            assert ops.calls == 9 and clock.real_under_stand_ins == 1
        assert np.array_equal(out2, x * 2.0) and not np.shares_memory(out2, out)
        assert out2.ctypes.data % 64 == 0 and out2.flags.c_contiguous
        assert isinstance(grads2, DeformConv2dGrads)
        for a, b in zip(grads, grads2):
            assert (a is None and b is None) or (np.array_equal(a, b) and b.ctypes.data % 64 == 0
                                                 and not np.shares_memory(a, b))
        # untagged, no stand-ins: the call runs, untimed
        ops._locked(deform_conv2d, (x,), {})
        assert ops.calls == 10 and len(timed[fwd]) == 3
    assert ops._locked == original


def test_split_clock_leaves_out_warm_ups():
    """SplitClock: medians by key of the calls made so far, each key's first call after
    new_block left out [oracle: durations set by sleeping, compared by order only]."""
    import time

    from deformops.bench import _stand_ins

    def deform_conv2d(seconds):
        time.sleep(seconds)

    split = _stand_ins.SplitClock()
    split.timed(deform_conv2d, 0.05)  # the first block's warm-up: left out
    split.timed(deform_conv2d, 0.0)
    split.timed(deform_conv2d, 0.0)
    assert split.seconds()[("deform_conv2d", None)] < 0.05
    split.new_block()
    split.timed(deform_conv2d, 0.05)  # left out
    assert len(split._samples.times[("deform_conv2d", None)]) == 2


@pytest.mark.parametrize("hand_over", [False, True])
def test_clock_keys_are_the_adapters(monkeypatch, hand_over):
    """The NumPy op's forward and backward, timed apart by SplitClock, have the keys under which
    the TF layer's own kernel calls reach ``deformops_tf.ops._locked`` (first layer: no input
    gradient; second layer: all five), from TF's threads directly or through the adapter's
    worker thread, so that each stand-in sleeps the matching call's time. Oracle: the keys
    KernelClock times in real Keras training steps of each kind."""
    np = pytest.importorskip("numpy")
    keras = pytest.importorskip("keras")
    import deformops as dops
    import deformops_tf as dtf
    import tensorflow as tf
    from deformops.bench import _stand_ins
    from deformops.bench import tf as btf

    if hand_over:  # every call from a TF thread goes to the worker thread
        monkeypatch.setattr(dtf.ops, "_HANDOVER_ELEMENTS", 0)
    shape = (2, 4, 4, 6, 6, True)
    (x, offset, filters, bias, mask, grad_out), _ = btf._make_case(shape, "float32", 0)
    weight = filters.transpose(3, 2, 0, 1).copy()
    steps = btf._keras_steps(tf, keras, dtf, shape, "float32", x, 0)
    for layer, needs in ((btf.LAYER, (False, True, True, True, True)),
                         (btf.LAYER_2, (True,) * 5)):
        split = _stand_ins.SplitClock()
        both = btf._numpy_fn(dops, x, offset, weight, bias, mask, grad_out, "NHWC", needs, split)
        both(), both()
        with _stand_ins.KernelClock(dtf.ops) as clock:
            with clock.tagged(layer):
                steps[layer](), steps[layer]()
        assert set(clock.seconds(layer)) == set(split.seconds()), layer
        assert len(split.seconds()) == 2
        assert all(v > 0 and np.isfinite(v) for v in split.seconds().values())
    assert bool(dtf.ops._WORKER) or not hand_over
