"""Order-1 points inside the image, where the CPU kernels take a branch-free path, and the seam
where that path hands over to the general one (y or x = 0 and n - 1, and one ulp either side).

Oracle: the closed-form bilinear interpolant of the image, evaluated in float64 with NumPy. For
a point with 0 <= y <= n - 1 every mode samples the image itself, so value, coordinate gradient
(the derivative of the cell [floor(y), floor(y) + 1], right-hand at integers) and input gradient
are the same in every mode; points just outside are checked against scipy.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deformops as dops
from _oracles import DTYPES, LAYOUTS, MODES, from_layout, scipy_sample, to_layout, tol


def axis_coords(rng, shape, n, dtype):
    """Coordinates in [0, n - 1] along an axis of length n >= 2, half of them on the seam:
    0, the smallest positive number, 1 ulp above 0 in ``dtype``, integers, n - 1 - 1 ulp."""
    last = np.nextafter(dtype(n - 1), dtype(0))
    seam = np.array([0.0, 5e-324, np.nextafter(dtype(0), dtype(1)), last, n - 2, 1.0],
                    np.float64)
    uni = rng.uniform(0.0, n - 1.0, size=shape)
    pick = rng.choice(seam, size=shape)
    c = np.where(rng.uniform(size=shape) < 0.5, uni, pick).astype(dtype)
    return np.minimum(c, last)  # float32 rounding of a uniform draw may reach n - 1


def bilinear(img, y, x):
    """Value, d/dy and d/dx of the bilinear interpolant at 0 <= y < H-1, 0 <= x < W-1 (float64);
    each of y, x is floored to pick its cell (the right-hand derivative at integers)."""
    i = np.floor(y).astype(int)
    j = np.floor(x).astype(int)
    fy, fx = y - i, x - j
    v00, v01 = img[i, j], img[i, j + 1]
    v10, v11 = img[i + 1, j], img[i + 1, j + 1]
    value = (1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11)
    dy = (1 - fx) * (v10 - v00) + fx * (v11 - v01)
    dx = (1 - fy) * (v01 - v00) + fy * (v11 - v10)
    return value, dy, dx, (i, j, fy, fx)


def oracle(x, coords, gout):
    """Forward, input gradient and coordinate gradient of ``sample`` (NCHW float64) by
    :func:`bilinear`; every coordinate must lie in [0, n-1) along its axis."""
    N, C, H, W = x.shape
    G = coords.shape[1] // 2
    cpg = C // G
    out = np.zeros(x.shape[:2] + coords.shape[2:])
    gx = np.zeros_like(x)
    gc = np.zeros_like(coords)
    for n in range(N):
        for c in range(C):
            g = c // cpg
            y, xx = coords[n, 2 * g], coords[n, 2 * g + 1]
            v, dy, dx, (i, j, fy, fx) = bilinear(x[n, c], y, xx)
            out[n, c] = v
            go = gout[n, c]
            gc[n, 2 * g] += go * dy
            gc[n, 2 * g + 1] += go * dx
            for di, dj, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                              (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
                np.add.at(gx[n, c], (i + di, j + dj), w * go)
    return out, gx, gc


def bits(a):
    """The bytes of ``a`` (tells -0.0 from 0.0), whatever its strides."""
    return np.ascontiguousarray(a).view(np.uint8)


@st.composite
def interior_cases(draw, dtype):
    """NCHW float64 (x, coords, grad_out) with coordinates in [0, n-1) of an image >= 2 x 2;
    G from 1 to C (per-channel coordinates, as ConvOffset2D)."""
    N = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    cpg = draw(st.sampled_from([1, 1, 2, 5]))
    H, W = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    Ho, Wo = draw(st.integers(1, 6)), draw(st.integers(1, 17))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    coords = np.empty((N, 2 * G, Ho, Wo))
    coords[:, 0::2] = axis_coords(rng, (N, G, Ho, Wo), H, dtype)
    coords[:, 1::2] = axis_coords(rng, (N, G, Ho, Wo), W, dtype)
    x = rng.uniform(-1, 1, (N, G * cpg, H, W)).astype(dtype).astype(np.float64)
    gout = rng.uniform(-1, 1, (N, G * cpg, Ho, Wo)).astype(dtype).astype(np.float64)
    return x, coords, gout


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=20)
@given(data=st.data())
def test_interior_points_match_bilinear_oracle_in_every_mode(layout, dtype, data):
    """Inside the image: value and both gradients equal the closed-form bilinear interpolant's,
    and are bit-identical across the eight modes and any cval [oracle: NumPy bilinear]."""
    x, coords, gout = data.draw(interior_cases(dtype))
    ref_out, ref_gx, ref_gc = oracle(x, coords, gout)
    xl, cl, gl = (to_layout(a, layout).astype(dtype) for a in (x, coords, gout))
    cpg = x.shape[1] // (coords.shape[1] // 2)
    # float32: rounding of the weights and of sums over the cpg channels of a group
    atol = tol(dtype) if dtype == np.float64 else 2e-6 * cpg
    first = None
    for mode, cval in zip(MODES, (0.0, 0.5, -1.0, 0.25, 0.0, 2.0, -0.5, 1.0)):
        out = dops.sample(xl, cl, mode=mode, cval=cval, layout=layout)
        gx, gc = dops.sample_backward(gl, xl, cl, mode=mode, cval=cval, layout=layout)
        got = (out, gx, gc)
        if first is None:
            first = got
            np.testing.assert_allclose(from_layout(out, layout), ref_out, rtol=0, atol=atol)
            np.testing.assert_allclose(from_layout(gx, layout), ref_gx, rtol=0, atol=4 * atol)
            np.testing.assert_allclose(from_layout(gc, layout), ref_gc, rtol=0, atol=4 * atol)
        for a, b in zip(got, first):
            assert a.dtype == dtype
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("mode", MODES)
def test_seam_at_the_image_edge_matches_scipy(mode, dtype):
    """y and x at -1 ulp, 0, +1 ulp, n-1-ulp, n-1 and n-1+ulp, in every combination: the points
    on either side of the branch-free path's bounds match scipy, with per-channel coordinates
    [oracle: scipy.ndimage.map_coordinates]."""
    rng = np.random.default_rng(3)
    H, W = 4, 5

    def seam(n):
        e = [dtype(0), dtype(n - 1)]
        return np.array([v for c in e
                         for v in (np.nextafter(c, dtype(-9)), c, np.nextafter(c, dtype(9)))])

    ys, xs = np.meshgrid(seam(H), seam(W), indexing="ij")
    C = 3
    coords = np.empty((1, 2 * C, 6, 6), dtype)
    for g in range(C):  # a different permutation of the points for every channel
        perm = rng.permutation(36)
        coords[0, 2 * g] = ys.ravel()[perm].reshape(6, 6)
        coords[0, 2 * g + 1] = xs.ravel()[perm].reshape(6, 6)
    x = rng.uniform(-1, 1, (1, C, H, W)).astype(dtype)
    out = dops.sample(x, coords, mode=mode, cval=0.5)
    ref = scipy_sample(x, coords, 1, mode, 0.5)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype))
