"""CUDA dispatch and host-side logic that needs no GPU: errors without CuPy or without a GPU,
dtype rules per device, the deterministic switch, tiling and launch-shape arithmetic, and the
GPU benchmark's refusal to run without a GPU. Runs everywhere (no GPU, no CuPy needed)."""

import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import deformops as dops
from deformops import _arrays
from deformops.backends import cuda as dcuda
from deformops.backends.cuda import _runtime, _source, _switch
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


def test_deterministic_switch_is_seen_by_every_thread(monkeypatch):
    """Frameworks run backward passes on threads of their own (torch's autograd engine runs
    CUDA nodes on a per-device thread): the switch set around ``loss.backward()`` must be seen
    there [oracle: a thread started inside the block]."""
    monkeypatch.delenv("DEFORMOPS_DETERMINISTIC", raising=False)
    seen = []
    with dcuda.deterministic():
        t = threading.Thread(target=lambda: seen.append(dcuda.is_deterministic()))
        t.start()
        t.join()
    t = threading.Thread(target=lambda: seen.append(dcuda.is_deterministic()))
    t.start()
    t.join()
    assert seen == [True, False]


def test_framework_switches(monkeypatch):
    """A registered framework switch turns deterministic mode on while it returns True;
    deformops_torch registers ``torch.are_deterministic_algorithms_enabled``."""
    monkeypatch.delenv("DEFORMOPS_DETERMINISTIC", raising=False)
    monkeypatch.setattr(_switch, "_framework_switches", [])
    state = [False]
    dcuda.register_framework_switch(lambda: state[0])
    assert not dcuda.is_deterministic()
    state[0] = True
    assert dcuda.is_deterministic()
    with dcuda.deterministic(False):  # the framework asks for it: still on
        assert dcuda.is_deterministic()
    monkeypatch.undo()
    torch = pytest.importorskip("torch")
    import deformops_torch  # noqa: F401  (registers torch's switch)

    monkeypatch.delenv("DEFORMOPS_DETERMINISTIC", raising=False)
    assert not dcuda.is_deterministic()
    torch.use_deterministic_algorithms(True)
    try:
        assert dcuda.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)
    assert not dcuda.is_deterministic()


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
    assert _runtime.index_dtype(2**31 - 1 - 1024) == "int32"
    assert _runtime.index_dtype(2**31 - 1024) == "int64"
    monkeypatch.setattr(_source, "INDEX32_LIMIT", 10)
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


@pytest.mark.parametrize("with_torch", [False, True], ids=["no-torch", "torch-on-cpu"])
def test_gpu_benchmark_report_with_numpy_standing_in_for_cupy(monkeypatch, with_torch):
    """The GPU benchmark's control flow, checks and report, without a GPU: NumPy stands in for
    CuPy (the deformops calls then run on the CPU backend), scipy for cupyx, wall-clock events
    for CUDA events, and torch on the CPU (device arguments dropped) for torch on CUDA, or no
    torch. The benchmark's own checks (deformops vs torchvision, grid_sample, cupyx) must pass:
    this catches errors in the script before a GPU session."""
    import time as _time
    from types import SimpleNamespace

    pytest.importorskip("scipy")
    from scipy import ndimage

    from deformops.bench import gpu

    class Event:
        def record(self):
            self.t = _time.perf_counter()

        def synchronize(self):
            pass

    fake = types.ModuleType("cupy")
    for name in ("ones", "empty", "empty_like", "copyto", "matmul", "asarray", "ascontiguousarray",
                 "arange", "meshgrid", "broadcast_to", "stack"):
        setattr(fake, name, getattr(np, name))
    fake.__version__ = "numpy-standin"
    fake.is_available = lambda: True
    fake.asnumpy = np.asarray
    fake.random = SimpleNamespace(default_rng=np.random.default_rng)
    fake.get_default_memory_pool = lambda: SimpleNamespace(free_all_blocks=lambda: None)
    props = {"name": b"stand-in", "major": 9, "minor": 0, "multiProcessorCount": 1}
    fake.cuda = SimpleNamespace(
        Device=lambda *a: SimpleNamespace(id=0, synchronize=lambda: None), Event=Event,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        runtime=SimpleNamespace(getDeviceProperties=lambda i: props))
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.ndimage = ndimage
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", cupyx.scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.ndimage", ndimage)
    if with_torch:
        torch = pytest.importorskip("torch")
        pytest.importorskip("torchvision")  # imported with the real torch
        proxy = types.ModuleType("torch")
        proxy.__getattr__ = lambda name: getattr(torch, name)
        proxy.__version__ = torch.__version__
        proxy.as_tensor = lambda a, device=None, **kw: torch.as_tensor(a, **kw)
        proxy.arange = lambda *a, device=None, **kw: torch.arange(*a, **kw)
        proxy.cuda = SimpleNamespace(is_available=lambda: True, empty_cache=lambda: None)
        proxy.backends = SimpleNamespace(cudnn=SimpleNamespace(),
                                         cuda=SimpleNamespace(matmul=SimpleNamespace()))
        monkeypatch.setitem(sys.modules, "torch", proxy)
    else:
        monkeypatch.setitem(sys.modules, "torch", None)  # no torch peers
    monkeypatch.setattr(gpu, "PEAK_COPY_ELEMENTS", 1 << 12)
    monkeypatch.setattr(gpu, "PEAK_MATMUL_N", 32)
    monkeypatch.setattr(gpu, "QUICK_CONV_SHAPE", (2, 4, 4, 6, 5, True))
    monkeypatch.setattr(gpu, "QUICK_SAMPLE_SHAPE", (2, 3, 6, 5))
    args = SimpleNamespace(gpu_dtype=["float32"], repeat=2, quick=True, seed=0)
    report = gpu.run(args)
    text = report.render()
    assert report.ok, text
    ops = {(m.op, m.peer) for m in report.measurements}
    assert ("conv forward", "deformops") in ops and ("conv forward+backward", "deformops") in ops
    assert ("sample NCHW forward", "cupyx") in ops and ("sample NHWC backward", "deformops") in ops
    assert any(r.name.startswith("bandwidth / copy peak") for r in report.ratios)
    assert "GB/s" in text
    if with_torch:
        assert ("conv forward", "torchvision") in ops and ("conv forward", "cudnn conv2d") in ops
        assert ("sample NCHW backward", "grid_sample") in ops
        assert len(report.checks) == 5  # fwd, grad input, grad offset, cupyx, grid_sample
    else:
        assert "torch peers skipped" in text


class _OnGpu:
    """Stands in for a CuPy array on GPU ``i`` (deformops recognises CuPy by the module)."""

    __module__ = "cupy"

    def __init__(self, i):
        self.device = types.SimpleNamespace(id=i)


@pytest.mark.parametrize("where", ["coordinates", "output"])
def test_map_coordinates_refuses_arrays_on_two_gpus(where):
    """Arrays of one call on two GPUs raise ValueError naming the devices, before any launch
    (the kernel on the input's GPU would read or write the other GPU's memory), as sample and
    deform_conv2d do [oracle: contract §5]."""
    coords, output = (_OnGpu(1), None) if where == "coordinates" else (_OnGpu(0), _OnGpu(1))
    with pytest.raises(ValueError, match=rf"same GPU.*'{where}': 1"):
        dops.map_coordinates(_OnGpu(0), coords, output=output)


def test_map_coordinates_converts_a_plain_sequence_on_the_other_arrays_gpu(monkeypatch):
    """A list next to a CuPy array on GPU 1 (not the current device) becomes an array on GPU 1,
    not on the current device, where the one-GPU check would refuse it as if the list had been
    on another GPU [oracle: the device the stand-in CuPy's asarray ran under]."""
    current = [0]

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            self.prev, current[0] = current[0], self.id

        def __exit__(self, *exc):
            current[0] = self.prev

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=Device)
    fake.asarray = lambda a: _OnGpu(current[0])
    monkeypatch.setitem(sys.modules, "cupy", fake)
    seen = []
    monkeypatch.setattr(_arrays, "backend", lambda device: seen.append(device) or 1 / 0)
    for image, coords in (([[1.0, 2.0]], _OnGpu(1)), (_OnGpu(1), [[0.5], [0.5]])):
        with pytest.raises(ZeroDivisionError):  # past the checks, at the backend's lookup
            dops.map_coordinates(image, coords)
    assert seen == ["cuda", "cuda"]
