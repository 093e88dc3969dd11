"""CUDA backend (CuPy) against the CPU backend, scipy, cupyx and torchvision. Needs a GPU.

Skipped cleanly when CuPy is missing or sees no GPU (``cupy.is_available()`` False), unless
``DEFORMOPS_REQUIRE_GPU`` is set (``scripts/gpu_check.sh`` sets it): then that is an error. Oracles,
each named by its test:

- [CPU backend]: the same public function on NumPy arrays (float64 unless said otherwise);
- [scipy]: ``scipy.ndimage.map_coordinates``; [cupyx]: ``cupyx.scipy.ndimage.map_coordinates``;
- [adjoint identity]: sampling is linear in x, so <sample(v), g> == <v, grad_input(g)>;
- [finite differences]: float64 central differences of sum(out * grad_out) on the GPU;
- [first run]: the op itself run before (deterministic mode must be bit-identical);
- [int32 path]: the same call with 32-bit indexing (the int64 path is forced by lowering the
  threshold of ``deformops.backends.cuda._source.INDEX32_LIMIT``);
- [torchvision]: ``torchvision.ops.deform_conv2d`` autograd on CUDA tensors (skipped if absent).

Tolerances: float64 within 1e-10, float32 within 1e-5 relative, float16 / bfloat16 within 1e-2
relative (norm of the difference over the norm of the float64 reference).
"""

import itertools
import os

import numpy as np
import pytest

try:
    import cupy
except ImportError:
    cupy = None
if cupy is None or not cupy.is_available():
    why = "CuPy is not installed" if cupy is None else "CuPy sees no GPU"
    if os.environ.get("DEFORMOPS_REQUIRE_GPU"):  # scripts/gpu_check.sh: a skip would hide it
        raise RuntimeError(f"DEFORMOPS_REQUIRE_GPU is set but {why}")
    pytest.skip(why, allow_module_level=True)

import deformops as dops  # noqa: E402
from deformops.backends import cuda as dcuda  # noqa: E402
from deformops.backends.cuda import _source  # noqa: E402

MODES = ("constant", "grid-constant", "nearest", "reflect", "mirror", "wrap", "grid-wrap")
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def bf16():
    """The bfloat16 dtype when CuPy can hold it (CuPy >= 14 with ml_dtypes), else None."""
    try:
        import ml_dtypes

        cupy.zeros(1, ml_dtypes.bfloat16)
        return np.dtype(ml_dtypes.bfloat16)
    except Exception:  # noqa: BLE001 - any failure means unsupported
        return None


def gpu_dtypes(include_bf16=True):
    out = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)]
    if include_bf16 and bf16() is not None:
        out.append(bf16())
    return out


def rel_err(got, ref):
    got = np.asarray(cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    got, ref = np.nan_to_num(got), np.nan_to_num(ref)
    return np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)


def check(got, ref, dtype, scale=None):
    """float64: max abs error <= 1e-10 * scale; others: relative norm error <= TOL."""
    name = np.dtype(dtype).name
    if name == "float64":
        g = cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got
        s = scale if scale is not None else max(1.0, float(np.nanmax(np.abs(ref))) if ref.size else 1.0)
        np.testing.assert_allclose(g, ref, rtol=0, atol=TOL[name] * s)
    else:
        assert rel_err(got, ref) <= TOL[name], (name, rel_err(got, ref))


def to_gpu(a, dtype=None):
    a = cupy.asarray(a)
    return a if dtype is None else a.astype(dtype)


def rounded(a, dtype):
    """The float64 values that a has after a round trip through dtype (the GPU's input)."""
    return cupy.asnumpy(cupy.asarray(a).astype(dtype).astype(np.float64))


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def det_mode(request):
    with dcuda.deterministic(request.param):
        yield request.param


@pytest.fixture(params=["int32", "int64"])
def index_path(request, monkeypatch):
    if request.param == "int64":
        monkeypatch.setattr(_source, "INDEX32_LIMIT", 0)
    return request.param


# ============================================================ map_coordinates


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_map_coordinates_vs_scipy_and_cupyx(mode, order, dtype):
    """[scipy] [cupyx] every mode, coordinates well outside the image, NaN and Inf."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    img = rng.standard_normal((7, 9)).astype(dtype)
    coords = rng.uniform(-20, 25, (2, 40, 30)).astype(dtype)
    coords[:, 0, :5] = np.arange(5)  # integer points
    coords[0, 1, 0], coords[1, 1, 1], coords[0, 1, 2] = np.nan, np.inf, -np.inf
    ref = ndimage.map_coordinates(img.astype(np.float64), coords.astype(np.float64), order=order,
                                  mode=mode, cval=1.5)
    got = dops.map_coordinates(to_gpu(img), to_gpu(coords), order=order, mode=mode, cval=1.5)
    assert isinstance(got, cupy.ndarray)
    finite = np.isfinite(coords).all(axis=0)
    check(cupy.asnumpy(got)[finite], ref[finite], dtype)
    assert np.all(cupy.asnumpy(got)[~finite] == np.asarray(1.5, dtype))
    if dtype == np.float64:
        # cupyx is a second opinion: scipy is the oracle (DESIGN §4), so cupyx is held to
        # agreement only for the modes where it reproduces scipy itself.
        from cupyx.scipy import ndimage as cnd

        cref = cupy.asnumpy(cnd.map_coordinates(to_gpu(img), to_gpu(coords), order=order,
                                                mode=mode, cval=1.5))[finite]
        if np.allclose(cref, ref[finite], rtol=0, atol=1e-10):
            np.testing.assert_allclose(cupy.asnumpy(got)[finite], cref, rtol=0, atol=1e-10)


def test_map_coordinates_output_argument():
    """[CPU backend] output= as a dtype and as an array, integer rounding as scipy."""
    rng = np.random.default_rng(1)
    img = rng.uniform(-50, 50, (6, 6))
    coords = rng.uniform(-1, 7, (2, 13))
    for output in (np.int16, np.uint8, np.float32):
        ref = dops.map_coordinates(img, coords, output=output)
        got = dops.map_coordinates(to_gpu(img), to_gpu(coords), output=output)
        np.testing.assert_array_equal(cupy.asnumpy(got), ref)
    out = cupy.empty(13, np.float64)
    assert dops.map_coordinates(to_gpu(img), to_gpu(coords), output=out) is out


# ============================================================ sample / deform_sample forward


def _sample_case(seed, N=2, C=6, G=2, H=9, W=11, Ho=5, Wo=7, relative=False, spread=3.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    if relative:
        coords = rng.uniform(-spread, spread, (N, 2 * G, H, W))
    else:
        coords = np.stack([rng.uniform(-3, H + 2, (N, G, Ho, Wo)),
                           rng.uniform(-3, W + 2, (N, G, Ho, Wo))], axis=2).reshape(N, 2 * G, Ho, Wo)
    coords[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    coords[:, :, 1, :4] = np.round(coords[:, :, 1, :4])  # integer points
    return x, coords


def _nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relative", [False, True])
def test_sample_forward_vs_cpu(mode, order, layout, relative, index_path):
    """[CPU backend] float64 and float32, both layouts, both index paths, G = 2."""
    x, coords = _sample_case(2, relative=relative)
    fn = dops.deform_sample if relative else dops.sample
    lay = (lambda a: a) if layout == "NCHW" else _nhwc
    for dtype in (np.float64, np.float32):
        ref = fn(lay(x.astype(dtype)), lay(coords.astype(dtype)), order=order, mode=mode, cval=0.5,
                 layout=layout)
        got = fn(to_gpu(lay(x), dtype), to_gpu(lay(coords), dtype), order=order, mode=mode,
                 cval=0.5, layout=layout)
        assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
        check(got, ref.astype(np.float64), dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sample_half_types_vs_float64(layout):
    """[CPU backend] float16 / bfloat16 within 1e-2 of float64 on the rounded inputs."""
    x, coords = _sample_case(3, C=8, relative=True)
    lay = (lambda a: a) if layout == "NCHW" else _nhwc
    for dtype in gpu_dtypes()[2:]:
        xr, cr = rounded(x, dtype), rounded(coords, dtype)
        ref = dops.deform_sample(lay(xr), lay(cr), layout=layout)
        got = dops.deform_sample(to_gpu(lay(x), dtype), to_gpu(lay(coords), dtype), layout=layout)
        assert got.dtype == dtype
        check(got, ref, dtype)


def test_sample_channels_last_view_and_strided():
    """[CPU backend] a channels-last view runs without error and gives the NCHW result."""
    x, coords = _sample_case(4, relative=True)
    ref = dops.deform_sample(x, coords)
    xg = to_gpu(_nhwc(x)).transpose(0, 3, 1, 2)  # NCHW-indexed, NHWC memory
    got = dops.deform_sample(xg, to_gpu(coords))
    check(got, ref, np.float64)
    got = dops.deform_sample(to_gpu(x)[:, ::1, :, :], to_gpu(coords)[:, :, :, :])
    check(got, ref, np.float64)


def test_many_groups_and_single_channel():
    """[CPU backend] G = C (tap tables split into group blocks), and C = 1 with many points."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 512, 4, 4))
    coords = rng.uniform(-1, 5, (1, 1024, 4, 4))
    check(dops.sample(to_gpu(x), to_gpu(coords)), dops.sample(x, coords), np.float64)
    x = rng.standard_normal((1, 1, 30, 30))
    coords = rng.uniform(-1, 31, (1, 2, 100, 100))
    check(dops.sample(to_gpu(x), to_gpu(coords)), dops.sample(x, coords), np.float64)


# ============================================================ sample backward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relative", [False, True])
def test_sample_backward_vs_cpu(mode, layout, relative, det_mode):
    """[CPU backend] grad_input (atomic and deterministic) and grad_coords, float64/float32."""
    x, coords = _sample_case(6, relative=relative)
    fn = dops.deform_sample_backward if relative else dops.sample_backward
    lay = (lambda a: a) if layout == "NCHW" else _nhwc
    rng = np.random.default_rng(7)
    go_shape = (2, 6) + coords.shape[2:]
    go = rng.standard_normal(go_shape)
    for dtype in (np.float64, np.float32):
        ref = fn(lay(go.astype(dtype)), lay(x.astype(dtype)), lay(coords.astype(dtype)), mode=mode,
                 cval=0.25, layout=layout)
        got = fn(to_gpu(lay(go), dtype), to_gpu(lay(x), dtype), to_gpu(lay(coords), dtype),
                 mode=mode, cval=0.25, layout=layout)
        for g, r in zip(got, ref):
            assert g.dtype == np.dtype(dtype)
            check(g, r.astype(np.float64), dtype)


def test_sample_backward_half_types(det_mode):
    """[CPU backend] float16 / bfloat16 gradients within 1e-2 of float64 on rounded inputs."""
    x, coords = _sample_case(8, C=8, relative=True, spread=2.0)
    go = np.random.default_rng(9).standard_normal(x.shape)
    for dtype in gpu_dtypes()[2:]:
        ref = dops.deform_sample_backward(rounded(go, dtype), rounded(x, dtype), rounded(coords, dtype))
        got = dops.deform_sample_backward(to_gpu(go, dtype), to_gpu(x, dtype), to_gpu(coords, dtype))
        for g, r in zip(got, ref):
            assert g.dtype == dtype
            check(g, r, dtype)


def test_sample_adjoint_identity(det_mode):
    """[adjoint identity] <sample(v), g> == <v, grad_input(g)> on the GPU, float64."""
    x, coords = _sample_case(10)
    v, c = to_gpu(x), to_gpu(coords)
    g = to_gpu(np.random.default_rng(11).standard_normal((2, 6, 5, 7)))
    lhs = float((dops.sample(v, c, mode="reflect") * g).sum())
    gx = dops.sample_backward(g, v, c, mode="reflect", needs_input_grad=(True, False)).grad_input
    rhs = float((v * gx).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("mode", ["grid-constant", "reflect", "wrap"])
def test_sample_coords_finite_differences(mode):
    """[finite differences] grad_coords on the GPU, float64, points away from cell borders."""
    rng = np.random.default_rng(12)
    x = to_gpu(rng.standard_normal((1, 3, 6, 6)))
    base = rng.integers(-2, 7, (1, 2, 4, 4)) + rng.uniform(0.2, 0.8, (1, 2, 4, 4))
    c = to_gpu(base)
    g = to_gpu(rng.standard_normal((1, 3, 4, 4)))
    grad = cupy.asnumpy(dops.sample_backward(g, x, c, mode=mode).grad_coords)
    h = 1e-6
    num = np.zeros_like(base)
    for idx in itertools.product(*map(range, base.shape)):
        for s in (1, -1):
            cc = base.copy()
            cc[idx] += s * h
            num[idx] += s * float((dops.sample(x, to_gpu(cc), mode=mode) * g).sum()) / (2 * h)
    np.testing.assert_allclose(grad, num, atol=1e-6)


def test_deterministic_mode_is_bit_identical():
    """[first run] deterministic grad_input twice: identical bits (sample and deform_conv2d)."""
    rng = np.random.default_rng(13)
    x = to_gpu(rng.standard_normal((4, 16, 12, 12)), np.float32)
    coords = to_gpu(rng.uniform(-2, 2, (4, 2, 12, 12)) * 0.3, np.float32)
    go = to_gpu(rng.standard_normal((4, 16, 12, 12)), np.float32)
    with dcuda.deterministic():
        a = dops.deform_sample_backward(go, x, coords).grad_input
        b = dops.deform_sample_backward(go, x, coords).grad_input
    assert cupy.array_equal(a, b)
    args = _conv_case(14, N=3, Cin=8, Cout=8, H=10, W=10, G=2, mask=True)
    args = [None if v is None else to_gpu(v, np.float32) for v in args]
    x, offset, weight, bias, mask = args
    go = to_gpu(rng.standard_normal((3, 8, 10, 10)), np.float32)
    with dcuda.deterministic():
        r1 = dops.deform_conv2d_backward(go, x, offset, weight, mask=mask, padding=1)
        r2 = dops.deform_conv2d_backward(go, x, offset, weight, mask=mask, padding=1)
    for u, v in zip(r1, r2):
        assert cupy.array_equal(u, v)


# ============================================================ deform_conv2d


def _conv_case(seed, N=2, Cin=6, Cout=4, H=8, W=9, kh=3, kw=3, G=2, groups=1, mask=True,
               stride=1, padding=1, dilation=1, spread=2.0):
    rng = np.random.default_rng(seed)
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    x = rng.standard_normal((N, Cin, H, W))
    offset = rng.uniform(-spread, spread, (N, 2 * G * kh * kw, Ho, Wo))
    offset[:, :, 0, :2] = np.round(offset[:, :, 0, :2])  # integer sample points
    weight = rng.standard_normal((Cout, Cin // groups, kh, kw))
    bias = rng.standard_normal(Cout)
    m = rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo)) if mask else None
    return x, offset, weight, bias, m


CONV_CONFIGS = [
    dict(),
    dict(mask=False),
    dict(groups=2, G=3, Cin=6, Cout=4),
    dict(stride=2, padding=0, dilation=2, H=11, W=12),
    dict(kh=1, kw=3, padding=0, G=1),
    dict(N=3, H=40, W=37, Cin=4, Cout=5, G=1),  # several tiles per image below
]


@pytest.mark.parametrize("cfg", range(len(CONV_CONFIGS)))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_deform_conv2d_vs_cpu(cfg, layout, det_mode, index_path, monkeypatch):
    """[CPU backend] forward and every gradient, float64 and float32, tiles of one image."""
    from deformops.backends.cuda import deform_conv as cuda_conv

    monkeypatch.setattr(cuda_conv, "TILE_BYTES", 1 << 12)  # many small tiles
    c = dict(CONV_CONFIGS[cfg])
    kw = dict(stride=c.get("stride", 1), padding=c.get("padding", 1), dilation=c.get("dilation", 1))
    x, offset, weight, bias, mask = _conv_case(15 + cfg, **c)
    lay = (lambda a: a) if layout == "NCHW" else (lambda a: None if a is None else _nhwc(a))
    rng = np.random.default_rng(16)
    for dtype in (np.float64, np.float32):
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        gpu = lambda a: None if a is None else to_gpu(a, dtype)  # noqa: E731
        ref = dops.deform_conv2d(lay(cast(x)), lay(cast(offset)), cast(weight), cast(bias),
                                 mask=lay(cast(mask)), layout=layout, **kw)
        got = dops.deform_conv2d(gpu(lay(x)), gpu(lay(offset)), gpu(weight), gpu(bias),
                                 mask=gpu(lay(mask)), layout=layout, **kw)
        check(got, ref.astype(np.float64), dtype)
        go = rng.standard_normal(ref.shape)
        ref_g = dops.deform_conv2d_backward(cast(go), lay(cast(x)), lay(cast(offset)), cast(weight),
                                            mask=lay(cast(mask)), layout=layout, **kw)
        got_g = dops.deform_conv2d_backward(gpu(go), gpu(lay(x)), gpu(lay(offset)), gpu(weight),
                                            mask=gpu(lay(mask)), layout=layout, **kw)
        for name, g, r in zip(ref_g._fields, got_g, ref_g):
            assert (g is None) == (r is None), name
            if g is not None:
                assert g.dtype == np.dtype(dtype) and g.shape == r.shape, name
                check(g, r.astype(np.float64), dtype, scale=max(1.0, float(np.abs(r).max())))


def test_deform_conv2d_half_types(det_mode):
    """[CPU backend] float16 / bfloat16 forward and gradients within 1e-2 of float64."""
    x, offset, weight, bias, mask = _conv_case(17, Cin=8, Cout=8)
    go = np.random.default_rng(18).standard_normal((2, 8, 8, 9))
    for dtype in gpu_dtypes()[2:]:
        r = lambda a: None if a is None else rounded(a, dtype)  # noqa: E731
        gpu = lambda a: None if a is None else to_gpu(a, dtype)  # noqa: E731
        ref = dops.deform_conv2d(r(x), r(offset), r(weight), r(bias), mask=r(mask), padding=1)
        got = dops.deform_conv2d(gpu(x), gpu(offset), gpu(weight), gpu(bias), mask=gpu(mask), padding=1)
        assert got.dtype == dtype
        check(got, ref, dtype)
        ref_g = dops.deform_conv2d_backward(r(go), r(x), r(offset), r(weight), mask=r(mask), padding=1)
        got_g = dops.deform_conv2d_backward(gpu(go), gpu(x), gpu(offset), gpu(weight), mask=gpu(mask),
                                            padding=1)
        for g, rr in zip(got_g, ref_g):
            assert g.dtype == dtype
            check(g, rr, dtype)


def test_deform_conv2d_vs_torchvision_cuda():
    """[torchvision] forward and every gradient on CUDA tensors, float64 and float32."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    x, offset, weight, bias, mask = _conv_case(19, N=2, Cin=8, Cout=6, H=12, W=10, G=2)
    go = np.random.default_rng(20).standard_normal((2, 6, 12, 10))
    for dtype, tdtype in ((np.float64, torch.float64), (np.float32, torch.float32)):
        t = [torch.tensor(a, dtype=tdtype, device="cuda", requires_grad=True)
             for a in (x, offset, weight, bias, mask)]
        out = tv.ops.deform_conv2d(t[0], t[1], t[2], t[3], padding=1, mask=t[4])
        out.backward(torch.tensor(go, dtype=tdtype, device="cuda"))
        gpu = lambda a: to_gpu(a, dtype)  # noqa: E731
        got = dops.deform_conv2d(gpu(x), gpu(offset), gpu(weight), gpu(bias), mask=gpu(mask), padding=1)
        check(got, out.detach().cpu().numpy().astype(np.float64), dtype)
        grads = dops.deform_conv2d_backward(gpu(go), gpu(x), gpu(offset), gpu(weight),
                                            mask=gpu(mask), padding=1)
        for g, ref in zip((grads.grad_input, grads.grad_offset, grads.grad_weight,
                           grads.grad_mask, grads.grad_bias), (t[0], t[1], t[2], t[4], t[3])):
            r = ref.grad.detach().cpu().numpy().astype(np.float64)
            check(g, r, dtype, scale=max(1.0, float(np.abs(r).max())))


def test_torch_func_per_sample_gradients_cuda():
    """[CPU backend] deformops_torch under torch.func (vmap of grad: per-sample gradients, the
    vmap batching rules and the transformed Functions) on CUDA tensors, float64: the same
    gradients as on CPU tensors."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    import deformops_torch as dt

    arrays = _conv_case(23, N=3, Cin=4, Cout=5, H=7, W=6)

    def per_sample(device):
        x, offset, weight, bias, mask = (torch.tensor(a, device=device) for a in arrays)

        def loss(w_, b_, xi, oi, mi):
            out = dt.deform_conv2d(xi[None], oi[None], w_, b_, padding=1, mask=mi[None])
            return (out ** 2).sum()

        grads = torch.func.grad(loss, argnums=(0, 1, 2, 3, 4))
        return torch.func.vmap(grads, in_dims=(None, None, 0, 0, 0))(weight, bias, x, offset,
                                                                      mask)

    for got, ref in zip(per_sample("cuda"), per_sample("cpu")):
        check(got.cpu().numpy(), ref.numpy(), np.float64)


def test_torch_dlpack_input():
    """[CPU backend] CUDA torch tensors go through __dlpack__ to the CUDA backend."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    x, coords = _sample_case(21, relative=True)
    got = dops.deform_sample(torch.tensor(x, device="cuda"), torch.tensor(coords, device="cuda"))
    assert isinstance(got, cupy.ndarray)
    check(got, dops.deform_sample(x, coords), np.float64)


# ============================================================ robustness


def test_nonfinite_offsets_give_zero_and_zero_gradient(det_mode):
    """[CPU backend] NaN/Inf offsets: 0 and zero gradients in deform_conv2d, cval in sample."""
    x, offset, weight, bias, mask = _conv_case(22)
    offset[0, :, 2, 3] = np.nan
    offset[1, :4, 1, 1] = np.inf
    ref = dops.deform_conv2d(x, offset, weight, bias, mask=mask, padding=1)
    got = dops.deform_conv2d(*[to_gpu(a) for a in (x, offset, weight, bias)], mask=to_gpu(mask),
                             padding=1)
    check(got, ref, np.float64)
    go = np.ones(ref.shape)
    ref_g = dops.deform_conv2d_backward(go, x, offset, weight, mask=mask, padding=1)
    got_g = dops.deform_conv2d_backward(*[to_gpu(a) for a in (go, x, offset, weight)],
                                        mask=to_gpu(mask), padding=1)
    for g, r in zip(got_g, ref_g):
        assert np.isfinite(cupy.asnumpy(g)).all()
        check(g, r, np.float64, scale=max(1.0, float(np.abs(r).max())))
    assert float(abs(got_g.grad_offset[0, :, 2, 3]).max()) == 0.0


def test_empty_batch():
    """N = 0: empty outputs and gradients of the right shapes."""
    x = cupy.zeros((0, 4, 5, 5))
    off = cupy.zeros((0, 2, 5, 5))
    assert dops.deform_sample(x, off).shape == (0, 4, 5, 5)
    gx, go_ = dops.deform_sample_backward(x, x, off)
    assert gx.shape == (0, 4, 5, 5) and go_.shape == (0, 2, 5, 5)
    w = cupy.ones((3, 4, 3, 3))
    offset = cupy.zeros((0, 18, 5, 5))
    assert dops.deform_conv2d(x, offset, w, padding=1).shape == (0, 3, 5, 5)
    g = dops.deform_conv2d_backward(cupy.zeros((0, 3, 5, 5)), x, offset, w, padding=1)
    assert g.grad_input.shape == (0, 4, 5, 5) and float(abs(g.grad_weight).sum()) == 0.0


def test_runs_on_the_current_stream():
    """[CPU backend] results are right when computed on a non-default stream."""
    x, coords = _sample_case(23, relative=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = dops.deform_sample(to_gpu(x), to_gpu(coords))
    stream.synchronize()
    check(got, dops.deform_sample(x, coords), np.float64)


def test_mixed_devices_raise_type_error():
    x, coords = _sample_case(24)
    with pytest.raises(TypeError, match="same device type"):
        dops.sample(to_gpu(x), coords)


def test_cpu_only_dtype_rules_still_apply_on_cpu():
    with pytest.raises(TypeError, match="float32, float64"):
        dops.sample(np.zeros((1, 1, 2, 2), np.float16), np.zeros((1, 2, 2, 2), np.float16))
    got = dops.sample(cupy.zeros((1, 1, 2, 2), np.float16), cupy.zeros((1, 2, 2, 2), np.float16))
    assert got.dtype == np.float16


def test_int64_indexing_matches_int32(monkeypatch):
    """[int32 path] the 64-bit kernels give bit-identical results on the same inputs."""
    x, offset, weight, bias, mask = [to_gpu(a) for a in _conv_case(25)]
    a = dops.deform_conv2d(x, offset, weight, bias, mask=mask, padding=1)
    monkeypatch.setattr(_source, "INDEX32_LIMIT", 0)
    b = dops.deform_conv2d(x, offset, weight, bias, mask=mask, padding=1)
    assert cupy.array_equal(a, b)
