"""Forward sampling against the oracle ``scipy.ndimage.map_coordinates``.

float64 results must agree within 1e-12 (values and cval in [-1, 1]); float32 results within
float32 rounding (2e-6) of scipy's float64 result on the same float32 inputs cast to float64.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

import deformops as dops
from _oracles import (DTYPES, LAYOUTS, MODES, ORDERS, grid_coords, make_coords, mixed_coords,
                      scipy_deform_sample, scipy_plane, scipy_sample, special_coords, to_layout,
                      tol)


def examples(divisor):
    """A share of the profile's example budget, for tests parametrized over many cases."""
    return max(4, settings.default.max_examples // divisor)


sizes = st.one_of(st.sampled_from([1, 2]), st.integers(1, 12))
cvals = st.one_of(st.just(0.0), st.sampled_from([1.0, -0.5]), st.floats(-1.0, 1.0, width=32))
coord_mix = st.tuples(*[st.integers(0, 3)] * 4)


@st.composite
def sampling_cases(draw, G, layout, dtype, relative=False):
    """(x, coords-or-offset, cval) in ``layout`` and ``dtype``: random image values in [-1, 1],
    coordinates from a drawn mix of far-outside uniform, integer, half-integer and border values."""
    N = draw(st.integers(1, 3))
    cpg = draw(st.integers(1, 2))
    H, W = draw(sizes), draw(sizes)
    if relative:
        Ho, Wo = H, W
    else:
        Ho, Wo = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    cval = draw(cvals)
    weights = draw(coord_mix)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(-1.0, 1.0, (N, G * cpg, H, W))
    coords = make_coords(rng, N, G, Ho, Wo, H, W, mixed_coords, weights=weights)
    if relative:
        coords = coords - grid_coords(np.zeros_like(coords))
    return to_layout(x, layout).astype(dtype), to_layout(coords, layout).astype(dtype), cval


@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
@settings(max_examples=examples(4))
@given(data=st.data())
def test_sample_matches_scipy(order, mode, layout, dtype, G, data):
    """dops.sample == scipy.ndimage.map_coordinates per (image, channel) [oracle: scipy]."""
    x, coords, cval = data.draw(sampling_cases(G, layout, dtype))
    out = dops.sample(x, coords, order=order, mode=mode, cval=cval, layout=layout)
    ref = scipy_sample(x, coords, order, mode, cval, layout)
    assert isinstance(out, np.ndarray)
    assert out.dtype == dtype
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
@settings(max_examples=examples(2))
@given(data=st.data(), G=st.sampled_from([1, 2, 3]))
def test_deform_sample_matches_scipy(order, mode, layout, dtype, G, data):
    """dops.deform_sample == scipy.ndimage.map_coordinates at grid + offset [oracle: scipy]."""
    x, offset, cval = data.draw(sampling_cases(G, layout, dtype, relative=True))
    out = dops.deform_sample(x, offset, order=order, mode=mode, cval=cval, layout=layout)
    ref = scipy_deform_sample(x, offset, order, mode, cval, layout)
    assert out.dtype == dtype
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype))


TINY_SHAPES = [(1, 1), (1, 2), (2, 1), (1, 5), (5, 1), (2, 2), (3, 4)]


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=[f"{h}x{w}" for h, w in TINY_SHAPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_tiny_images_all_border_points_match_scipy(order, mode, shape):
    """1x1, 1xW, Hx1 and 2x2 images at every pair of border, half-way, integer and far points,
    both layouts and dtypes, two groups [oracle: scipy]."""
    H, W = shape
    rng = np.random.default_rng(H * 100 + W)

    def axis_points(n):
        far = np.array([-3 * n - 0.25, -2 * n, -n - 0.5, 2 * n + 0.5, 3 * n, 4 * n - 0.75])
        return np.concatenate([special_coords(n), np.arange(-n, 2 * n + 1) * 0.5, far])

    py, px = np.meshgrid(axis_points(H), axis_points(W), indexing="ij")
    coords = np.stack([py, px, px[::-1, ::-1], py[::-1, ::-1]])[None]  # N=1, G=2
    x = rng.uniform(-1, 1, (1, 4, H, W))
    for layout in LAYOUTS:
        for dtype in DTYPES:
            for cval in (0.0, 0.75):
                xl = to_layout(x, layout).astype(dtype)
                cl = to_layout(coords, layout).astype(dtype)
                out = dops.sample(xl, cl, order=order, mode=mode, cval=cval, layout=layout)
                ref = scipy_sample(xl, cl, order, mode, cval, layout)
                np.testing.assert_allclose(out, ref, rtol=0, atol=tol(dtype),
                                           err_msg=f"{layout} {np.dtype(dtype)} cval={cval}")


def test_scipy_quirks_are_matched():
    """Hand-computed values of scipy's surprising behaviours, and dops equal to them
    [oracle: scipy and hand values]: 'constant' cuts off hard outside [0, n-1], 'wrap' has
    period n-1, order 0 rounds half up."""
    img = np.array([[1.0, 2.0, 4.0]])
    ys = np.zeros(6)

    def both(xs, **kw):
        ref = ndi.map_coordinates(img, np.stack([ys[: len(xs)], xs]), prefilter=False, **kw)
        got = dops.map_coordinates(img, np.stack([ys[: len(xs)], xs]), **kw)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        return ref

    # 'constant': no interpolation towards cval beyond the end points
    np.testing.assert_array_equal(both(np.array([-0.25, 2.25, 2.0, 0.0]), order=1,
                                       mode="constant", cval=9.0), [9.0, 9.0, 4.0, 1.0])
    # 'grid-constant' does interpolate towards cval
    np.testing.assert_allclose(both(np.array([-0.25, 2.25]), order=1, mode="grid-constant",
                                    cval=9.0), [0.25 * 9 + 0.75 * 1, 0.75 * 4 + 0.25 * 9])
    # 'wrap': period n - 1 = 2, the end points overlap; 'grid-wrap': period n = 3
    np.testing.assert_allclose(both(np.array([2.5, 3.0, -0.5]), order=1, mode="wrap"),
                               [1.5, 2.0, 3.0])
    np.testing.assert_allclose(both(np.array([2.5, 3.0, -0.5]), order=1, mode="grid-wrap"),
                               [2.5, 1.0, 2.5])
    # order 0 rounds half up
    np.testing.assert_array_equal(both(np.array([0.5, 1.5, -0.5, 0.49]), order=0,
                                       mode="nearest"), [2.0, 4.0, 1.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cval", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("mode", ["grid-constant", "constant"])
@pytest.mark.parametrize("order", ORDERS)
@settings(max_examples=examples(2))
@given(H=sizes, W=sizes, seed=st.integers(0, 2**32 - 1))
def test_non_finite_cval_matches_scipy(order, mode, cval, dtype, H, W, seed):
    """cval = +-inf or NaN in the constant modes, at points in and far outside the image, each
    with one integer coordinate [oracle: scipy, NaN where scipy gives NaN]. Points beyond the
    2-pixel clamp of 'grid-constant' were moved to exactly -2 (or n + 1): a corner of weight 0
    that added 0 * inf = NaN where scipy, which weighs the real fraction, gives inf; and order 0
    added its weight-0 corners' 0 * inf where scipy reads one pixel."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (H, W)).astype(dtype)
    coords = np.stack([rng.uniform(-6, H + 5, 200), rng.uniform(-6, W + 5, 200)])
    coords[0, ::2] = np.round(coords[0, ::2])  # an integer y or x, rarely both (see README)
    coords[1, 1::2] = np.round(coords[1, 1::2])
    coords = coords.astype(dtype)
    ref = ndi.map_coordinates(img.astype(np.float64), coords.astype(np.float64), order=order,
                              mode=mode, cval=cval, prefilter=False)
    got = dops.map_coordinates(img, coords, order=order, mode=mode, cval=cval)
    np.testing.assert_allclose(got, ref, rtol=tol(dtype), atol=tol(dtype))


# --------------------------------------------------------------------------------------------
# dops.map_coordinates: the scipy drop-in (2-D input), compared with scipy called directly


# scipy needs at least one extra dim (coordinates of shape (2,) raise in scipy)
extra_shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ORDERS)
@settings(max_examples=examples(2))
@given(H=sizes, W=sizes, extra=extra_shapes, cval=cvals, weights=coord_mix,
       seed=st.integers(0, 2**32 - 1))
def test_map_coordinates_matches_scipy(order, mode, dtype, H, W, extra, cval, weights, seed):
    """dops.map_coordinates == scipy.ndimage.map_coordinates, coordinates (2, ...) with any
    number of extra dims [oracle: scipy]."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (H, W)).astype(dtype)
    coords = np.stack([mixed_coords(rng, extra, H, weights),
                       mixed_coords(rng, extra, W, weights)]).astype(dtype)
    ref = ndi.map_coordinates(img.astype(np.float64), coords.astype(np.float64), order=order,
                              mode=mode, cval=cval)
    got = dops.map_coordinates(img, coords, order=order, mode=mode, cval=cval)
    assert isinstance(got, np.ndarray)
    assert got.dtype == dtype  # scipy: output dtype = input dtype
    assert got.shape == extra
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol(dtype))


@pytest.mark.parametrize("order", ORDERS)
def test_map_coordinates_output_argument(order):
    """``output=`` as an array (filled and returned) and as a dtype, as scipy [oracle: scipy]."""
    rng = np.random.default_rng(3)
    img = rng.uniform(-1, 1, (6, 7))
    coords = np.stack([rng.uniform(-2, 8, (3, 4)), rng.uniform(-2, 9, (3, 4))])
    ref = ndi.map_coordinates(img, coords, order=order, mode="nearest")

    out = np.full((3, 4), np.nan)
    res = dops.map_coordinates(img, coords, output=out, order=order, mode="nearest")
    sout = np.empty((3, 4))
    assert ndi.map_coordinates(img, coords, output=sout, order=order, mode="nearest") is sout
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert res is out  # scipy returns the output array it filled

    for dt in (np.float64, np.float32):
        got = dops.map_coordinates(img, coords, output=dt, order=order, mode="nearest")
        sref = ndi.map_coordinates(img, coords, output=dt, order=order, mode="nearest")
        assert got.dtype == sref.dtype == dt
        np.testing.assert_allclose(got, sref, rtol=0, atol=tol(dt))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["constant", "grid-constant", "nearest", "mirror"])
def test_map_coordinates_integer_input(dtype, order, mode):
    """Integer images: scipy returns the input's integer dtype, rounding half away from zero;
    the drop-in must return exactly the same array [oracle: scipy]."""
    rng = np.random.default_rng(5)
    lo = 0 if np.dtype(dtype).kind == "u" else -100
    img = rng.integers(lo, 100, (5, 6)).astype(dtype)
    # half-integer coordinates make many exact .5 ties
    coords = np.stack([rng.integers(-4, 12, 40) * 0.5, rng.integers(-4, 14, 40) * 0.5])
    ref = ndi.map_coordinates(img, coords, order=order, mode=mode, cval=3.0)
    got = dops.map_coordinates(img, coords, order=order, mode=mode, cval=3.0)
    assert got.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", [bool, np.int8, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64])
def test_map_coordinates_bool_and_integer_outputs_clip_as_scipy(dtype):
    """Bool outputs are True from |v| >= 1 (truncated, then != 0); integer outputs round half
    away from zero and clip, also beyond int64's range, where a float cast of the maximum
    overflows [oracle: scipy; left out where scipy's C casts overflow: uint64 above 2**64, bool
    beyond 2**31]."""
    vals = [-1e19, -9.3e18, -3e9, -70000.0, -300.0, -2.0, -1.5, -1.0, -0.5, -1e-16, 0.0, 0.5,
            1.0, 1.5, 2.5, 300.0, 70000.0, 3e9, 5e18, 9.3e18, 1e19]
    if dtype is bool:
        vals = [v for v in vals if abs(v) < 2 ** 31]
    img = np.array([vals])
    coords = np.stack([np.zeros(len(vals)), np.arange(len(vals), dtype=np.float64)])
    ref = ndi.map_coordinates(img, coords, order=1, output=dtype)
    got = dops.map_coordinates(img, coords, order=1, output=dtype)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)
    if dtype is bool:  # NaN (a NaN pixel, or a NaN cval outside) is False, as in scipy
        for img, c, cval in ((np.array([[np.nan]]), np.zeros((2, 1)), 0.0),
                             (np.ones((2, 2)), np.full((2, 1), -5.0), np.nan)):
            ref = ndi.map_coordinates(img, c, order=1, output=bool, cval=cval)
            got = dops.map_coordinates(img, c, order=1, output=bool, cval=cval)
            np.testing.assert_array_equal(got, ref)
            assert not got.any()
    if dtype is np.uint64:  # saturates, as every other integer output
        assert dops.map_coordinates(np.array([[2e19]]), np.zeros((2, 1)),
                                    output=dtype)[0] == np.iinfo(np.uint64).max


def test_map_coordinates_output_must_be_writable_and_ours():
    """A read-only output array raises scipy's ValueError instead of being written (a read-only
    memmap would crash the process); another library's array (anything with a shape or
    __dlpack__) is a TypeError, never taken for a dtype and silently left unfilled
    [oracle: scipy's error for read-only outputs; contract §5]."""
    img, coords = np.ones((4, 5)), np.ones((2, 3))
    for dt in (np.float64, np.int32):  # the direct path and the cast path
        ro = np.zeros(3, dt)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            ndi.map_coordinates(img, coords, output=ro)
        with pytest.raises(ValueError, match="read-only"):
            dops.map_coordinates(img, coords, output=ro)
        assert not ro.any()

    class ArrayLike:
        dtype, shape = np.dtype(np.float64), (3,)

    for foreign in (ArrayLike(), memoryview(np.zeros(3))):
        with pytest.raises(TypeError, match="output"):
            dops.map_coordinates(img, coords, output=foreign)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_map_coordinates_spline_orders_not_implemented(order):
    """order 2..5 are valid in scipy but not implemented here: NotImplementedError [contract]."""
    img = np.zeros((4, 4))
    coords = np.zeros((2, 3))
    ndi.map_coordinates(img, coords, order=order)  # valid for the oracle
    with pytest.raises(NotImplementedError, match="order"):
        dops.map_coordinates(img, coords, order=order)


def test_map_coordinates_plane_oracle_consistency():
    """The test oracle ``scipy_plane`` equals scipy itself on finite moderate input (guards the
    oracle's own preprocessing) [oracle: scipy]."""
    rng = np.random.default_rng(11)
    img = rng.uniform(-1, 1, (4, 5))
    cy, cx = rng.uniform(-10, 10, 50), rng.uniform(-10, 10, 50)
    for mode in MODES:
        for order in ORDERS:
            ref = ndi.map_coordinates(img, np.stack([cy, cx]), order=order, mode=mode, cval=0.5)
            np.testing.assert_array_equal(scipy_plane(img, cy, cx, order, mode, 0.5), ref)


@pytest.mark.parametrize("order", ORDERS)
def test_map_coordinates_array_likes_and_mixed_dtypes(order):
    """As a scipy drop-in, map_coordinates takes what scipy takes: nested lists, integer
    coordinates (np.indices), float64 coordinates for a float32 image (result float32, as scipy)
    [oracle: scipy]."""
    rng = np.random.default_rng(12)
    img = rng.uniform(-1, 1, (5, 6))
    idx = np.indices((4, 3)) - 1  # int coordinates, some outside
    for mode in ("mirror", "grid-constant"):
        ref = ndi.map_coordinates(img, idx, order=order, mode=mode, cval=0.5)
        got = dops.map_coordinates(img, idx, order=order, mode=mode, cval=0.5)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        got = dops.map_coordinates(img.tolist(), (idx + 0.25).tolist(), order=order, mode=mode,
                                   cval=0.5)
        ref = ndi.map_coordinates(img, idx + 0.25, order=order, mode=mode, cval=0.5)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        c64 = rng.uniform(-2, 7, (2, 10))
        ref = ndi.map_coordinates(img.astype(np.float32), c64, order=order, mode=mode, cval=0.5)
        got = dops.map_coordinates(img.astype(np.float32), c64, order=order, mode=mode,
                                   cval=0.5)
        assert got.dtype == ref.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
        big = img.astype(">f8")  # non-native byte order: a native result, as scipy's
        ref = ndi.map_coordinates(big, c64, order=order, mode=mode, cval=0.5)
        got = dops.map_coordinates(big, c64, order=order, mode=mode, cval=0.5)
        assert got.dtype == ref.dtype and got.dtype.isnative
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_map_coordinates_nonfinite_coordinates_give_cval(mode):
    """Non-finite coordinates give cval in every mode (scipy returns NaN or garbage there: the
    documented deviation) [oracle: contract §4]."""
    img = np.arange(12.0).reshape(3, 4)
    c = np.array([[np.nan, 1.0, np.inf, -np.inf, 1.0], [1.0, np.nan, 0.0, 1.0, -np.inf]])
    for dt in DTYPES:
        got = dops.map_coordinates(img.astype(dt), c.astype(dt), mode=mode, cval=-2.5)
        np.testing.assert_array_equal(got, np.full(5, -2.5, dt))


@pytest.mark.parametrize("mode", ["reflect", "grid-mirror"])
def test_reflect_multiples_of_the_period_read_scipys_pixels(mode):
    """At exact multiples of the period (x = -2kn), scipy's cell is the mirrored one left of
    the point: a NaN in the next pixel (column 1) does not reach the sample for k >= 2 (it does
    at 0 and -2n); the gradient's right-hand cell must not change the forward's
    [oracle: scipy, NaN pattern included]."""
    img = np.arange(20.0).reshape(4, 5)
    img[:, 1] = np.nan
    xs = np.array([0.0, -10.0, -20.0, -30.0, -40.0, -1000.0])
    coords = np.stack([np.full(xs.size, 1.5), xs])
    ref = ndi.map_coordinates(img, coords, order=1, mode=mode)
    got = dops.map_coordinates(img, coords, order=1, mode=mode)
    np.testing.assert_array_equal(got, ref)
    assert np.isfinite(ref[2:]).all()
    # and sample's forward, the same values
    x = img[None, None]
    c = coords[:, None, :][None]
    np.testing.assert_array_equal(dops.sample(x, c, mode=mode)[0, 0, 0], ref)
