"""Compile check of every CUDA kernel instantiation, without a GPU.

Every (scalar type x index type) module is compiled to PTX for sm_80 and sm_90 with NVRTC (the
pip wheels of the ``cuda-build`` extra, loaded through ctypes: no CuPy, no driver), from the
same ``(code, options, name_expressions)`` that the runtime hands to ``cupy.RawModule``
(``deformops.backends.cuda._source.module_source``). A kernel that does not compile fails here.

Without a compiler the test skips, except under CI (the ``CI`` environment variable set), where
it fails: CI must install ``.[cuda-build]``.

The 16 compilations (about 4 s of CPU each) run in parallel threads (NVRTC releases the GIL).
Successful results are cached on disk (``$DEFORMOPS_PTX_CACHE``, default
``~/.cache/deformops/ptx``) under a hash of everything that goes into them: code, options, name
expressions, architecture and NVRTC version; a changed kernel is always compiled again.
"""

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deformops.backends.cuda import _nvrtc, _runtime, _source

ARCHS = (80, 90)
COMBOS = [(d, i) for d in _source.SCALAR_TYPES for i in _source.INDEX_TYPES]


def _require_compiler():
    try:
        return _nvrtc.find_cuda()
    except _nvrtc.NVRTCNotFound as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no CUDA compiler is available: {err}; "
                        "install the cuda-build extra: pip install -e '.[cuda-build]'")
        pytest.skip(f"no CUDA compiler: {err}")


def _cache_path(code, options, names, arch):
    folder = os.environ.get("DEFORMOPS_PTX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "deformops", "ptx")
    key = json.dumps([code, list(options), list(names), arch, _nvrtc.version(),
                      _nvrtc.find_cuda()])
    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest() + ".json")


def _compile(dtype, index, arch):
    code, options, names = _source.module_source(dtype, index)
    t0 = time.perf_counter()
    path = _cache_path(code, options, names, arch)
    try:
        with open(path) as f:
            ptx, lowered, log = json.load(f)
        return (ptx, lowered, log, names), time.perf_counter() - t0
    except (OSError, ValueError):
        pass
    try:
        ptx, lowered, log = _nvrtc.compile_ptx(code, options, names, arch)
    except _nvrtc.CompileError as err:
        return err, time.perf_counter() - t0
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump([ptx, lowered, log], f)
        os.replace(tmp, path)
    except OSError:
        pass
    return (ptx, lowered, log, names), time.perf_counter() - t0


@pytest.fixture(scope="module")
def compiled():
    """Every (dtype, index, arch) compiled once, in parallel (NVRTC releases the GIL)."""
    _require_compiler()
    jobs = [(d, i, a) for d, i in COMBOS for a in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(jobs, pool.map(lambda j: _compile(*j), jobs)))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,index", COMBOS)
def test_every_instantiation_compiles_to_ptx(compiled, dtype, index, arch):
    result, seconds = compiled[(dtype, index, arch)]
    if isinstance(result, Exception):
        pytest.fail(f"{dtype}/{index}/sm_{arch} does not compile:\n{result}")
    ptx, lowered, log, names = result
    assert f".target sm_{arch}" in ptx
    assert set(lowered) == set(names)
    for expr, mangled in lowered.items():
        assert f".entry {mangled}(" in ptx, f"{expr} has no entry in the PTX"
    # warnings are errors too: a kernel that compiles with a warning cannot land
    assert "warning" not in log.lower(), log


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_coordinates_widen_without_flushing_subnormals(compiled, dtype):
    """CuPy compiles with -ftz=true (so does this file): a plain float -> double conversion
    would be ``cvt.ftz.f64.f32`` and flush a coordinate of -1e-40 to -0, inside the image where
    the CPU backend and scipy see it outside. Every widening must be the exact ``cvt.f64.f32``
    [oracle: the PTX]."""
    for index in _source.INDEX_TYPES:
        result, _ = compiled[(dtype, index, 90)]
        if isinstance(result, Exception):
            pytest.fail(str(result))
        ptx = result[0]
        assert "cvt.ftz.f64.f32" not in ptx
        assert "cvt.f64.f32" in ptx


def test_nvrtc_is_cuda_12_or_newer():
    _require_compiler()
    assert _nvrtc.version() >= (12, 0)


def test_every_kernel_in_the_source_is_instantiated():
    """A __global__ template added to a .cu file must be listed in _source.KERNELS."""
    defined = set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(",
                             _source.source().replace("\n", " ")))
    assert defined == set(_source.KERNELS)


def test_source_assembly_inlines_each_header_once():
    src = _source.source()
    assert '#include "' not in src
    assert src.count("struct AxisTaps {") == 1
    assert src.count("template <typename T> struct Acc") == 1
    assert src.startswith(_source.HEADER)


def test_name_expressions_cover_all_types():
    names = _source.name_expressions("float16", "int64")
    assert "sample_forward<__half, long long, true>" in names
    assert "dc_im2col<__half, long long>" in names
    assert _source.name_expression("dc_col2im", "bfloat16", "int32") == "dc_col2im<__nv_bfloat16, int>"


def test_index_type_selection():
    # 32-bit up to 2^31 - 1 less a block's headroom: the kernels' strided loops step past
    # their bound (e += blockDim.x), and a count just below 2^31 - 1 wrapped them around
    assert _source.index_dtype(0, 10, 2**31 - 1 - 1024) == "int32"
    assert _source.index_dtype(2**31 - 1 - 1023) == "int64"
    assert _source.index_dtype(2**31 - 1) == "int64"
    assert _source.index_dtype(2**31) == "int64"
    assert _source.index_dtype(5, limit=4) == "int64"
    assert _source.index_dtype() == "int32"


def test_runtime_hands_the_same_source_to_rawmodule(monkeypatch):
    """The runtime compiles exactly what this file compiles (same code, options, names)."""
    calls = []

    class FakeModule:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def get_function(self, expr):
            return expr

    class FakeDevice:
        id = 0

    class FakeCupy:
        RawModule = FakeModule

        class cuda:
            Device = FakeDevice

    monkeypatch.setattr(_runtime, "cupy", lambda: FakeCupy)
    monkeypatch.setattr(_runtime, "_modules", {})
    monkeypatch.setattr(_runtime, "_functions", {})
    fn = _runtime.kernel("sample_forward", "float32", "int64", "true")
    assert fn == "sample_forward<float, long long, true>"
    code, options, names = _source.module_source("float32", "int64")
    assert calls == [dict(code=code, options=options, name_expressions=names)]
    _runtime.kernel("dc_im2col", "float32", "int64")  # cached module: no second compile
    assert len(calls) == 1
