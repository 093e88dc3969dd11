"""Per-point tap computation shared by every CPU sampling kernel.

A sample point (y, x) becomes four corner taps (00, 01, 10, 11) = (y_low, x_low), (y_low, x_high),
(y_high, x_low), (y_high, x_high), each with a flat index into the ``H * W`` plane and a weight.
Taps that read ``cval`` (mode 'grid-constant' outside the image, or a point whose whole value is
``cval``) get index 0 and weight 0, and their contribution moves into a per-point constant, so that
the channel loops that use the taps are branch-free.

The boundary handling reproduces ``scipy.ndimage.map_coordinates`` (``NI_GeometricTransform``):
the coordinate is first mapped into the image by the mode (except for 'grid-constant' and
'nearest'); taps that still fall outside are mapped by the mode's spline boundary rule ('mirror'
for 'constant' and 'wrap'). Periodic reductions use ``fmod``, which is exact, so huge finite
coordinates never overflow an integer conversion.
"""

import math

import numpy as np

from numba import njit

from ..._modes import CONSTANT, GRID_CONSTANT, GRID_WRAP, MIRROR, NEAREST, REFLECT, WRAP

# Output points handled by one task of a parallel loop.
CHUNK = 256


@njit(cache=True)
def map_tap(i, n, mode):
    """Map an integer tap index into ``[0, n)``; -1 means the tap reads ``cval``."""
    if 0 <= i < n:
        return i
    if mode == GRID_CONSTANT:
        return -1
    if n <= 1:
        return 0
    if mode == NEAREST:
        return 0 if i < 0 else n - 1
    if mode == REFLECT:
        p = 2 * n
        i = i % p
        return i if i < n else p - 1 - i
    if mode == GRID_WRAP:
        return i % n
    # MIRROR; scipy also mirrors the edge taps of CONSTANT and WRAP.
    p = 2 * n - 2
    i = i % p
    return i if i < n else p - i


@njit(cache=True)
def map_coordinate(c, n, mode):
    """Map a finite coordinate along an axis of length ``n`` by the boundary mode.

    Returns ``(c_mapped, sign, ok)``: ``sign`` is d(c_mapped)/dc (+1, -1, or 0 where the value
    no longer depends on c) and ``ok`` is False when the output is ``cval`` without interpolation.
    """
    if mode == GRID_CONSTANT:
        # Beyond one pixel outside every tap reads cval: clamp so the index stays small.
        if c < -2.0:
            return -2.0, 0.0, True
        if c > n + 1.0:
            return n + 1.0, 0.0, True
        return c, 1.0, True
    if mode == NEAREST:
        if c < -1.0:
            return -1.0, 0.0, True
        if c > n:
            return float(n), 0.0, True
        return c, 1.0, True
    sign = 1.0
    if c < 0.0:
        if mode == CONSTANT:
            return c, 0.0, False
        if n <= 1:
            return 0.0, 0.0, True
        if mode == MIRROR:
            p = 2.0 * n - 2.0
            r = np.fmod(-c, p)
            if r >= n - 1.0:
                c = p - r
            else:
                c = r
                sign = -1.0
        elif mode == REFLECT:
            p = 2.0 * n
            if c < -p:
                c = -np.fmod(-c, p)
            if c < -n:
                c = c + p
            else:
                # as scipy: keep (-c - 1) away from exactly -1
                c = (1e-15 if c > -1e-15 else -c) - 1.0
                sign = -1.0
        elif mode == WRAP:
            c = (n - 1.0) - np.fmod(-c, n - 1.0)
        else:  # GRID_WRAP: c + n*k for the k that lands in [0, n), as scipy, but exact
            c = np.fmod(c, float(n))
            c = c + n if c < 0.0 else 0.0
    elif c > n - 1.0:
        if mode == CONSTANT:
            return c, 0.0, False
        if n <= 1:
            return 0.0, 0.0, True
        if mode == MIRROR:
            p = 2.0 * n - 2.0
            c = np.fmod(c, p)
            if c >= n:
                c = p - c
                sign = -1.0
        elif mode == REFLECT:
            p = 2.0 * n
            c = np.fmod(c, p)
            if c >= n:
                c = p - c - 1.0
                sign = -1.0
        elif mode == WRAP:
            c = np.fmod(c, n - 1.0)
        else:  # GRID_WRAP
            c = np.fmod(c, float(n))
    return c, sign, c > -1.0


@njit(cache=True)
def axis_taps(c, n, mode, order):
    """Taps along one axis: ``(i_low, i_high, l, h, sign, ok)``.

    ``l`` and ``h`` are the weights of ``i_low`` and ``i_high`` (``h = 1 - l`` as in scipy);
    indices are mapped into the axis or -1 (reads cval). For order 0 only ``i_low`` is used.
    """
    if not math.isfinite(c):
        return 0, 0, 0.0, 0.0, 0.0, False
    c, sign, ok = map_coordinate(c, n, mode)
    if not ok:
        return 0, 0, 0.0, 0.0, 0.0, False
    tap_mode = MIRROR if (mode == CONSTANT or mode == WRAP) else mode
    if order == 0:
        i = map_tap(int(math.floor(c + 0.5)), n, tap_mode)
        return i, i, 1.0, 0.0, 0.0, True
    f = math.floor(c)
    i = int(f)
    l = 1.0 - (c - f)
    h = 1.0 - l
    return map_tap(i, n, tap_mode), map_tap(i + 1, n, tap_mode), l, h, sign, True


@njit(cache=True)
def point_taps(y, x, H, W, mode, order, cval, j, idx, wt, bias):
    """Fill column ``j`` of ``idx``/``wt`` (shape (4, CHUNK)) and ``bias[j]`` for one point.

    The sampled value is ``bias[j] + sum_k wt[k, j] * plane[idx[k, j]]``.
    Returns the axis taps for callers that also need derivatives.
    """
    y_low, y_high, ly, hy, sy, oky = axis_taps(y, H, mode, order)
    x_low, x_high, lx, hx, sx, okx = axis_taps(x, W, mode, order)
    if not (oky and okx):
        for k in range(4):
            idx[k, j] = 0
            wt[k, j] = 0.0
        bias[j] = cval
        return y_low, y_high, 0.0, 0.0, 0.0, x_low, x_high, 0.0, 0.0, 0.0
    if order == 0:
        for k in range(1, 4):
            idx[k, j] = 0
            wt[k, j] = 0.0
        if y_low < 0 or x_low < 0:
            idx[0, j] = 0
            wt[0, j] = 0.0
            bias[j] = cval
        else:
            idx[0, j] = y_low * W + x_low
            wt[0, j] = 1.0
            bias[j] = 0.0
        return y_low, y_high, ly, hy, 0.0, x_low, x_high, lx, hx, 0.0
    b = 0.0
    k = 0
    for a in range(2):
        yi = y_low if a == 0 else y_high
        wy = ly if a == 0 else hy
        for e in range(2):
            xi = x_low if e == 0 else x_high
            w = wy * (lx if e == 0 else hx)
            if yi < 0 or xi < 0:
                idx[k, j] = 0
                wt[k, j] = 0.0
                b += cval * w
            else:
                idx[k, j] = yi * W + xi
                wt[k, j] = w
            k += 1
    bias[j] = b
    return y_low, y_high, ly, hy, sy, x_low, x_high, lx, hx, sx


@njit(cache=True)
def point_slopes(taps, W, cval, j, ay, ax, cst):
    """Derivative coefficients of one point's sampled value with respect to y and x.

    d value / dy = cst[0, j] + sum_k ay[k, j] * plane[idx[k, j]], likewise for x with ax and
    cst[1, j]: the derivative of the bilinear interpolant of the cell, from the four corner values
    the forward used (cval for taps outside), times the sign of the mode's coordinate mapping.
    """
    y_low, y_high, ly, hy, sy, x_low, x_high, lx, hx, sx = taps
    cy = 0.0
    cx = 0.0
    k = 0
    for a in range(2):
        yi = y_low if a == 0 else y_high
        for e in range(2):
            xi = x_low if e == 0 else x_high
            # corner (a, e) enters d/dy with +-(x weight) and d/dx with +-(y weight)
            dy = sy * (lx if e == 0 else hx) * (1.0 if a == 1 else -1.0)
            dx = sx * (ly if a == 0 else hy) * (1.0 if e == 1 else -1.0)
            if yi < 0 or xi < 0:
                ay[k, j] = 0.0
                ax[k, j] = 0.0
                cy += cval * dy
                cx += cval * dx
            else:
                ay[k, j] = dy
                ax[k, j] = dx
            k += 1
    cst[0, j] = cy
    cst[1, j] = cx
