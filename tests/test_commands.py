"""The benchmark command and the demo run end to end on tiny inputs (no timing is asserted).

Oracle: their own built-in checks against scipy, which make them exit non-zero on a mismatch.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_bench_sample_runs_and_checks_against_scipy():
    r = _run(["-m", "deformops.bench", "sample", "--size", "1", "3", "9", "7", "--repeat", "1",
              "--no-torch"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scipy / deformops" in r.stdout
    assert "| forward" in r.stdout


def test_bench_sample_per_channel_checks_against_scipy_and_torch():
    """--groups C: every channel at its own coordinates; the scipy forward and, where torch is
    installed, grid_sample's forward and float64 gradients on the (N*G, C/G) view must agree."""
    r = _run(["-m", "deformops.bench", "sample", "--size", "2", "3", "9", "7", "--groups", "3",
              "--repeat", "1"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scipy map_coordinates vs deformops sample, forward" in r.stdout
    bad = _run(["-m", "deformops.bench", "sample", "--size", "1", "3", "9", "7", "--groups", "2"])
    assert bad.returncode != 0 and "--groups 2 must divide the 3 channels" in bad.stderr


def test_bench_rejects_unknown_subcommand():
    r = _run(["-m", "deformops.bench", "no-such-op"])
    assert r.returncode != 0
    assert "invalid choice" in r.stderr


def test_warp_demo_writes_png_and_matches_scipy(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "warp.png"
    r = _run([os.path.join("examples", "warp_demo.py"), "--out", str(out), "--size", "32"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_conv_runs_on_a_tiny_shape():
    r = _run(["-m", "deformops.bench", "conv", "--shape", "2,4,4,6,6,v2", "--repeat", "1",
              "--no-torch"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| N2 4->4 6x6 v2 forward" in r.stdout


def test_bench_conv_depthwise_checks_against_torchvision_and_conv2d():
    """--groups Cin: a depthwise case, checked in float64 at its small version (kept depthwise:
    4 groups of one channel) against torchvision where installed and against a grouped conv2d
    with zero offsets; a --groups that does not divide the channels is refused."""
    r = _run(["-m", "deformops.bench", "conv", "--shape", "2,16,32,6,6,v2", "--groups", "16",
              "--repeat", "1", "--min-time", "0.01"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| N2 16->32 6x6 groups 16 v2 forward" in r.stdout
    assert "N2 4->4 6x6 groups 4 v2 (for N2 16->32 6x6 groups 16 v2)" in r.stdout
    assert "FAIL" not in r.stdout
    bad = _run(["-m", "deformops.bench", "conv", "--shape", "2,16,32,6,6,v2", "--groups", "3"])
    assert bad.returncode != 0
    assert "--groups 3 must divide the 16 input and 32 output channels" in bad.stderr


def test_bench_jit_reports_cold_and_cached_first_calls():
    """Both child processes run (cold cache, then the cache they filled) and every sampling
    kernel of the dtype gets a row [oracle: the kernel list of DESIGN §2]. ``--sampling-only``
    leaves out deform_conv2d's rows, whose cold compile took half of this test's time."""
    r = _run(["-m", "deformops.bench", "jit", "--dtype", "float32", "--sampling-only"])
    assert r.returncode == 0, r.stdout + r.stderr
    for op in ("forward", "backward"):
        for layout in ("NCHW", "NHWC"):
            assert f"| sample {op} {layout}" in r.stdout
    assert "| cold compile" in r.stdout and "| from cache" in r.stdout
    assert "sampling kernels (4 calls), cold total:" in r.stdout
    assert "deform_conv2d" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["conv", "--min-time", "-1"], "--min-time: expected a number of seconds >= 0"),
    (["tf", "--min-time", "nan"], "--min-time: expected a number of seconds >= 0"),
    (["sample", "--seed", "-5"], "--seed: expected an integer >= 0"),
    (["torch", "--seed", "1.5"], "--seed: expected an integer >= 0"),
])
def test_bench_rejects_bad_seed_and_min_time(args, message):
    """argparse errors (exit 2, the option named), not a traceback from NumPy or time.sleep, nor
    a run that ignores the value."""
    r = _run(["-m", "deformops.bench", *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command, module", [("tf", "tensorflow"), ("torch", "torch")])
def test_bench_without_its_framework_says_what_to_install(command, module):
    """A subcommand with nothing to time without its framework exits 2 naming the extra to
    install, instead of a traceback (tf) or an empty table with exit 0 (torch)."""
    code = (f"import sys; sys.modules[{module!r}] = None; from deformops.bench.__main__ import "
            f"main; sys.exit(main([{command!r}, '--min-time', '0', '--repeat', '1']))")
    if command == "torch":
        code = code.replace("'--min-time', '0', ", "")
    r = _run(["-c", code])
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"nothing to time: {module} is not importable" in r.stderr
    assert f"deformops-kernels[{'tf' if command == 'tf' else 'torch'}]" in r.stderr
    assert "Traceback" not in r.stderr
