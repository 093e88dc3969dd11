"""The CUDA kernels executed on the CPU: every ``.cu`` kernel compiled as host C++ (g++) under a
small emulation of the CUDA execution model, driven by the real CUDA backend's Python code.

Why: CI has no GPU, so without this the kernels would only be compiled, never run. The
emulation runs each block's threads as OS threads with a real barrier for ``__syncthreads``, a
per-warp exchange for ``__shfl_down_sync``, ``std::atomic_ref`` for ``atomicAdd`` and software
``__half`` / ``__nv_bfloat16`` conversions. The CUDA backend (``deformops.backends.cuda``) runs
unchanged on NumPy arrays (NumPy stands in for CuPy: same ``empty``, ``matmul``, ``argsort``,
``searchsorted``), with ``_runtime.kernel`` returning the emulated kernels. What it cannot show:
speed, memory coalescing, races that need more than a few hundred threads, NVRTC specifics
(the compile test covers those).

Oracle of every test: [CPU backend], the same public function through the Numba backend, with
the tolerances of the GPU tests (float64 1e-10, float32 1e-5 relative, float16 1e-2 relative).
Skipped when no C++20 compiler (g++) is found, except under CI.
"""

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import deformops as dops
from deformops import _arrays
from deformops.backends import cuda as dcuda
from deformops.backends.cuda import _runtime, _source

PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>
using std::isfinite;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
struct emu_dim3 { unsigned x, y, z; };
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
thread_local unsigned char* emu_smem;
thread_local std::barrier<>* emu_block_barrier;
thread_local std::barrier<>* emu_warp_barrier;
thread_local double* emu_warp_buf;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <typename T> T __shfl_down_sync(unsigned, T v, int off) {
    int lane = threadIdx.x & 31;
    emu_warp_buf[lane] = (double)v;
    emu_warp_barrier->arrive_and_wait();
    T r = (lane + off < 32) ? (T)emu_warp_buf[lane + off] : v;
    emu_warp_barrier->arrive_and_wait();
    return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { __half h; h.v = (_Float16)f; return h; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4); __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) { b.bits = (uint16_t)((u >> 16) | 0x40); return b; }
    u += 0x7fffu + ((u >> 16) & 1u); b.bits = (uint16_t)(u >> 16); return b;
}
"""

LAUNCHER = r"""
template <typename... A, size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<A*>(args[I])...);
}
template <typename... A>
void emu_launch(void (*k)(A...), int grid, int block, size_t smem, void** args) {
    blockDim = {(unsigned)block, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    struct Block {  // shared memory, block barrier, warp barriers and shuffle buffers
        std::vector<double> shared;
        std::unique_ptr<std::barrier<>> bar;
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        std::vector<double> wbuf;
    };
    std::vector<Block> blocks(grid);
    const int nw = (block + 31) / 32;
    for (auto& B : blocks) {
        B.shared.assign(smem / 8 + 2, 0.0);
        B.bar.reset(new std::barrier<>(block));
        for (int w = 0; w < nw; ++w) B.wb.emplace_back(new std::barrier<>(std::min(32, block - 32 * w)));
        B.wbuf.assign(32 * nw, 0.0);
    }
    std::vector<std::thread> ts;  // every thread of every block at once: blocks race as on a GPU
    for (int b = 0; b < grid; ++b)
        for (int t = 0; t < block; ++t)
            ts.emplace_back([&, b, t] {
                Block& B = blocks[b];
                threadIdx = {(unsigned)t, 0, 0};
                blockIdx = {(unsigned)b, 0, 0};
                emu_smem = reinterpret_cast<unsigned char*>(B.shared.data());
                emu_block_barrier = B.bar.get();
                emu_warp_barrier = B.wb[t / 32].get();
                emu_warp_buf = B.wbuf.data() + 32 * (t / 32);
                emu_call(k, args, std::index_sequence_for<A...>{});
            });
    for (auto& th : ts) th.join();
}
"""

# Instantiations compiled for the emulation (compile time grows with each).
COMBOS = (("float64", "int32"), ("float32", "int32"), ("float16", "int32"), ("float64", "int64"))
GRID, BLOCK = 3, 64  # emulated launch shape (any shape is valid: every kernel grid-strides)


def _compiler():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no C++ compiler (g++) is available for the emulated kernels")
        pytest.skip("no C++ compiler (g++)")
    return cxx


@functools.lru_cache(maxsize=None)
def _build(cxx):
    src = _source.source()
    src = src.replace(_source.HEADER, "")
    src = src.replace("extern __shared__ __align__(16) unsigned char smem[];",
                      "unsigned char* smem = emu_smem;")
    exprs = [e for d, i in COMBOS for e in _source.name_expressions(d, i)]
    wrappers = "".join(
        f'extern "C" void emu_run_{k}(int g, int b, size_t s, void** a) '
        f"{{ emu_launch(&{e}, g, b, s, a); }}\n" for k, e in enumerate(exprs))
    code = PRELUDE + src + LAUNCHER + wrappers
    digest = hashlib.sha1(code.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "deformops-cuda-emu")
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, f"emu-{digest}.so")
    if not os.path.exists(lib):
        # per-process names: test processes running at once (pytest-xdist) build side by side
        cpp = os.path.join(folder, f"emu-{digest}.{os.getpid()}.cpp")
        with open(cpp, "w") as f:
            f.write(code)
        tmp = lib + f".{os.getpid()}.tmp"
        res = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                              "-w", cpp, "-o", tmp], capture_output=True, text=True)
        os.remove(cpp)
        if res.returncode:
            pytest.fail(f"the kernels do not compile as host C++:\n{res.stderr[-6000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(lib), {e: k for k, e in enumerate(exprs)}


class _EmulatedKernel:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, grid, block, args, shared_mem=0):
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, "kernels take C-contiguous arrays"
                keep.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                keep.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.int64):
                keep.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.float64):
                keep.append(ctypes.c_double(float(a)))
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__}: pass NumPy scalars")
        ptrs = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(c), ctypes.c_void_p)
                                                for c in keep])
        self.fn(ctypes.c_int(min(int(grid[0]), GRID)), ctypes.c_int(BLOCK),
                ctypes.c_size_t(int(shared_mem)), ptrs)


@pytest.fixture(scope="module")
def emu_lib():
    return _build(_compiler())


@pytest.fixture
def emulate(emu_lib, monkeypatch):
    """A function that runs its argument with the CUDA backend on NumPy arrays, emulated."""
    lib, index = emu_lib
    check_dtypes = _arrays.check_dtypes

    def kernel(name, dtype, idx, *flags):
        expr = _source.name_expression(name, np.dtype(dtype).name, idx, *flags)
        if expr not in index:
            pytest.skip(f"{expr} is not built for the emulation")
        return _EmulatedKernel(getattr(lib, f"emu_run_{index[expr]}"))

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(_runtime, "cupy", lambda: np)
            m.setattr(_runtime, "kernel", kernel)
            m.setattr(_arrays, "backend", lambda device: dcuda)
            m.setattr(_arrays, "check_dtypes",
                      lambda arrays, allowed=None, device="cpu": check_dtypes(arrays, device="cuda"))
            return fn(*args, **kwargs)

    return run


TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2}


def check(got, ref, dtype):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    got, ref = np.nan_to_num(got), np.nan_to_num(ref)
    name = np.dtype(dtype).name
    if name == "float64":
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * max(1.0, np.abs(ref).max(initial=0)))
    else:
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= TOL[name], (name, err)


MODES = ("constant", "grid-constant", "nearest", "reflect", "mirror", "wrap", "grid-wrap")


def _sample_case(seed, N=2, C=6, G=2, H=7, W=8, Ho=5, Wo=6, relative=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    if relative:
        coords = rng.uniform(-3, 3, (N, 2 * G, H, W))
    else:
        coords = np.stack([rng.uniform(-12, H + 10, (N, G, Ho, Wo)),
                           rng.uniform(-12, W + 10, (N, G, Ho, Wo))], axis=2).reshape(N, 2 * G, Ho, Wo)
    coords[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    coords[:, :, 1, :4] = np.round(coords[:, :, 1, :4])
    if not relative:  # exact multiples of the periods, far left: reduced to 0 (or n-1 for wrap)
        coords[1, 0::2, 2, :4] = [-4 * H, -6 * H, -4 * (H - 1), -7 * (2 * H - 2)]
        coords[1, 1::2, 2, :4] = [-4 * W, -6 * W, -4 * (W - 1), -7 * (2 * W - 2)]
    return x, coords


def _nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relative", [False, True])
def test_sample_forward_and_backward(emulate, mode, order, layout, relative):
    """[CPU backend] forward, grad_input (atomic and deterministic), grad_coords; float64."""
    x, coords = _sample_case(1, relative=relative)
    lay = (lambda a: a) if layout == "NCHW" else _nhwc
    fwd = dops.deform_sample if relative else dops.sample
    bwd = dops.deform_sample_backward if relative else dops.sample_backward
    kw = dict(order=order, mode=mode, cval=0.5, layout=layout)
    xs, cs = np.ascontiguousarray(lay(x)), np.ascontiguousarray(lay(coords))
    ref = fwd(xs, cs, **kw)
    check(emulate(fwd, xs, cs, **kw), ref, np.float64)
    go = np.ascontiguousarray(np.random.default_rng(2).standard_normal(ref.shape))
    ref_g = bwd(go, xs, cs, **kw)
    for det in (False, True):
        with dcuda.deterministic(det):
            got_g = emulate(bwd, go, xs, cs, **kw)
        for g, r in zip(got_g, ref_g):
            check(g, r, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sample_float32_and_half(emulate, dtype, layout):
    """[CPU backend] float32 within 1e-5, float16 within 1e-2 (of float64 on rounded inputs)."""
    x, coords = _sample_case(3, C=8, relative=True)
    lay = (lambda a: a) if layout == "NCHW" else _nhwc
    xd, cd = lay(x).astype(dtype), lay(coords).astype(dtype)
    ref_dtype = np.float32 if dtype == "float32" else np.float64
    ref = dops.deform_sample(xd.astype(ref_dtype), cd.astype(ref_dtype), layout=layout)
    got = emulate(dops.deform_sample, np.ascontiguousarray(xd), np.ascontiguousarray(cd), layout=layout)
    assert got.dtype == np.dtype(dtype)
    check(got, ref, dtype)
    go = np.random.default_rng(4).standard_normal(ref.shape).astype(dtype)
    ref_g = dops.deform_sample_backward(go.astype(ref_dtype), xd.astype(ref_dtype),
                                        cd.astype(ref_dtype), layout=layout)
    got_g = emulate(dops.deform_sample_backward, go, np.ascontiguousarray(xd),
                    np.ascontiguousarray(cd), layout=layout)
    for g, r in zip(got_g, ref_g):
        assert g.dtype == np.dtype(dtype)
        check(g, r, dtype)


def test_many_groups_split_into_group_blocks(emulate, monkeypatch):
    """[CPU backend] tap tables larger than the shared budget: blocks of groups."""
    monkeypatch.setattr(_runtime, "SHARED_BYTES", 600)
    x, coords = _sample_case(5, C=12, G=6, relative=False)
    for layout in ("NCHW", "NHWC"):
        lay = (lambda a: a) if layout == "NCHW" else _nhwc
        xs, cs = np.ascontiguousarray(lay(x)), np.ascontiguousarray(lay(coords))
        ref = dops.sample(xs, cs, layout=layout)
        check(emulate(dops.sample, xs, cs, layout=layout), ref, np.float64)
        go = np.ascontiguousarray(np.ones(ref.shape))
        ref_g = dops.sample_backward(go, xs, cs, layout=layout)
        for g, r in zip(emulate(dops.sample_backward, go, xs, cs, layout=layout), ref_g):
            check(g, r, np.float64)


@pytest.mark.parametrize("mode", MODES)
def test_map_coordinates(emulate, mode):
    """[CPU backend] (which is scipy-identical) for every mode, order 0 and 1."""
    rng = np.random.default_rng(6)
    img = rng.standard_normal((5, 7))
    coords = rng.uniform(-15, 20, (2, 9, 11))
    coords[:, 0, :3] = [[np.nan, 1, np.inf], [2, -np.inf, 3]]
    for order in (0, 1):
        for cval in (2.0, -np.inf):  # an infinite cval: weight-0 corners add nothing
            ref = dops.map_coordinates(img, coords, order=order, mode=mode, cval=cval)
            check(emulate(dops.map_coordinates, img, coords, order=order, mode=mode,
                          cval=cval), ref, np.float64)


def test_int64_path(emulate, monkeypatch):
    """[CPU backend] the long long instantiations (forced by a zero threshold)."""
    monkeypatch.setattr(_source, "INDEX32_LIMIT", 0)
    x, coords = _sample_case(7, relative=True)
    check(emulate(dops.deform_sample, x, coords, mode="reflect"),
          dops.deform_sample(x, coords, mode="reflect"), np.float64)
    args = _conv_case(8)
    check(emulate(dops.deform_conv2d, *args[:4], mask=args[4], padding=1),
          dops.deform_conv2d(*args[:4], mask=args[4], padding=1), np.float64)


def _conv_case(seed, N=2, Cin=6, Cout=4, H=7, W=8, kh=3, kw=3, G=2, groups=1, mask=True,
               stride=1, padding=1, dilation=1):
    rng = np.random.default_rng(seed)
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    x = rng.standard_normal((N, Cin, H, W))
    offset = rng.uniform(-2.5, 2.5, (N, 2 * G * kh * kw, Ho, Wo))
    offset[:, :, 0, :3] = np.round(offset[:, :, 0, :3])
    offset[0, 0, 1, 1] = np.nan
    offset[1, 3, 2, 2] = -np.inf
    weight = rng.standard_normal((Cout, Cin // groups, kh, kw))
    bias = rng.standard_normal(Cout)
    m = rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo)) if mask else None
    return x, offset, weight, bias, m


CONV_CONFIGS = [
    dict(),
    dict(mask=False),
    dict(groups=2, G=3, Cin=6, Cout=4),
    dict(stride=2, padding=0, dilation=2, H=9, W=10),
    dict(kh=1, kw=3, padding=0, G=1),
    dict(N=2, H=20, W=17, Cin=3, Cout=2, G=1),
]


@pytest.mark.parametrize("cfg", range(len(CONV_CONFIGS)))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_deform_conv2d(emulate, monkeypatch, cfg, layout):
    """[CPU backend] forward and all five gradients, atomic and deterministic, small tiles."""
    from deformops.backends.cuda import deform_conv as cuda_conv

    monkeypatch.setattr(cuda_conv, "TILE_BYTES", 1 << 10)  # tiles of 256 columns
    c = dict(CONV_CONFIGS[cfg])
    kw = dict(stride=c.get("stride", 1), padding=c.get("padding", 1), dilation=c.get("dilation", 1))
    x, offset, weight, bias, mask = _conv_case(10 + cfg, **c)
    lay = (lambda a: a) if layout == "NCHW" else (lambda a: None if a is None else _nhwc(a))
    ref = dops.deform_conv2d(lay(x), lay(offset), weight, bias, mask=lay(mask), layout=layout, **kw)
    got = emulate(dops.deform_conv2d, lay(x), lay(offset), weight, bias, mask=lay(mask),
                  layout=layout, **kw)
    check(got, ref, np.float64)
    go = np.random.default_rng(11).standard_normal(ref.shape)
    ref_g = dops.deform_conv2d_backward(go, lay(x), lay(offset), weight, mask=lay(mask),
                                        layout=layout, **kw)
    for det in (False, True):
        with dcuda.deterministic(det):
            got_g = emulate(dops.deform_conv2d_backward, go, lay(x), lay(offset), weight,
                            mask=lay(mask), layout=layout, **kw)
        for name, g, r in zip(ref_g._fields, got_g, ref_g):
            assert (g is None) == (r is None), name
            if g is not None:
                check(g, r, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deform_conv2d_float32_and_half(emulate, dtype):
    """[CPU backend] float32 within 1e-5 of float32; float16 within 1e-2 of float64."""
    x, offset, weight, bias, mask = _conv_case(20, Cin=8, Cout=8)
    ref_dtype = np.float32 if dtype == "float32" else np.float64
    cast = lambda a, d=dtype: a.astype(d)  # noqa: E731
    r = lambda a: a.astype(dtype).astype(ref_dtype)  # noqa: E731
    ref = dops.deform_conv2d(r(x), r(offset), r(weight), r(bias), mask=r(mask), padding=1)
    got = emulate(dops.deform_conv2d, cast(x), cast(offset), cast(weight), cast(bias),
                  mask=cast(mask), padding=1)
    assert got.dtype == np.dtype(dtype)
    check(got, ref, dtype)
    go = np.random.default_rng(21).standard_normal(ref.shape)
    ref_g = dops.deform_conv2d_backward(r(go), r(x), r(offset), r(weight), mask=r(mask), padding=1)
    got_g = emulate(dops.deform_conv2d_backward, cast(go), cast(x), cast(offset), cast(weight),
                    mask=cast(mask), padding=1)
    for g, rr in zip(got_g, ref_g):
        assert g.dtype == np.dtype(dtype)
        check(g, rr, dtype)


@pytest.mark.parametrize("kind", ["large mean", "stripes along x", "stripes along y"])
def test_deform_conv2d_float32_offset_grad_on_large_and_steep_images(emulate, kind):
    """[CPU backend, float64 on the same float32 inputs] each offset gradient (d/dy and d/dx
    apart) of a sample whose cell is inside the image within 1e-4 of itself, where the image
    has a large mean or stripes of 0 and 255 across the derivative: float sums of the corners'
    values over the channels, differenced afterwards, lost it (relative errors of 1e-3 and
    more)."""
    rng = np.random.default_rng(22)
    N, C, H, W = 2, 16, 8, 9
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    base = {"large mean": np.full((H, W), 16384.0), "stripes along x": 255.0 * (xx % 2),
            "stripes along y": 255.0 * (yy % 2)}[kind]
    noise = 1.0 if kind == "large mean" else 1 / 64
    x = (base + noise * rng.uniform(-1, 1, (N, C, H, W))).astype(np.float32)
    offset = (rng.integers(-1, 2, (N, 18, H, W)) + rng.uniform(0.1, 0.9, (N, 18, H, W)))
    offset = offset.astype(np.float32)
    weight = rng.uniform(-1, 1, (C, C, 3, 3)).astype(np.float32)
    go = rng.uniform(-1, 1, (N, C, H, W)).astype(np.float32)
    needs = (False, True, False, False, False)
    got = emulate(dops.deform_conv2d_backward, go, x, offset, weight, padding=1,
                  needs_input_grad=needs).grad_offset
    ref = dops.deform_conv2d_backward(*(a.astype(np.float64) for a in (go, x, offset, weight)),
                                      padding=1, needs_input_grad=needs).grad_offset
    off = offset.reshape(N, 3, 3, 2, H, W).astype(np.float64)
    y = np.arange(3)[:, None, None, None] - 1 + np.arange(H)[:, None] + off[:, :, :, 0]
    xs = np.arange(3)[None, :, None, None] - 1 + np.arange(W) + off[:, :, :, 1]
    inside = ((y >= 0) & (y < H - 1) & (xs >= 0) & (xs < W - 1)).reshape(N, 9, H, W)
    assert inside.mean() > 0.3
    got, ref = got.reshape(N, 9, 2, H, W), ref.reshape(N, 9, 2, H, W)
    for axis in (0, 1):
        a, b = got[:, :, axis][inside], ref[:, :, axis][inside]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                   err_msg=f"d/d{'yx'[axis]}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_deform_conv2d_infinite_pixel_gives_infinite_offset_and_mask_grads(emulate):
    """[CPU backend] an infinite first corner: d/dy, d/dx -Inf and the mask gradient +Inf,
    not the NaN of Inf - Inf in the pixels' differences."""
    x = np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6)
    x[0, 0, 2, 2] = np.inf
    offset = np.zeros((1, 2, 6, 6), np.float32)
    offset[0, :, 2, 2] = 0.3, 0.4
    gout = np.zeros((1, 1, 6, 6), np.float32)
    gout[0, 0, 2, 2] = 1.0
    args = (gout, x, offset, np.ones((1, 1, 1, 1), np.float32))
    mask = np.ones((1, 1, 6, 6), np.float32)
    got = emulate(dops.deform_conv2d_backward, *args, mask=mask)
    ref = dops.deform_conv2d_backward(*args, mask=mask)
    assert got.grad_offset[0, 0, 2, 2] == got.grad_offset[0, 1, 2, 2] == -np.inf
    assert got.grad_mask[0, 0, 2, 2] == np.inf
    for a, b in ((got.grad_offset, ref.grad_offset), (got.grad_mask, ref.grad_mask)):
        np.testing.assert_array_equal(a[..., 3:, :], b[..., 3:, :])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_grad_out_and_masks_of_samples_that_read_nothing(emulate):
    """[CPU backend] Inf / NaN grad_out and NaN masks on samples that read nothing (far outside,
    or at torchvision's cutoff y = -1): the same NaN and Inf positions and the same values, in
    both modes, for sampling and deform_conv2d."""
    rng = np.random.default_rng(40)
    x, coords = _sample_case(41)
    coords[:, :, 0] = -7.5  # reads nothing in 'grid-constant'
    coords[:, :, 1] = np.round(coords[:, :, 1])  # taps of weight 0
    go = rng.standard_normal((2, 6, 5, 6))
    go[:, :, :2] = rng.choice([np.inf, -np.inf, np.nan], size=go[:, :, :2].shape)
    ref = dops.sample_backward(go, x, coords)
    for det in (False, True):
        with dcuda.deterministic(det):
            check(emulate(dops.sample_backward, go, x, coords).grad_input, ref.grad_input,
                  np.float64)
    x, offset, weight, bias, mask = _conv_case(42)
    offset[:, :, 3:5] = 50.0  # output rows 3 and 4: every sample far outside
    offset[:, 0:6:2, 0] = 0.0  # kernel row 0 at output row 0: y = -1 exactly
    mask[:, :, 3] = np.nan
    mask[:, 0:3, 0] = np.nan
    go = rng.standard_normal((2, 4, 7, 8))
    go[:, :, 4] = np.inf
    ref = dops.deform_conv2d_backward(go, x, offset, weight, mask=mask, padding=1)
    for det in (False, True):
        with dcuda.deterministic(det):
            got = emulate(dops.deform_conv2d_backward, go, x, offset, weight, mask=mask,
                          padding=1)
        for name in ("grad_input", "grad_offset", "grad_mask"):
            check(getattr(got, name), getattr(ref, name), np.float64)


def test_deterministic_mode_is_bit_identical(emulate):
    """[first run] deterministic input gradients twice: identical bits."""
    x, offset, weight, bias, mask = _conv_case(30, Cin=8, Cout=8)
    go = np.random.default_rng(31).standard_normal((2, 8, 7, 8)).astype(np.float32)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    with dcuda.deterministic():
        a = emulate(dops.deform_conv2d_backward, go, f(x), f(offset), f(weight), mask=f(mask), padding=1)
        b = emulate(dops.deform_conv2d_backward, go, f(x), f(offset), f(weight), mask=f(mask), padding=1)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_empty_batch(emulate):
    x = np.zeros((0, 3, 4, 4))
    off = np.zeros((0, 2, 4, 4))
    assert emulate(dops.deform_sample, x, off).shape == (0, 3, 4, 4)
    g = emulate(dops.deform_sample_backward, x, x, off)
    assert g.grad_input.shape == (0, 3, 4, 4) and g.grad_offset.shape == (0, 2, 4, 4)
    w = np.ones((2, 3, 3, 3))
    assert emulate(dops.deform_conv2d, x, np.zeros((0, 18, 4, 4)), w, padding=1).shape == (0, 2, 4, 4)


def test_emulator_prelude_matches_the_kernels():
    """Every CUDA builtin that the kernels use is emulated (a new one must be added here)."""
    src = _source.source()
    used = set(re.findall(r"\b(__\w+|atomic\w+)\s*\(", src))
    emulated = {"__half2float", "__float2half_rn", "__bfloat162float", "__float2bfloat16_rn",
                "__syncthreads", "__shfl_down_sync", "atomicAdd", "__launch_bounds__", "__align__"}
    assert used <= emulated, used - emulated
