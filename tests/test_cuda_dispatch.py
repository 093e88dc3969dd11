"""CUDA dispatch and host-side logic that needs no GPU: errors without CuPy or without a GPU,
dtype rules per device, the deterministic switch, tiling and launch-shape arithmetic, and the
GPU benchmark's refusal to run without a GPU. Runs everywhere (no GPU, no CuPy needed)."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import deformops as dops
from deformops import _arrays
from deformops.backends import cuda as dcuda
from deformops.backends.cuda import _runtime, _source
from deformops.backends.cuda import deform_conv as cuda_conv
from deformops.backends.cuda import sampling as cuda_sampling


class _CudaArray:
    """A DLPack exporter that claims to live on CUDA device 0."""

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be reached without CuPy")

    def __dlpack_device__(self):
        return (2, 0)


def test_cuda_arrays_without_cupy_raise_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match="CuPy"):
        dops.sample(_CudaArray(), _CudaArray())
    with pytest.raises(ImportError, match="CuPy"):
        _arrays.backend("cuda")


def test_cuda_without_gpu_raises_a_clear_error(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_arrays, "_CUDA_OK", [])
    with pytest.raises(_arrays.CUDAUnavailableError, match="no usable GPU"):
        _arrays.backend("cuda")


def test_real_cupy_without_gpu(monkeypatch):
    """With the real CuPy on a machine without a GPU, dispatch to CUDA names the cause."""
    cupy = pytest.importorskip("cupy")
    if cupy.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(_arrays, "_CUDA_OK", [])
    with pytest.raises(_arrays.CUDAUnavailableError, match=r"cupy.is_available\(\) is False"):
        _arrays.backend("cuda")


def test_cpu_backend_is_still_numba():
    from deformops.backends import cpu

    assert _arrays.backend("cpu") is cpu


def test_dtype_rules_per_device():
    half = {"x": np.zeros(1, np.float16)}
    with pytest.raises(TypeError, match="x must have dtype float32, float64; got float16"):
        _arrays.check_dtypes(half)
    assert _arrays.check_dtypes(half, device="cuda") == np.float16
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64"):
        _arrays.check_dtypes({"x": np.zeros(1, np.int32)}, device="cuda")
    with pytest.raises(TypeError, match="no silent promotion"):
        _arrays.check_dtypes({"x": np.zeros(1, np.float16), "y": np.zeros(1, np.float32)},
                             device="cuda")


def test_bfloat16_is_a_cuda_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.zeros(2, ml_dtypes.bfloat16)
    assert _arrays.check_dtypes({"x": a}, device="cuda").name == "bfloat16"
    with pytest.raises(TypeError):
        _arrays.check_dtypes({"x": a})
    assert "__nv_bfloat16" in _source.name_expression("dc_im2col", a.dtype, "int32")


def test_deterministic_switch(monkeypatch):
    monkeypatch.delenv("DEFORMOPS_DETERMINISTIC", raising=False)
    dcuda.set_deterministic(None)
    assert not dcuda.is_deterministic()
    with dcuda.deterministic():
        assert dcuda.is_deterministic()
        with dcuda.deterministic(False):
            assert not dcuda.is_deterministic()
        assert dcuda.is_deterministic()
    assert not dcuda.is_deterministic()
    monkeypatch.setenv("DEFORMOPS_DETERMINISTIC", "1")
    assert dcuda.is_deterministic()
    prev = dcuda.set_deterministic(False)
    assert prev is None and not dcuda.is_deterministic()
    dcuda.set_deterministic(None)


def test_importing_the_cuda_backend_does_not_import_cupy():
    code = ("import sys, deformops.backends.cuda, deformops.backends.cuda.sampling; "
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=_repo_path()))
    assert out.stdout.strip() == "False"


def _repo_path():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("C,G,P,cl", [(1, 1, 10**6, False), (256, 1, 4096, False),
                                      (256, 1, 4096, True), (4096, 4096, 64, True),
                                      (3, 3, 7, False)])
@pytest.mark.parametrize("dtype,index", [(np.float32, "int32"), (np.float64, "int64"),
                                         (np.float16, "int32")])
def test_point_blocks_fit_shared_memory(C, G, P, cl, dtype, index):
    pb, gb, smem = cuda_sampling.point_blocks(C, G, P, cl, dtype, index)
    assert 1 <= pb <= max(P, 1) and 1 <= gb <= G
    assert smem <= _runtime.SHARED_BYTES  # under the 48 KiB default of every GPU
    if not cl and P >= 32:
        assert pb >= 32 or smem > _runtime.SHARED_BYTES // 2  # coalesced NCHW rows


@pytest.mark.parametrize("N,P,T", [(16, 4096, 13000), (1, 100000, 3000), (5, 7, 256), (3, 256, 256)])
def test_tiles_cover_every_column_once(N, P, T):
    seen = np.zeros((N, P), int)
    for n0, nimg, p0, Tp in cuda_conv.tiles(N, P, T):
        assert nimg * Tp <= T
        seen[n0:n0 + nimg, p0:p0 + Tp] += 1
    assert (seen == 1).all()


def test_tile_workspace_is_bounded_independently_of_batch():
    t_small = cuda_conv.tile_columns(np.float32, 256, 256, 9, 16 * 4096)
    t_big = cuda_conv.tile_columns(np.float32, 256, 256, 9, 1024 * 4096)
    assert t_small == t_big
    assert t_big * 4 * (256 * 9 + 256) <= cuda_conv.TILE_BYTES


def test_index_type_threshold_is_the_runtime_one(monkeypatch):
    assert _runtime.index_dtype(2**31 - 1) == "int32"
    assert _runtime.index_dtype(2**31) == "int64"
    monkeypatch.setattr(_source, "INT32_MAX", 10)
    assert _runtime.index_dtype(11) == "int64"


def test_gpu_benchmark_refuses_without_gpu():
    try:
        import cupy

        if cupy.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-m", "deformops.bench", "gpu"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=_repo_path()), timeout=300)
    assert out.returncode != 0
    assert "GPU" in out.stderr + out.stdout
