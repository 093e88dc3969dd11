"""``python -m deformops.bench tf`` runs end to end on a tiny shape (no timing is asserted).

Oracle: the command's own check of the TF op (forward and all gradients) against the NumPy op,
which makes it exit non-zero on a mismatch.
"""

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
                        "--repeat", "1", "--min-time", "0.01"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
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
    # Per pass: a note per layer with the range over the passes, which holds the median that
    # the ratio row reports [oracles: the command's PASSES; min <= median <= max].
    from deformops.bench.tf import PASSES

    lines = r.stdout.splitlines()
    for layer in ("1st", "2nd"):
        (row,) = [ln for ln in lines if ln.startswith(f"| {layer} layer: ") and ", per pass" in ln]
        median = float(row.split("|")[4])
        (note,) = [ln for ln in lines if ln.startswith(f"- N1 4->4 6x6 v2 [float32], {layer}")]
        low, high = (float(v) for v in
                     note.split(f"per pass ({PASSES} passes): ")[1].split(" to "))
        assert low - 0.01 <= median <= high + 0.01, (row, note)
