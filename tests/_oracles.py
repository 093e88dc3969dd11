"""Independent reference implementations and input generators for the sampling tests.

The oracle for every forward sampling op is ``scipy.ndimage.map_coordinates`` applied plane by
plane in float64 (``prefilter=False``, which is a no-op for order 0 and 1). Two documented
deviations from scipy are applied here, not in the compared code:

- non-finite coordinates (NaN, +-Inf) give ``cval`` (scipy returns NaN or garbage);
- huge finite coordinates (|c| > ``HUGE``) are first reduced exactly (``np.fmod``) by the mode's
  period, because scipy converts them to an integer and overflows. For the non-periodic modes
  they are clamped to a moderate value with the same sampled value.
"""

import numpy as np
import scipy.ndimage as ndi

MODES = ("constant", "grid-constant", "nearest", "reflect", "grid-mirror", "mirror", "wrap",
         "grid-wrap")
ORDERS = (0, 1)
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)

# Coordinates with a larger magnitude are reduced before they are handed to scipy.
HUGE = 1e6


def to_nhwc(a):
    """(N, C, H, W) -> (N, H, W, C), contiguous."""
    return np.ascontiguousarray(np.moveaxis(a, 1, 3))


def to_nchw(a):
    """(N, H, W, C) -> (N, C, H, W), contiguous."""
    return np.ascontiguousarray(np.moveaxis(a, 3, 1))


def to_layout(a_nchw, layout):
    return a_nchw if layout == "NCHW" else to_nhwc(a_nchw)


def from_layout(a, layout):
    return a if layout == "NCHW" else to_nchw(a)


def _period(n, mode):
    return {
        "wrap": n - 1,
        "grid-wrap": n,
        "reflect": 2 * n,
        "grid-mirror": 2 * n,
        "mirror": 2 * n - 2,
    }.get(mode)


def reduce_huge(c, n, mode):
    """Replace coordinates with |c| > HUGE by a moderate one that samples the same value.

    Periodic and mirror modes: ``fmod`` by the period (exact), shifted by two periods away from
    the base interval so that scipy's treatment of the points where a period starts (e.g. 'wrap'
    maps -k(n-1) to n-1 but -0.0 to 0) is the same as for the huge coordinate.
    Other modes: clamp to +-(n + 3), which is outside every interpolation cell.
    """
    c = np.array(c, dtype=np.float64, copy=True)
    big = np.isfinite(c) & (np.abs(c) > HUGE)
    if not big.any():
        return c
    p = _period(n, mode)
    if p is None or n == 1:
        c[big] = np.sign(c[big]) * (n + 3)
        return c
    if p == 0:
        c[big] = 0.0
        return c
    r = np.fmod(c[big], p)
    c[big] = np.where(c[big] > 0, r + 2 * p, r - 2 * p)
    return c


def scipy_plane(img, cy, cx, order, mode, cval):
    """Sample one 2-D float64 plane at float64 coordinate arrays ``cy``, ``cx`` with scipy."""
    img = np.asarray(img, dtype=np.float64)
    cy = np.asarray(cy, dtype=np.float64)
    cx = np.asarray(cx, dtype=np.float64)
    bad = ~(np.isfinite(cy) & np.isfinite(cx))
    H, W = img.shape
    cy = np.where(bad, 0.0, reduce_huge(cy, H, mode))
    cx = np.where(bad, 0.0, reduce_huge(cx, W, mode))
    out = ndi.map_coordinates(img, np.stack([cy, cx]), order=order, mode=mode, cval=float(cval),
                              prefilter=False, output=np.float64)
    out[bad] = cval
    return out


def scipy_sample(x, coords, order, mode, cval, layout="NCHW"):
    """Oracle for ``dops.sample``: scipy.ndimage.map_coordinates per (image, channel), float64.

    ``x`` and ``coords`` are in ``layout``; the result is float64 in ``layout``.
    """
    x = from_layout(np.asarray(x), layout).astype(np.float64)
    coords = from_layout(np.asarray(coords), layout).astype(np.float64)
    N, C, H, W = x.shape
    G = coords.shape[1] // 2
    Ho, Wo = coords.shape[2:]
    out = np.empty((N, C, Ho, Wo), np.float64)
    cpg = C // G if G else 0
    for n in range(N):
        for c in range(C):
            g = c // cpg
            out[n, c] = scipy_plane(x[n, c], coords[n, 2 * g], coords[n, 2 * g + 1], order, mode,
                                    cval)
    return to_layout(out, layout)


def grid_coords(offset, layout="NCHW"):
    """Absolute float64 coordinates ``grid + offset`` of ``deform_sample`` (same layout)."""
    off = from_layout(np.asarray(offset), layout).astype(np.float64)
    N, G2, H, W = off.shape
    ii, jj = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                         indexing="ij")
    c = off.copy()
    c[:, 0::2] += ii
    c[:, 1::2] += jj
    return to_layout(c, layout)


def scipy_deform_sample(x, offset, order, mode, cval, layout="NCHW"):
    """Oracle for ``dops.deform_sample``: scipy at coordinates ``grid + offset``."""
    return scipy_sample(x, grid_coords(offset, layout), order, mode, cval, layout)


def special_coords(n):
    """Border and half-way coordinates along an axis of length ``n``."""
    return np.array([-1.0, 0.0, n - 1.0, float(n), -0.5, n - 0.5, 0.5, n - 1.5], np.float64)


def mixed_coords(rng, shape, n, weights):
    """Coordinates along an axis of length ``n`` from a mix of kinds.

    ``weights`` (4 non-negative numbers) are the probabilities of: uniform in [-3n, 4n]; exact
    integers in [-2n, 3n]; half-integers in the same range; the borders -1, 0, n-1, n, -0.5, n-0.5.
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(4, 0.25)
    kind = rng.choice(4, size=shape, p=w)
    uni = rng.uniform(-3.0 * n, 4.0 * n, size=shape)
    ints = rng.integers(-2 * n, 3 * n + 1, size=shape).astype(np.float64)
    halves = ints + 0.5
    border = rng.choice(special_coords(n)[:6], size=shape)
    return np.choose(kind, [uni, ints, halves, border])


def smooth_coords(rng, shape, n, lo=-2, hi=None):
    """Coordinates ``k + f`` with integer k in [lo*n, hi*n) and f in [0.1, 0.9].

    Every mode maps integers to integers, so the sampled value is bilinear (smooth) in a
    neighbourhood of such points: float64 finite differences are exact up to rounding there.
    """
    hi = 3 if hi is None else hi
    k = rng.integers(lo * n, hi * n, size=shape).astype(np.float64)
    return k + rng.uniform(0.1, 0.9, size=shape)


def make_coords(rng, N, G, Ho, Wo, H, W, gen, layout="NCHW", **kw):
    """(N, 2G, Ho, Wo) float64 coordinates (in ``layout``), y from ``gen(rng, shape, H)``."""
    c = np.empty((N, 2 * G, Ho, Wo), np.float64)
    c[:, 0::2] = gen(rng, (N, G, Ho, Wo), H, **kw)
    c[:, 1::2] = gen(rng, (N, G, Ho, Wo), W, **kw)
    return to_layout(c, layout)


def tol(dtype):
    """(atol) of a forward comparison for values and cval in [-1, 1]."""
    return 1e-12 if np.dtype(dtype) == np.float64 else 2e-6


def extend(img, axis, mode, cval, pad=1):
    """The image extended by ``pad`` entries past its end along ``axis``, as the kernels' taps
    read it (np.pad names): used for right-hand differences at integer points."""
    widths = [(0, 0)] * img.ndim
    widths[axis] = (0, pad)
    if mode == "grid-constant":
        return np.pad(img, widths, mode="constant", constant_values=cval)
    if mode == "nearest":
        return np.pad(img, widths, mode="edge")
    if mode in ("reflect", "grid-mirror"):
        return np.pad(img, widths, mode="symmetric")
    if mode == "grid-wrap":
        return np.pad(img, widths, mode="wrap")
    # 'mirror', and the edge taps of 'constant' and 'wrap' (scipy mirrors those)
    return np.pad(img, widths, mode="reflect")
