"""Gradients of sample / deform_sample.

Oracles: float64 central finite differences (coordinate / offset gradients, at points where every
mode's sampled value is bilinear), the transpose of scipy's sampling matrix and the adjoint identity
<A v, g> = <v, A^T g> (input gradient), one-sided finite differences and explicit right-hand
differences of the mode-extended image (the zero-offset convention), float64 results (float32).
"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deformops as dops
from _oracles import (LAYOUTS, MODES, ORDERS, extend, from_layout, grid_coords, make_coords,
                      mixed_coords, scipy_plane, scipy_sample, smooth_coords, to_layout)


def examples(divisor):
    return max(4, settings.default.max_examples // divisor)


OPS = ("sample", "deform_sample")


def forward(op, x, c, layout, **kw):
    fn = dops.sample if op == "sample" else dops.deform_sample
    return fn(x, c, layout=layout, **kw)


def backward(op, gout, x, c, layout, **kw):
    fn = dops.sample_backward if op == "sample" else dops.deform_sample_backward
    return fn(gout, x, c, layout=layout, **kw)


def coord_grad(res, op):
    """The coordinate-side entry of a backward result, by its documented field name."""
    return res.grad_coords if op == "sample" else res.grad_offset


def fd_coord_grad(fwd, x, c, gout, eps=1e-6):
    """Central finite differences of <fwd(x, c), gout> w.r.t. every entry of c (NCHW float64).

    Each output point depends only on its own coordinate pair, so all y (then all x) channels
    are perturbed at once and the differences are reduced over the channels of each group.
    """
    N, C = x.shape[:2]
    G = c.shape[1] // 2
    Ho, Wo = c.shape[2:]
    res = np.zeros_like(c)
    for axis in (0, 1):
        cp, cm = c.copy(), c.copy()
        cp[:, axis::2] += eps
        cm[:, axis::2] -= eps
        h = (cp - cm)[:, axis::2]
        d = (fwd(x, cp) - fwd(x, cm)) * gout
        res[:, axis::2] = d.reshape(N, G, C // G, Ho, Wo).sum(axis=2) / h
    return res


@st.composite
def grad_cases(draw, G, op, gen, small=True):
    """NCHW float64 (x, coords-or-offset, grad_out, cval) with coordinates from ``gen``."""
    N = draw(st.integers(1, 2))
    cpg = draw(st.integers(1, 2))
    H = draw(st.one_of(st.sampled_from([1, 2]), st.integers(1, 8)))
    W = draw(st.one_of(st.sampled_from([1, 2]), st.integers(1, 8)))
    Ho, Wo = (H, W) if op == "deform_sample" else (draw(st.integers(1, 4)),
                                                    draw(st.integers(1, 4)))
    cval = draw(st.one_of(st.just(0.0), st.floats(-1.0, 1.0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw = {}
    if gen is mixed_coords:
        kw["weights"] = draw(st.tuples(*[st.integers(0, 3)] * 4))
    c = make_coords(rng, N, G, Ho, Wo, H, W, gen, **kw)
    if op == "deform_sample":
        c = c - grid_coords(np.zeros_like(c))
    x = rng.uniform(-1, 1, (N, G * cpg, H, W))
    gout = rng.uniform(-1, 1, (N, G * cpg, Ho, Wo))
    return x, c, gout, cval


# ---------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=examples(4))
@given(data=st.data())
def test_coord_grad_matches_central_fd(op, mode, layout, G, data):
    """grad_coords / grad_offset == float64 central finite differences (eps 1e-6) at points
    k + f, f in [0.1, 0.9], k from -2n to 3n (every mode maps integers to integers, so the sampled
    value is bilinear around those points) [oracle: finite differences]."""
    x, c, gout, cval = data.draw(grad_cases(G, op, smooth_coords))
    kw = dict(order=1, mode=mode, cval=cval)

    def fwd(xx, cc):
        return from_layout(forward(op, to_layout(xx, layout), to_layout(cc, layout), layout, **kw),
                           layout)

    fd = fd_coord_grad(fwd, x, c, gout)
    res = backward(op, to_layout(gout, layout), to_layout(x, layout), to_layout(c, layout),
                   layout, **kw)
    gc = coord_grad(res, op)
    assert gc.dtype == np.float64 and gc.shape == to_layout(c, layout).shape
    np.testing.assert_allclose(from_layout(gc, layout), fd, rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------------------------- (b)


def _with_nonfinite(rng, c, share):
    c = c.copy()
    m = rng.uniform(size=c.shape) < share
    c[m] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], size=int(m.sum()))
    return c


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=examples(4))
@given(data=st.data(), G=st.sampled_from([1, 2, 3]), share=st.sampled_from([0.0, 0.1]))
def test_input_grad_is_adjoint(op, order, mode, layout, G, share, data):
    """<sample(v) - sample(0), g> == <v, grad_input(g)> for random v, g, float64, rtol 1e-12,
    with coordinates at borders, integers, far outside, and some NaN/Inf/1e30
    [oracle: adjoint identity]."""
    x, c, gout, cval = data.draw(grad_cases(G, op, mixed_coords))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    c = _with_nonfinite(rng, c, share)
    xl, cl, gl = (to_layout(a, layout) for a in (x, c, gout))
    kw = dict(order=order, mode=mode, cval=cval)
    lin = forward(op, xl, cl, layout, **kw) - forward(op, np.zeros_like(xl), cl, layout, **kw)
    gx = backward(op, gl, xl, cl, layout, needs_input_grad=(True, False), **kw).grad_input
    assert gx.shape == xl.shape and gx.dtype == np.float64
    lhs = np.vdot(lin, gl)
    rhs = np.vdot(xl, gx)
    scale = np.abs(lin).ravel() @ np.abs(gl).ravel() + np.abs(xl).ravel() @ np.abs(gx).ravel()
    assert abs(lhs - rhs) <= 1e-12 * scale + 1e-300, (lhs, rhs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_input_grad_is_transpose_of_scipy_matrix(order, mode, layout):
    """grad_input == A^T g where column j of A is scipy.ndimage.map_coordinates of the j-th
    basis image at the coordinates (the cval part removed) [oracle: scipy sampling matrix]."""
    rng = np.random.default_rng(7 + order)
    H, W, G, Ho, Wo = 3, 4, 2, 5, 3
    c = make_coords(rng, 1, G, Ho, Wo, H, W, mixed_coords, weights=(1, 1, 1, 1))
    x = rng.uniform(-1, 1, (1, G, H, W))
    gout = rng.uniform(-1, 1, (1, G, Ho, Wo))
    cval = 0.5
    expected = np.zeros((1, G, H, W))
    for g in range(G):
        base = scipy_plane(np.zeros((H, W)), c[0, 2 * g], c[0, 2 * g + 1], order, mode, cval)
        for j in range(H * W):
            e = np.zeros(H * W)
            e[j] = 1.0
            col = scipy_plane(e.reshape(H, W), c[0, 2 * g], c[0, 2 * g + 1], order, mode,
                              cval) - base
            expected[0, g].flat[j] = np.vdot(col, gout[0, g])
    res = dops.sample_backward(to_layout(gout, layout), to_layout(x, layout),
                               to_layout(c, layout), order=order, mode=mode, cval=cval,
                               layout=layout)
    np.testing.assert_allclose(from_layout(res.grad_input, layout), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- (c)

FULL_RIGHT_DIFF_MODES = ("grid-constant", "nearest", "reflect", "grid-mirror", "mirror",
                         "grid-wrap")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_offset_grad_is_right_hand_difference(mode, layout):
    """The original project's bug: at offset 0 the offset gradient was 0. It must be the
    right-hand difference of the mode-extended image [oracle: np.pad-extended differences and a
    one-sided float64 finite difference]. For 'constant' and 'wrap' the function jumps right of
    the last row/column, so only interior rows/columns are checked there."""
    rng = np.random.default_rng(1)
    N, C, G, H, W = 2, 4, 2, 5, 6
    x = rng.uniform(-1, 1, (N, C, H, W))
    gout = rng.uniform(-1, 1, (N, C, H, W))
    off = np.zeros((N, 2 * G, H, W))
    cval = 0.25
    res = dops.deform_sample_backward(to_layout(gout, layout), to_layout(x, layout),
                                      to_layout(off, layout), order=1, mode=mode, cval=cval,
                                      layout=layout)
    go = from_layout(res.grad_offset, layout)
    ey = extend(x, 2, mode, cval)
    ex = extend(x, 3, mode, cval)
    dy = ((ey[:, :, 1:] - x) * gout).reshape(N, G, C // G, H, W).sum(2)
    dx = ((ex[:, :, :, 1:] - x) * gout).reshape(N, G, C // G, H, W).sum(2)
    rows = slice(None) if mode in FULL_RIGHT_DIFF_MODES else slice(0, H - 1)
    cols = slice(None) if mode in FULL_RIGHT_DIFF_MODES else slice(0, W - 1)
    np.testing.assert_allclose(go[:, 0::2, rows], dy[:, :, rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(go[:, 1::2, :, cols], dx[:, :, :, cols], rtol=0, atol=1e-12)
    assert np.abs(go[:, :, : H - 1, : W - 1]).min() > 0  # the bug gave exactly zero

    # one-sided finite difference (eps 1e-7: every point stays inside its cell)
    eps = 1e-7
    base = (dops.deform_sample(x, off, order=1, mode=mode, cval=cval) * gout)
    for axis, d, sl in ((0, dy, (rows, slice(None))), (1, dx, (slice(None), cols))):
        p = off.copy()
        p[:, axis::2] += eps
        fd = ((dops.deform_sample(x, p, order=1, mode=mode, cval=cval) * gout - base)
              .reshape(N, G, C // G, H, W).sum(2) / eps)
        np.testing.assert_allclose(fd[(Ellipsis,) + sl], d[(Ellipsis,) + sl], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["grid-constant", "nearest", "constant"])
def test_grad_at_minus_one_and_last_index(mode):
    """At y = -1 and y = H-1 (x integer), the y-gradient is the right-hand derivative of the cell
    [y, y+1]: 'grid-constant' gives x[0] - cval and cval - x[H-1] (torchvision's convention, not
    the 0 of ceil-based corners); 'nearest' gives 0 and 0; 'constant' gives 0 at y = -1 (cval
    without interpolation) [oracle: hand values and a one-sided float64 finite difference]."""
    rng = np.random.default_rng(2)
    H, W = 4, 3
    x = rng.uniform(-1, 1, (1, 1, H, W))
    cval = 0.3
    c = np.zeros((1, 2, 2, W))
    c[0, 0, 0] = -1.0
    c[0, 0, 1] = H - 1.0
    c[0, 1] = np.arange(W)
    gout = np.ones((1, 1, 2, W))
    gc = dops.sample_backward(gout, x, c, order=1, mode=mode, cval=cval).grad_coords
    img = x[0, 0]
    expected = {
        "grid-constant": np.stack([img[0] - cval, cval - img[H - 1]]),
        "nearest": np.zeros((2, W)),
        "constant": np.zeros((2, W)),
    }[mode]
    rows = [0, 1] if mode != "constant" else [0]  # 'constant' jumps to cval right of H-1
    np.testing.assert_allclose(gc[0, 0][rows], expected[rows], rtol=0, atol=1e-12)
    eps = 1e-7
    cp = c.copy()
    cp[0, 0] += eps
    fd = (dops.sample(x, cp, mode=mode, cval=cval) - dops.sample(x, c, mode=mode, cval=cval))
    np.testing.assert_allclose(fd[0, 0][rows] / eps, expected[rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_grad_at_integers_outside_is_right_hand_derivative(mode, layout):
    """At every integer coordinate from -5n to 6n (the mirrored, wrapped and clamped stretches
    outside the image included, and several periods of every periodic mode, whose multiples
    are reduced exactly to 0), the coordinate gradient is the right-hand derivative, never
    the left-hand one (on a mirrored stretch the mode's coordinate runs backwards) [oracle:
    one-sided float64 finite differences of the forward at two step sizes; where they disagree
    the value jumps right of the point ('constant', 'wrap'), and the point is skipped]."""
    rng = np.random.default_rng(12)
    H, W = 4, 5
    x = rng.uniform(-1, 1, (1, 2, H, W))
    x[0, 1] = rng.permutation(H * W).reshape(H, W)  # steep, distinct steps
    ints = np.arange(-5 * max(H, W), 6 * max(H, W) + 1, dtype=np.float64)
    cy, cx = np.meshgrid(ints, ints, indexing="ij")
    # y integer with x inside a cell, and x integer with y inside a cell
    frac = rng.uniform(0.2, 0.8, cy.shape)
    c = np.stack([np.concatenate([cy, (cy + frac).clip(0.25, H - 1.25)]),
                  np.concatenate([(cx + frac).clip(0.25, W - 1.25), cx])])[None]
    cval = 0.3
    gout = np.ones((1, 2) + c.shape[2:])
    res = dops.sample_backward(to_layout(gout, layout), to_layout(x, layout),
                               to_layout(c, layout), mode=mode, cval=cval, layout=layout)
    got = from_layout(res.grad_coords, layout)[0]
    base = dops.sample(x, c, mode=mode, cval=cval).sum(1)[0]
    n = len(ints)
    for axis, rows in ((0, slice(0, n)), (1, slice(n, 2 * n))):
        fds = []
        for h in (2.0 ** -20, 2.0 ** -21):
            cp = c.copy()
            cp[0, axis] += h
            fds.append((dops.sample(x, cp, mode=mode, cval=cval).sum(1)[0] - base) / h)
        smooth = np.abs(fds[0] - fds[1]) < 1e-5
        assert smooth[rows].mean() > 0.7
        np.testing.assert_allclose(got[axis][rows][smooth[rows]], fds[0][rows][smooth[rows]],
                                   rtol=0, atol=1e-5, err_msg=f"axis {axis}")


# ---------------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_order0_coord_grad_is_zero(op, mode, layout):
    """order 0 is piecewise constant: coordinate/offset gradient exactly 0 [oracle: contract],
    and the input gradient is non-zero (the op is not a no-op)."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (2, 4, 5, 6))
    c = make_coords(rng, 2, 2, 5, 6, 5, 6, mixed_coords, weights=(2, 1, 1, 1))
    if op == "deform_sample":
        c = c - grid_coords(np.zeros_like(c))
    gout = rng.uniform(-1, 1, (2, 4, 5, 6))
    res = backward(op, to_layout(gout, layout), to_layout(x, layout), to_layout(c, layout),
                   layout, order=0, mode=mode, cval=0.5)
    gc = coord_grad(res, op)
    assert gc.shape == to_layout(c, layout).shape
    assert not np.any(gc)
    assert np.any(res.grad_input)


# ---------------------------------------------------------------------------------- (e)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_needs_input_grad(op, layout):
    """needs_input_grad=(False, True) gives grad_input None, (True, False) gives the coordinate
    gradient None, (False, False) both None; computed entries equal those of (True, True)
    [oracle: the full backward]."""
    rng = np.random.default_rng(5)
    x = to_layout(rng.uniform(-1, 1, (2, 4, 5, 6)), layout)
    c = make_coords(rng, 2, 2, 5, 6, 5, 6, smooth_coords, layout=layout)
    if op == "deform_sample":
        c = c - grid_coords(np.zeros_like(c), layout)
    gout = to_layout(rng.uniform(-1, 1, (2, 4, 5, 6)), layout)
    kw = dict(order=1, mode="reflect", cval=0.0)
    full = backward(op, gout, x, c, layout, **kw)
    assert len(full) == 2
    assert full.grad_input is not None and coord_grad(full, op) is not None
    only_c = backward(op, gout, x, c, layout, needs_input_grad=(False, True), **kw)
    only_x = backward(op, gout, x, c, layout, needs_input_grad=(True, False), **kw)
    neither = backward(op, gout, x, c, layout, needs_input_grad=(False, False), **kw)
    assert only_c.grad_input is None and only_c[0] is None
    assert coord_grad(only_x, op) is None and only_x[1] is None
    assert neither[0] is None and neither[1] is None
    np.testing.assert_array_equal(coord_grad(only_c, op), coord_grad(full, op))
    np.testing.assert_array_equal(only_x.grad_input, full.grad_input)
    # tuple order is (input, coords)
    assert full[0] is full.grad_input and full[1] is coord_grad(full, op)


# ---------------------------------------------------------------------------------- (f)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=examples(8))
@given(data=st.data(), G=st.sampled_from([1, 2]))
def test_float32_grads_close_to_float64(op, mode, layout, G, data):
    """float32 gradients == float64 gradients of the same (float32-representable) inputs within
    float32 accumulation error [oracle: the float64 computation]."""
    x, c, gout, cval = data.draw(grad_cases(G, op, mixed_coords))
    cval = float(np.float32(cval))
    x, c, gout = (a.astype(np.float32) for a in (x, c, gout))
    args32 = [to_layout(a, layout) for a in (gout, x, c)]
    args64 = [a.astype(np.float64) for a in args32]
    r32 = backward(op, *args32, layout, order=1, mode=mode, cval=cval)
    r64 = backward(op, *args64, layout, order=1, mode=mode, cval=cval)
    for a32, a64 in zip(r32, r64):
        assert a32.dtype == np.float32 and a64.dtype == np.float64
        np.testing.assert_allclose(a32, a64, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- (g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(op, dtype, layout):
    """Two backward calls, and calls with 1 thread vs all threads, give bit-identical arrays
    [oracle: the first call]. Sizes span several parallel chunks."""
    rng = np.random.default_rng(6)
    N, C, G, H, W = 2, 6, 3, 20, 24
    x = to_layout(rng.uniform(-1, 1, (N, C, H, W)), layout).astype(dtype)
    # many points sampling few pixels: the input-gradient scatter sums many terms per pixel
    c = make_coords(rng, N, G, H, W, 4, 5, mixed_coords, weights=(3, 1, 1, 1),
                    layout=layout).astype(dtype)
    if op == "deform_sample":
        c = (c - grid_coords(np.zeros_like(c, dtype=np.float64), layout)).astype(dtype)
    gout = to_layout(rng.uniform(-1, 1, (N, C, H, W)), layout).astype(dtype)
    kw = dict(order=1, mode="grid-constant", cval=0.1)
    a = backward(op, gout, x, c, layout, **kw)
    b = backward(op, gout, x, c, layout, **kw)
    f1 = forward(op, x, c, layout, **kw)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        s = backward(op, gout, x, c, layout, **kw)
        f2 = forward(op, x, c, layout, **kw)
    finally:
        numba.set_num_threads(threads)
    for u, v, w in zip(a, b, s):
        assert u.tobytes() == v.tobytes()
        assert u.tobytes() == w.tobytes()
    assert f1.tobytes() == f2.tobytes()


# ---------------------------------------------------------------------------------- (h)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_coords_zero_grad(op, mode, layout):
    """NaN/+-Inf coordinates: cval forward, zero coordinate gradient at those points, and no
    contribution to the input gradient; other points unaffected [oracle: the same call with those
    points' grad_out set to 0, and the contract]."""
    rng = np.random.default_rng(8)
    N, C, G, H, W = 2, 4, 2, 5, 6
    x = rng.uniform(-1, 1, (N, C, H, W))
    c = make_coords(rng, N, G, H, W, H, W, smooth_coords, lo=0, hi=1)
    bad = rng.uniform(size=(N, G, H, W)) < 0.3
    which = rng.integers(0, 3, size=(N, G, H, W))  # y bad, x bad, both bad
    vals = rng.choice([np.nan, np.inf, -np.inf], size=(N, 2 * G, H, W))
    c[:, 0::2] = np.where(bad & (which != 1), vals[:, 0::2], c[:, 0::2])
    c[:, 1::2] = np.where(bad & (which != 0), vals[:, 1::2], c[:, 1::2])
    if op == "deform_sample":
        c = c - grid_coords(np.zeros_like(c))
    gout = rng.uniform(-1, 1, (N, C, H, W))
    cval = -0.7
    xl, cl, gl = (to_layout(a, layout) for a in (x, c, gout))
    kw = dict(order=1, mode=mode, cval=cval)
    out = from_layout(forward(op, xl, cl, layout, **kw), layout)
    badc = np.repeat(bad, C // G, axis=1)
    np.testing.assert_array_equal(out[badc], cval)
    assert np.all(np.isfinite(out))
    res = backward(op, gl, xl, cl, layout, **kw)
    gc = from_layout(coord_grad(res, op), layout)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(res.grad_input))
    assert not np.any(gc[:, 0::2][bad]) and not np.any(gc[:, 1::2][bad])
    ref = backward(op, to_layout(np.where(badc, 0.0, gout), layout), xl, cl, layout, **kw)
    np.testing.assert_allclose(res.grad_input, ref.grad_input, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(gc[:, 0::2][~bad],
                                  from_layout(coord_grad(ref, op), layout)[:, 0::2][~bad])


# ------------------------------------------------------------------- many points, tiled work


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_points_span_chunks_and_tiles(layout):
    """N*G*points large enough for several parallel chunks per image and for the input-gradient
    work to be split into batches of images: forward == scipy, coordinate gradient == central
    FD, input gradient == per-image backward calls and satisfies the adjoint identity
    [oracles: scipy, finite differences, single-image calls, adjoint identity]."""
    rng = np.random.default_rng(9)
    N, C, G, H, W, Ho, Wo = 3, 4, 2, 6, 7, 200, 250
    x = rng.uniform(-1, 1, (N, C, H, W))
    c = make_coords(rng, N, G, Ho, Wo, H, W, smooth_coords, lo=-1, hi=2)
    gout = rng.uniform(-1, 1, (N, C, Ho, Wo))
    kw = dict(order=1, mode="mirror", cval=0.0)
    xl, cl, gl = (to_layout(a, layout) for a in (x, c, gout))

    def fwd(xx, cc):
        return from_layout(dops.sample(to_layout(xx, layout), to_layout(cc, layout),
                                       layout=layout, **kw), layout)

    out = fwd(x, c)
    np.testing.assert_allclose(out, scipy_sample(x, c, 1, "mirror", 0.0), rtol=0, atol=1e-12)
    res = dops.sample_backward(gl, xl, cl, layout=layout, **kw)
    np.testing.assert_allclose(from_layout(res.grad_coords, layout),
                               fd_coord_grad(fwd, x, c, gout), rtol=1e-7, atol=1e-8)
    for n in range(N):
        one = dops.sample_backward(gl[n:n + 1], xl[n:n + 1], cl[n:n + 1], layout=layout, **kw)
        np.testing.assert_allclose(res.grad_input[n:n + 1], one.grad_input, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(res.grad_coords[n:n + 1], one.grad_coords)
    lhs, rhs = np.vdot(out, gout), np.vdot(x, from_layout(res.grad_input, layout))
    assert abs(lhs - rhs) <= 1e-12 * (np.abs(out).ravel() @ np.abs(gout).ravel())
