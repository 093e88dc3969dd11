"""``python -m deformops.bench torch`` runs end to end on a tiny case (no timing is asserted).

Oracle: the command's own float64 check of a DeformConv2dPack training step against
torchvision, which makes it exit non-zero on a mismatch.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

import deformops  # noqa: E402
import deformops_torch  # noqa: E402


def _env():
    """This process's environment, with the directories deformops and deformops_torch were
    imported from put on PYTHONPATH (a checkout, or site-packages when installed)."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
             for m in (deformops, deformops_torch)]
    path = os.pathsep.join(dict.fromkeys(roots + [os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, PYTHONPATH=path)


def test_bench_torch_runs_on_a_tiny_shape(tmp_path):
    out = tmp_path / "torch.json"
    r = subprocess.run(
        [sys.executable, "-m", "deformops.bench", "torch", "--shape", "2,4,4,6,6,v2",
         "--repeat", "1", "--tiny-repeat", "3", "--threads", "1", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| N2 4->4 6x6 v2 train step" in r.stdout
    assert "adapter overhead" in r.stdout
    assert "deform_sample forward+backward" in r.stdout
    if "torchvision peer skipped" not in r.stdout:
        assert "check: torchvision vs deformops_torch step" in r.stdout
        assert "MISMATCH" not in r.stdout
    assert out.stat().st_size > 100
