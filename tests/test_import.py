"""Import hygiene and DLPack interchange.

Oracles: ``sys.modules`` of a fresh interpreter (lazy imports), and the same call on the NumPy
array itself (DLPack objects).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deformops as dops
from _oracles import grid_coords, make_coords, mixed_coords

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("numba", "llvmlite", "cupy", "torch", "tensorflow", "scipy", "jax")


def _run(code):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


def test_import_loads_numpy_only():
    """``import deformops`` loads none of numba, llvmlite, cupy, torch, tensorflow, scipy, jax
    [oracle: sys.modules of a fresh interpreter]."""
    code = (
        "import sys, deformops\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "print('dops-api', all(hasattr(deformops, n) for n in ('sample', 'sample_backward',"
        " 'deform_sample', 'deform_sample_backward', 'map_coordinates')))\n"
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    loaded, api = p.stdout.strip().splitlines()
    assert loaded == "[]", f"import deformops loaded {loaded}"
    assert api == "dops-api True"


def test_first_use_loads_numba_not_frameworks():
    """The first CPU call loads Numba (the CPU backend) but no framework (torch, tensorflow,
    cupy) [oracle: sys.modules of a fresh interpreter]. (Numba itself may import scipy.)"""
    code = (
        "import sys, numpy as np, deformops as dops\n"
        "out = dops.sample(np.ones((1, 1, 3, 3)), np.zeros((1, 2, 2, 2)))\n"
        "assert out.shape == (1, 1, 2, 2)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'numba', 'torch', 'tensorflow', 'cupy'}))\n"
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['numba']"


class DLPackOnly:
    """Exposes only ``__dlpack__`` / ``__dlpack_device__`` of a wrapped NumPy array (no
    ``__array__``, no buffer protocol) and records the requests it receives."""

    def __init__(self, a):
        self._a = a
        self.requests = []

    def __dlpack__(self, **kwargs):
        self.requests.append(kwargs)
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_wrapper_is_not_an_array():
    """The test double really hides the array: np.asarray sees an opaque object, np.from_dlpack
    a zero-copy view [oracle: numpy]."""
    a = np.arange(6.0).reshape(2, 3)
    w = DLPackOnly(a)
    assert np.asarray(w).dtype == object
    assert np.shares_memory(np.from_dlpack(w), a)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dlpack_objects_accepted_zero_copy(dtype, layout):
    """Objects exposing only __dlpack__ are taken through DLPack without a copy request and give
    exactly the results of the NumPy arrays themselves, as NumPy arrays; a strided (transposed)
    array is accepted the same way [oracle: the same call on the arrays]."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 4, 5, 6)).astype(dtype)
    c = make_coords(rng, 2, 2, 3, 4, 5, 6, mixed_coords, weights=(1, 1, 1, 1)).astype(dtype)
    off = (make_coords(rng, 2, 2, 5, 6, 5, 6, mixed_coords, weights=(1, 1, 1, 1))
           - grid_coords(np.zeros((2, 4, 5, 6)))).astype(dtype)
    g = rng.uniform(-1, 1, (2, 4, 3, 4)).astype(dtype)
    if layout == "NHWC":  # strided views of NCHW memory
        x, c, off, g = (a.transpose(0, 2, 3, 1) for a in (x, c, off, g))
    kw = dict(order=1, mode="reflect", cval=0.5, layout=layout)

    wx, wc = DLPackOnly(x), DLPackOnly(c)
    got = dops.sample(wx, wc, **kw)
    assert type(got) is np.ndarray and got.dtype == dtype
    np.testing.assert_array_equal(got, dops.sample(x, c, **kw))
    for w in (wx, wc):
        assert w.requests, "__dlpack__ was not used"
        assert all(r.get("copy") is not True for r in w.requests), w.requests

    got = dops.deform_sample(DLPackOnly(x), DLPackOnly(off), **kw)
    np.testing.assert_array_equal(got, dops.deform_sample(x, off, **kw))

    res = dops.sample_backward(DLPackOnly(g), DLPackOnly(x), DLPackOnly(c), **kw)
    ref = dops.sample_backward(g, x, c, **kw)
    for a, b in zip(res, ref):
        assert type(a) is np.ndarray
        np.testing.assert_array_equal(a, b)
