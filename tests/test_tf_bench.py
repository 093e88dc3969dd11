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
                "2nd layer: DeformConv2D net / numpy op, per pass"):
        assert row in r.stdout, r.stdout
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
