"""Edge cases of the sampling ops: non-finite and huge coordinates, empty arrays, strided and
read-only inputs, dtype preservation, and the documented errors.

Oracles: the contract (cval for non-finite coordinates, error types, shapes), scipy at the exactly
reduced coordinate (huge coordinates), and the same call on contiguous copies (strided inputs).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import deformops as dops
from _oracles import (DTYPES, LAYOUTS, MODES, ORDERS, from_layout, make_coords, mixed_coords,
                      scipy_sample, to_layout, tol)

REPO = Path(__file__).resolve().parents[1]


def shapes(N, C, G, H, W, Ho, Wo, layout):
    if layout == "NCHW":
        return (N, C, H, W), (N, 2 * G, Ho, Wo), (N, C, Ho, Wo)
    return (N, H, W, C), (N, Ho, Wo, 2 * G), (N, Ho, Wo, C)


# ------------------------------------------------------------------------- special coordinates

SPECIAL = (np.nan, np.inf, -np.inf, 1e30, -1e30)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_nonfinite_and_huge_coords(order, mode, layout, dtype):
    """NaN/+-Inf in y, x or both give cval in every mode; +-1e30 follows the mode: cval for the
    constant modes, the edge for 'nearest', scipy at the exactly reduced coordinate (np.fmod by
    the period) for the periodic/mirror modes; never a crash or non-finite output
    [oracle: contract + scipy at the reduced coordinate]."""
    rng = np.random.default_rng(0)
    H, W = 5, 7  # periods 4/6, 5/7, 10/14, 8/12: 1e30 is divisible by some, not others
    ys, xs = np.meshgrid(np.array(SPECIAL + (2.3,)), np.array(SPECIAL + (1.6,)), indexing="ij")
    coords = np.stack([ys, xs, xs, ys])[None]  # (1, 4, 6, 6): G = 2
    x = rng.uniform(-1, 1, (1, 4, H, W))
    cval = -0.375
    xl, cl = to_layout(x, layout).astype(dtype), to_layout(coords, layout).astype(dtype)
    out = dops.sample(xl, cl, order=order, mode=mode, cval=cval, layout=layout)
    assert out.dtype == dtype
    assert np.all(np.isfinite(out))
    ref = scipy_sample(xl, cl, order, mode, cval, layout)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype))
    # explicitly: any NaN/Inf gives cval
    o = from_layout(out, layout)
    nonfinite = ~(np.isfinite(ys) & np.isfinite(xs))
    assert np.all(o[0][:, nonfinite] == np.asarray(cval, dtype))


@pytest.mark.parametrize("mode", MODES)
def test_huge_coords_backward_finite(mode):
    """Huge finite and non-finite coordinates in the backward: finite gradients, no crash;
    non-finite points get zero coordinate gradient [oracle: contract]."""
    rng = np.random.default_rng(1)
    vals = np.array([1e30, -1e30, 3e38, -3e38, 1e300, np.nan, np.inf, -np.inf, 2.5])
    ys, xs = np.meshgrid(vals, vals, indexing="ij")
    c = np.stack([ys, xs])[None]
    x = rng.uniform(-1, 1, (1, 2, 4, 5))
    g = np.ones((1, 2) + ys.shape)
    res = dops.sample_backward(g, x, c, mode=mode, cval=0.5)
    assert np.all(np.isfinite(res.grad_input)) and np.all(np.isfinite(res.grad_coords))
    nonfinite = ~(np.isfinite(ys) & np.isfinite(xs))
    assert not np.any(res.grad_coords[0][:, nonfinite])
    r32 = dops.sample_backward(g.astype(np.float32), x.astype(np.float32),
                               np.clip(c, -3e38, 3e38).astype(np.float32), mode=mode, cval=0.5)
    assert np.all(np.isfinite(r32.grad_input)) and np.all(np.isfinite(r32.grad_coords))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["grid-constant", "nearest", "reflect"])
def test_nonfinite_grad_out_reaches_only_the_pixels_read(mode, order, layout):
    """An Inf or NaN grad_out at a point reaches only the pixels the point reads with a non-zero
    weight: not the taps of weight 0 beside an integer coordinate, nor pixel 0, where the taps
    of a point that reads nothing (outside, 'grid-constant') point (0 * Inf = NaN once landed
    there; the CUDA kernels skip such taps too). [oracle: the same call with those grad_out
    entries 0, bit for bit, at every pixel no such point reads, found as the support of the
    input gradient of their indicator (weights are >= 0)]"""
    rng = np.random.default_rng(11)
    N, C, G, H, W, Ho, Wo = 2, 4, 2, 5, 6, 6, 7
    c = rng.uniform(-2.0, 7.0, (N, 2 * G, Ho, Wo))
    c = np.where(rng.uniform(size=c.shape) < 0.4, np.round(c), c)  # integer: taps of weight 0
    c[:, :, 0] = -7.5  # points that read nothing in 'grid-constant'
    x = rng.uniform(-1, 1, (N, C, H, W))
    bad = rng.uniform(size=(N, C, Ho, Wo)) < 0.25
    gout = rng.uniform(-1, 1, bad.shape)
    bad_gout = np.where(bad, rng.choice([np.inf, -np.inf, np.nan], size=bad.shape), gout)
    ref_gout = np.where(bad, 0.0, gout)
    L = lambda a: to_layout(a, layout)  # noqa: E731
    grad = lambda g: from_layout(dops.sample_backward(  # noqa: E731
        L(g), L(x), L(c), order=order, mode=mode, layout=layout).grad_input, layout)
    reached = grad(bad.astype(float)) > 0
    unreached = ~reached
    got = grad(bad_gout)
    assert unreached.sum() > 10 and reached.sum() > 10
    np.testing.assert_array_equal(got[unreached], grad(ref_gout)[unreached])
    assert not np.isfinite(got[reached]).any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_order0_reads_non_finite_pixels_once(mode, layout):
    """Order 0 with +-Inf and NaN pixels: exactly scipy's value, +-Inf where the nearest pixel is
    infinite (its weight-0 taps, which point at that pixel, made 0 * Inf = NaN), and a
    coordinate gradient of exactly 0 (piecewise constant; the slope sums made NaN there)
    [oracle: scipy.ndimage.map_coordinates; the contract for the gradient]."""
    rng = np.random.default_rng(12)
    N, C, G, H, W, Ho, Wo = 2, 4, 2, 4, 5, 6, 7
    x = rng.uniform(-1, 1, (N, C, H, W))
    x[rng.uniform(size=x.shape) < 0.3] = np.inf
    x[rng.uniform(size=x.shape) < 0.15] = -np.inf
    x[rng.uniform(size=x.shape) < 0.1] = np.nan
    c = rng.uniform(-2.0, 7.0, (N, 2 * G, Ho, Wo))
    c = np.where(rng.uniform(size=c.shape) < 0.3, np.round(c), c)
    L = lambda a: to_layout(a, layout)  # noqa: E731
    for dtype in DTYPES:
        xd, cd = L(x.astype(dtype)), L(c.astype(dtype))
        got = from_layout(dops.sample(xd, cd, order=0, mode=mode, cval=0.5, layout=layout),
                          layout)
        want = from_layout(scipy_sample(xd, cd, 0, mode, 0.5, layout), layout)
        assert np.isinf(want).sum() > 5
        np.testing.assert_array_equal(got, want.astype(dtype))
        g = dops.sample_backward(L(np.ones((N, C, Ho, Wo), dtype)), xd, cd, order=0, mode=mode,
                                 cval=0.5, layout=layout)
        np.testing.assert_array_equal(g.grad_coords, np.zeros_like(cd))


# -------------------------------------------------------------------------------- empty arrays


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "dims", [(0, 2, 1, 3, 4, 2, 5), (2, 0, 1, 3, 4, 2, 5), (2, 0, 2, 3, 4, 2, 5),
             (2, 4, 2, 3, 4, 0, 5), (2, 4, 2, 3, 4, 2, 0), (0, 0, 1, 3, 4, 0, 0)],
    ids=["N=0", "C=0", "C=0,G=2", "Ho=0", "Wo=0", "all-empty"])
def test_empty_sample(dims, layout):
    """N=0, C=0, Ho=0 or Wo=0: empty outputs of the right shape and dtype, grad_input of x's
    shape (zeros), coordinate gradient of the coordinates' shape (zeros: a sum over no terms)
    [oracle: contract]."""
    N, C, G, H, W, Ho, Wo = dims
    xs, cs, os = shapes(N, C, G, H, W, Ho, Wo, layout)
    for dtype in DTYPES:
        x = np.ones(xs, dtype)
        c = np.full(cs, 0.5, dtype)
        out = dops.sample(x, c, layout=layout)
        assert out.shape == os and out.dtype == dtype
        res = dops.sample_backward(np.ones(os, dtype), x, c, layout=layout)
        assert res.grad_input.shape == xs and res.grad_input.dtype == dtype
        assert res.grad_coords.shape == cs and res.grad_coords.dtype == dtype
        assert not np.any(res.grad_input) and not np.any(res.grad_coords)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", [(0, 2, 1, 3, 4), (2, 0, 1, 3, 4), (2, 2, 1, 0, 4),
                                  (2, 2, 1, 3, 0)], ids=["N=0", "C=0", "H=0", "W=0"])
def test_empty_deform_sample(dims, layout):
    """deform_sample with N=0, C=0, H=0 or W=0: empty outputs shaped like x, empty gradients
    [oracle: contract]."""
    N, C, G, H, W = dims
    xs, cs, os = shapes(N, C, G, H, W, H, W, layout)
    x = np.ones(xs)
    off = np.full(cs, 0.25)
    out = dops.deform_sample(x, off, layout=layout)
    assert out.shape == xs and out.dtype == np.float64
    res = dops.deform_sample_backward(np.ones(os), x, off, layout=layout)
    assert res.grad_input.shape == xs and res.grad_offset.shape == cs
    assert not np.any(res.grad_input) and not np.any(res.grad_offset)


@pytest.mark.parametrize("mode", MODES)
def test_empty_image_does_not_crash(mode):
    """sample() from an image with H=0 or W=0 and a non-empty output: no crash or out-of-bounds
    read (run in a subprocess, so a segfault fails this test instead of killing pytest); either a
    ValueError naming x or an all-cval output [oracle: contract 'no input may crash']."""
    code = textwrap.dedent(f"""
        import re
        import numpy as np, deformops as dops
        for shape in [(1, 1, 0, 4), (1, 1, 4, 0), (1, 1, 0, 0)]:
            x = np.ones(shape)
            c = np.zeros((1, 2, 3, 3))
            c[0, 0] = [[-1.0, 0.0, 0.5], [1.0, 2.5, 1e30], [-7.0, np.nan, 3.0]]
            for order in (0, 1):
                try:
                    out = dops.sample(x, c, order=order, mode={mode!r}, cval=2.0)
                except ValueError as e:
                    assert re.search(r"\\bx\\b", str(e)), e
                    continue
                assert out.shape == (1, 1, 3, 3), out.shape
                assert np.all(out == 2.0), out
                res = dops.sample_backward(np.ones((1, 1, 3, 3)), x, c, order=order, mode={mode!r})
                assert res.grad_input.shape == shape
                assert not np.any(res.grad_coords)
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=REPO, env=_env())
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stdout, p.stderr)


def _env():
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------- strides, read-only, dtypes


def _case(rng, layout, dtype=np.float64, N=2, C=4, G=2, H=6, W=7, Ho=5, Wo=3):
    x = to_layout(rng.uniform(-1, 1, (N, C, H, W)), layout).astype(dtype)
    c = make_coords(rng, N, G, Ho, Wo, H, W, mixed_coords, weights=(2, 1, 1, 1),
                    layout=layout).astype(dtype)
    g = rng.uniform(-1, 1, shapes(N, C, G, H, W, Ho, Wo, layout)[2]).astype(dtype)
    return x, c, g


def _all_calls(x, c, g, off, gd, layout, **kw):
    """Every sampling entry point on the given arrays, as a flat list of result arrays."""
    r = [dops.sample(x, c, layout=layout, **kw)]
    r += list(dops.sample_backward(g, x, c, layout=layout, **kw))
    r += [dops.deform_sample(x, off, layout=layout, **kw)]
    r += list(dops.deform_sample_backward(gd, x, off, layout=layout, **kw))
    return r


def _strided(a):
    """A non-contiguous view with the values of ``a``: every other element of a bigger array
    along every axis, with a negative step along the last."""
    big = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)][..., ::-1]
    view[...] = a
    assert not view.flags.c_contiguous and np.array_equal(view, a)
    return view


def _fortran(a):
    f = np.asfortranarray(a)
    assert not f.flags.c_contiguous or a.ndim < 2
    return f


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["stepped", "fortran"])
def test_noncontiguous_inputs_equal_contiguous(kind, layout, dtype):
    """Strided views (slices with steps, negative steps, Fortran order) give the results of
    contiguous copies [oracle: the same calls on contiguous copies]."""
    rng = np.random.default_rng(2)
    x, c, g = _case(rng, layout, dtype)
    _, off, gd = _case(rng, layout, dtype, Ho=6, Wo=7)
    kw = dict(order=1, mode="reflect", cval=0.5)
    ref = _all_calls(x, c, g, off, gd, layout, **kw)
    make = _strided if kind == "stepped" else _fortran
    got = _all_calls(make(x), make(c), make(g), make(off), make(gd), layout, **kw)
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nhwc_memory_as_nchw_view(dtype):
    """NHWC memory passed as an NCHW view (x_nhwc.transpose(0, 3, 1, 2)), and the reverse, give
    the results of contiguous copies in the view's layout [oracle: contiguous copies]."""
    rng = np.random.default_rng(3)
    x, c, g = _case(rng, "NHWC", dtype)
    _, off, gd = _case(rng, "NHWC", dtype, Ho=6, Wo=7)
    views = [a.transpose(0, 3, 1, 2) for a in (x, c, g, off, gd)]
    kw = dict(order=1, mode="nearest", cval=0.0)
    got = _all_calls(*views, "NCHW", **kw)
    ref = _all_calls(*[np.ascontiguousarray(v) for v in views], "NCHW", **kw)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol(dtype))
    # NCHW memory as an NHWC view
    x2, c2, g2 = _case(rng, "NCHW", dtype)
    _, off2, gd2 = _case(rng, "NCHW", dtype, Ho=6, Wo=7)
    views = [a.transpose(0, 2, 3, 1) for a in (x2, c2, g2, off2, gd2)]
    got = _all_calls(*views, "NHWC", **kw)
    ref = _all_calls(*[np.ascontiguousarray(v) for v in views], "NHWC", **kw)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_readonly_inputs_accepted_and_never_modified(layout, dtype):
    """Read-only inputs work (same results as writable ones) and no call modifies any input,
    read-only or not [oracle: copies taken before the calls]."""
    rng = np.random.default_rng(4)
    x, c, g = _case(rng, layout, dtype)
    _, off, gd = _case(rng, layout, dtype, Ho=6, Wo=7)
    c[0, 0, 0, 0] = np.nan  # a non-finite point must not be "sanitised" in place either
    arrays = [x, c, g, off, gd]
    saved = [a.copy() for a in arrays]
    kw = dict(order=1, mode="mirror", cval=0.25)
    ref = _all_calls(*arrays, layout, **kw)
    for a, s in zip(arrays, saved):
        assert np.array_equal(a, s, equal_nan=True)
    ro = [a.copy() for a in arrays]
    for a in ro:
        a.setflags(write=False)
    got = _all_calls(*ro, layout, **kw)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == dtype
    for a, s in zip(ro, saved):
        assert np.array_equal(a, s, equal_nan=True)
    # map_coordinates too
    img = x[0, 0] if layout == "NCHW" else x[0, :, :, 0]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    crd = np.ascontiguousarray(np.stack([c.ravel()[:10], c.ravel()[10:20]]))
    crd.setflags(write=False)
    si, sc = img.copy(), crd.copy()
    dops.map_coordinates(img, crd, order=1, mode="mirror")
    assert np.array_equal(img, si) and np.array_equal(crd, sc, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", ORDERS)
def test_output_dtype_and_shapes(order, layout, dtype):
    """Outputs and gradients have the input dtype and the documented shapes, and are new
    writable arrays not sharing memory with the inputs [oracle: contract §3, §5]."""
    rng = np.random.default_rng(5)
    x, c, g = _case(rng, layout, dtype)
    _, off, gd = _case(rng, layout, dtype, Ho=6, Wo=7)
    out, gx, gc, dout, dgx, dgo = _all_calls(x, c, g, off, gd, layout, order=order)
    assert out.shape == g.shape and dout.shape == x.shape
    assert gx.shape == x.shape and dgx.shape == x.shape
    assert gc.shape == c.shape and dgo.shape == off.shape
    for a in (out, gx, gc, dout, dgx, dgo):
        assert type(a) is np.ndarray and a.dtype == dtype and a.flags.writeable
        for inp in (x, c, g, off, gd):
            assert not np.shares_memory(a, inp)


# ------------------------------------------------------------------------------------- errors


def _ok(layout="NCHW", dtype=np.float64):
    x, c, g = _case(np.random.default_rng(6), layout, dtype)
    return x, c, g


BAD_SAMPLE = {
    # name: (transform of (x, coords), keyword arguments, exception, regex the message matches)
    "x-ndim-3": (lambda x, c: (x[0], c), {}, ValueError, r"\bx\b"),
    "x-ndim-5": (lambda x, c: (x[..., None], c), {}, ValueError, r"\bx\b"),
    "coords-ndim-3": (lambda x, c: (x, c[0]), {}, ValueError, r"coords"),
    "coords-odd-channels": (lambda x, c: (x, c[:, :3]), {}, ValueError, r"coords"),
    "coords-zero-channels": (lambda x, c: (x, c[:, :0]), {}, ValueError, r"coords|\bG\b"),
    "C-not-divisible-by-G": (lambda x, c: (x[:, :3], c), {}, ValueError, r"\bx\b|coords|\bG\b"),
    "batch-mismatch": (lambda x, c: (x, c[:1]), {}, ValueError, r"\bx\b|coords"),
    "unknown-mode": (lambda x, c: (x, c), {"mode": "bilinear"}, ValueError, r"mode"),
    "mode-case": (lambda x, c: (x, c), {"mode": "Reflect"}, ValueError, r"mode"),
    "mode-none": (lambda x, c: (x, c), {"mode": None}, TypeError, r"mode"),
    "mode-int": (lambda x, c: (x, c), {"mode": 1}, TypeError, r"mode"),
    "cval-numeric-string": (lambda x, c: (x, c), {"cval": "1.5"}, TypeError, r"cval"),
    "cval-none": (lambda x, c: (x, c), {"cval": None}, TypeError, r"cval"),
    "cval-int-beyond-float": (lambda x, c: (x, c), {"cval": 10 ** 400}, ValueError, r"cval"),
    "bad-layout": (lambda x, c: (x, c), {"layout": "NCWH"}, ValueError, r"layout"),
    "bad-layout-type": (lambda x, c: (x, c), {"layout": 1}, (ValueError, TypeError), r"layout"),
    "order-3": (lambda x, c: (x, c), {"order": 3}, (NotImplementedError, ValueError), r"order"),
    "order-negative": (lambda x, c: (x, c), {"order": -1}, ValueError, r"order"),
    "order-float": (lambda x, c: (x, c), {"order": 1.5}, (TypeError, ValueError), r"order"),
    # 0-d arrays have __index__, and int() would truncate them: 0.7 ran as order 0
    "order-0d-float-array": (lambda x, c: (x, c), {"order": np.array(0.7)}, TypeError, r"order"),
    "order-0d-bool-array": (lambda x, c: (x, c), {"order": np.array(True)}, TypeError, r"order"),
    "order-1-element-array": (lambda x, c: (x, c), {"order": np.array([1])}, TypeError,
                              r"order"),
    "order-numpy-bool": (lambda x, c: (x, c), {"order": np.True_}, TypeError, r"order"),
    "x-int": (lambda x, c: (x.astype(np.int64), c), {}, TypeError, r"\bx\b"),
    "coords-int": (lambda x, c: (x, c.astype(np.int32)), {}, TypeError, r"coords"),
    "x-complex": (lambda x, c: (x.astype(np.complex128), c), {}, TypeError, r"\bx\b"),
    "x-big-endian": (lambda x, c: (x.astype(x.dtype.newbyteorder(">")), c), {}, TypeError,
                     r"\bx\b.*byte order"),
    "x-float16": (lambda x, c: (x.astype(np.float16), c.astype(np.float16)), {}, TypeError,
                  r"\bx\b|float16"),
    "mixed-dtypes": (lambda x, c: (x.astype(np.float32), c), {}, TypeError, r"\bx\b|coords"),
    "mixed-dtypes-2": (lambda x, c: (x, c.astype(np.float32)), {}, TypeError, r"\bx\b|coords"),
    "x-list": (lambda x, c: (x.tolist(), c), {}, TypeError, r"\bx\b"),
    "coords-list": (lambda x, c: (x, c.tolist()), {}, TypeError, r"coords"),
    "x-none": (lambda x, c: (None, c), {}, TypeError, r"\bx\b"),
    "x-object": (lambda x, c: (x.astype(object), c), {}, TypeError, r"\bx\b"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLE), ids=list(BAD_SAMPLE))
@pytest.mark.parametrize("fn", ["sample", "sample_backward"])
def test_sample_bad_input_raises(fn, case):
    """Every documented bad input raises the documented error type (ValueError for shapes and
    values, TypeError for dtypes and array types) with the argument named [oracle: contract §5]."""
    make, kw, exc, pattern = BAD_SAMPLE[case]
    x, c, g = _ok()
    x, c = make(x, c)
    if fn.endswith("backward") and exc is ValueError:
        pattern += "|grad_out"  # a shape mismatch may be reported against grad_out
    with pytest.raises(exc, match=pattern):
        if fn == "sample":
            dops.sample(x, c, **kw)
        else:
            dops.sample_backward(g, x, c, **kw)


def test_sample_bad_layout_shape_combinations():
    """NHWC arrays under layout='NCHW' (channels in the wrong place) raise ValueError naming an
    argument [oracle: contract]."""
    x, c, g = _ok("NHWC")  # x (2, 6, 7, 4), c (2, 5, 3, 4): coords has 5 'channels' as NCHW
    with pytest.raises(ValueError, match=r"\bx\b|coords"):
        dops.sample(x, c, layout="NCHW")


BAD_GRAD = {
    "grad_out-shape": (lambda g: g[:, :, :-1], ValueError),
    "grad_out-ndim": (lambda g: g[0], ValueError),
    "grad_out-dtype": (lambda g: g.astype(np.float32), TypeError),
    "grad_out-int": (lambda g: g.astype(np.int64), TypeError),
    "grad_out-list": (lambda g: g.tolist(), TypeError),
}


@pytest.mark.parametrize("case", list(BAD_GRAD), ids=list(BAD_GRAD))
@pytest.mark.parametrize("fn", ["sample_backward", "deform_sample_backward"])
def test_bad_grad_out_raises(fn, case):
    """A grad_out of the wrong shape, dtype or type raises the documented error naming
    grad_out [oracle: contract §5]."""
    make, exc = BAD_GRAD[case]
    rng = np.random.default_rng(7)
    x, c, g = _case(rng, "NCHW", Ho=6, Wo=7)
    with pytest.raises(exc, match="grad_out"):
        getattr(dops, fn)(make(g), x, c)


def test_needs_input_grad_bad_value():
    """needs_input_grad must be a pair of booleans: a wrong length raises ValueError or
    TypeError naming it [oracle: contract §5]."""
    x, c, g = _ok()
    with pytest.raises((ValueError, TypeError), match="needs_input_grad"):
        dops.sample_backward(g, x, c, needs_input_grad=(True,))
    with pytest.raises(TypeError, match="needs_input_grad"):  # not a string's truthiness
        dops.sample_backward(g, x, c, needs_input_grad="ab")


BAD_DEFORM = {
    "offset-spatial-mismatch": (lambda x, o: (x, o[:, :, :-1]), ValueError, r"offset"),
    "offset-odd-channels": (lambda x, o: (x, o[:, :3]), ValueError, r"offset"),
    "offset-ndim": (lambda x, o: (x, o[0]), ValueError, r"offset"),
    "C-not-divisible-by-G": (lambda x, o: (x[:, :3], o), ValueError, r"\bx\b|offset|\bG\b"),
    "batch-mismatch": (lambda x, o: (x[:1], o), ValueError, r"\bx\b|offset"),
    "offset-int": (lambda x, o: (x, o.astype(np.int64)), TypeError, r"offset"),
    "mixed-dtypes": (lambda x, o: (x, o.astype(np.float32)), TypeError, r"\bx\b|offset"),
    "offset-list": (lambda x, o: (x, o.tolist()), TypeError, r"offset"),
}


@pytest.mark.parametrize("case", list(BAD_DEFORM), ids=list(BAD_DEFORM))
@pytest.mark.parametrize("fn", ["deform_sample", "deform_sample_backward"])
def test_deform_sample_bad_input_raises(fn, case):
    """deform_sample bad inputs raise the documented error naming the argument
    [oracle: contract §3, §5]."""
    make, exc, pattern = BAD_DEFORM[case]
    rng = np.random.default_rng(8)
    x, off, g = _case(rng, "NCHW", Ho=6, Wo=7)
    x, off = make(x, off)
    if fn.endswith("backward") and exc is ValueError:
        pattern += "|grad_out"  # a shape mismatch may be reported against grad_out
    with pytest.raises(exc, match=pattern):
        if fn == "deform_sample":
            dops.deform_sample(x, off)
        else:
            dops.deform_sample_backward(g, x, off)
    with pytest.raises(ValueError, match="mode"):
        getattr(dops, fn)(*((g,) if fn.endswith("backward") else ()),
                          *_case(rng, "NCHW", Ho=6, Wo=7)[:2], mode="zeros")


BAD_MAPC = {
    "coordinates-first-axis-3": (lambda i, c: (i, np.zeros((3, 4))), {}, ValueError,
                                 r"coordinates"),
    "coordinates-1d": (lambda i, c: (i, np.zeros(4)), {}, ValueError, r"coordinates"),
    "unknown-mode": (lambda i, c: (i, c), {"mode": "zeros"}, ValueError, r"mode"),
    "input-complex": (lambda i, c: (i.astype(np.complex128), c), {}, TypeError, r"input"),
}


@pytest.mark.parametrize("case", list(BAD_MAPC), ids=list(BAD_MAPC))
def test_map_coordinates_bad_input_raises(case):
    """map_coordinates: invalid coordinates, modes and dtypes raise ValueError/TypeError naming
    the argument, where scipy raises a bare RuntimeError [oracle: contract §5]."""
    make, kw, exc, pattern = BAD_MAPC[case]
    img, crd = make(np.ones((4, 5)), np.zeros((2, 3)))
    with pytest.raises(exc, match=pattern):
        dops.map_coordinates(img, crd, **kw)


@pytest.mark.parametrize("ndim", [1, 3])
def test_map_coordinates_non_2d_input(ndim):
    """map_coordinates supports 2-D input only: other ranks raise (ValueError or
    NotImplementedError) naming ``input`` [oracle: contract §2]."""
    img = np.ones((4,) * ndim)
    with pytest.raises((ValueError, NotImplementedError), match="input"):
        dops.map_coordinates(img, np.zeros((ndim, 3)))


# --------------------------------------------------------------------------------- NaN pixels


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_nan_pixels_reach_only_the_samples_that_read_them(order, mode, layout, dtype):
    """NaN pixels, pixel 0 of every plane among them, spoil exactly the samples whose
    interpolation reads them, also with weight 0; points that read no pixel (far outside) stay
    cval [oracle: scipy.ndimage.map_coordinates per plane, NaN where scipy's is NaN]."""
    rng = np.random.default_rng(11)
    N, C, G, H, W = 2, 6, 2, 7, 9
    x = rng.uniform(-1, 1, (N, C, H, W))
    x[:, :, 0, 0] = np.nan  # pixel 0: the one that points reading no pixel are aimed at
    x[:, ::2, 3, 4] = np.nan
    x[:, 1::2, H - 1, W - 1] = np.nan
    c = make_coords(rng, N, G, 5, 6, H, W, mixed_coords, weights=(2, 1, 1, 1))
    c[:, :, 0, :3] = -5.0  # far outside: no corner inside
    c[:, :, 1, :2] = 0.0  # exactly on pixel 0
    x_l, c_l = to_layout(x, layout).astype(dtype), to_layout(c, layout).astype(dtype)
    got = dops.sample(x_l, c_l, order=order, mode=mode, cval=0.25, layout=layout)
    ref = scipy_sample(x_l, c_l, order, mode, 0.25, layout)
    assert np.any(np.isnan(ref)) and np.any(np.isfinite(ref))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=0, atol=tol(dtype))


def test_dlpack_objects_numpy_cannot_take_raise_type_errors():
    """DLPack exporters NumPy refuses (bfloat16, a tensor that requires grad, a storage-less
    meta tensor) raise a TypeError naming the argument, not the exporter's bare RuntimeError,
    BufferError or ValueError [oracle: contract §5]."""
    torch = pytest.importorskip("torch")
    off = np.zeros((1, 2, 3, 3))
    for x in (torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16),
              torch.zeros(1, 1, 3, 3, dtype=torch.float64, requires_grad=True),
              torch.zeros(1, 1, 3, 3, dtype=torch.float64, device="meta")):
        with pytest.raises(TypeError, match=r"^x "):
            dops.deform_sample(x, off)
    # a plain CPU tensor is taken as it is
    x = torch.arange(9.0, dtype=torch.float64).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(dops.deform_sample(x, off), x.numpy())
    # lazily negated views (z.conj().imag) with their sign, which DLPack alone drops
    z = torch.complex(torch.ones_like(x), x)
    for view in (z.conj().imag, torch._neg_view(x)):
        assert view.is_neg()
        np.testing.assert_array_equal(dops.deform_sample(view, off), -x.numpy())


def test_numpy_next_to_a_cuda_dlpack_object_is_a_mix():
    """A NumPy array next to a CUDA DLPack exporter is reported as a mix of device types (a
    TypeError naming both), whether or not CuPy is installed, before anything is converted
    [oracle: contract §5]."""

    class OnTheGPU:  # all the core may look at before converting
        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA, device 0

        def __dlpack__(self, **kwargs):
            raise AssertionError("converted before the device types were checked")

    with pytest.raises(TypeError, match=r"same device type.*\bx on cpu.*offset on cuda"):
        dops.deform_sample(np.zeros((1, 1, 3, 3)), OnTheGPU())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_points_that_read_no_pixel_get_zero_coordinate_gradient_beside_nan_pixels(layout):
    """Points that read no pixel (far outside, NaN coordinates) aim their taps at pixel 0 with
    weight 0: with a NaN pixel 0 their coordinate gradient must still be exactly 0, in both
    layouts, also when the input gradient is not asked for [oracle: contract §4, zero gradient
    where the output is cval without interpolation]."""
    x = np.ones((1, 2, 4, 5))
    x[0, :, 0, 0] = np.nan
    c = np.array([[10.0, np.nan, -5.0, 1.5], [10.0, 1.0, 2.0, 2.5]]).reshape(1, 2, 1, 4)
    g = np.ones((1, 2, 1, 4))
    for needs in ((False, True), (True, True)):
        res = dops.sample_backward(to_layout(g, layout), to_layout(x, layout),
                                   to_layout(c, layout), needs_input_grad=needs, layout=layout)
        gc = from_layout(res.grad_coords, layout)
        np.testing.assert_array_equal(gc[0, :, 0, :3], 0.0)
        assert np.isfinite(gc).all()


@pytest.mark.parametrize("op", ["sample", "deform_sample"])
def test_strided_nhwc_inputs_give_contiguous_nhwc_results(op):
    """A non-contiguous NHWC input goes to the NHWC kernels: output and both gradients are
    C-contiguous NHWC arrays with the values of the contiguous copy's [oracle: the contiguous
    run]."""
    rng = np.random.default_rng(31)
    x = rng.random((2, 6, 10, 4))[:, :, ::2]  # (2, 6, 5, 4), strided
    c = rng.uniform(-1, 6, (2, 6, 5, 2))
    assert not x.flags.c_contiguous
    fwd, bwd = getattr(dops, op), getattr(dops, f"{op}_backward")
    out = fwd(x, c, layout="NHWC")
    g = rng.random(out.shape)
    grads = bwd(g, x, c, layout="NHWC")
    xc = np.ascontiguousarray(x)
    np.testing.assert_array_equal(out, fwd(xc, c, layout="NHWC"))
    for a, b in zip(grads, bwd(g, xc, c, layout="NHWC")):
        np.testing.assert_array_equal(a, b)
    for a in (out, *grads):
        assert a.flags.c_contiguous
