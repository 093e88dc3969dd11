"""Per-point tap computation shared by every CPU sampling kernel.

A sample point (y, x) becomes four corner taps (00, 01, 10, 11) = (y_low, x_low), (y_low, x_high),
(y_high, x_low), (y_high, x_high), each with a flat index into the ``H * W`` plane and a weight.
Taps that read ``cval`` (mode 'grid-constant' outside the image, or a point whose whole value is
``cval``) get index 0 and weight 0, and their contribution moves into a per-point constant, so that
the channel loops that use the taps are branch-free; such corners point at a corner of the same
point that is inside, and points with no corner inside are flagged so that no loop reads the
plane for them (a NaN or Inf pixel reaches exactly the samples that read it, as in scipy and
torchvision). For order 0 the low corner carries weight 1 and the others weight 0.

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


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
def map_coordinate(c, n, mode):
    """Map a finite coordinate along an axis of length ``n`` by the boundary mode.

    Returns ``(c_mapped, sign, ok)``: ``sign`` is d(c_mapped)/dc (+1, -1, or 0 where the value
    no longer depends on c) and ``ok`` is False when the output is ``cval`` without interpolation.
    """
    if mode == GRID_CONSTANT:
        # Beyond one pixel outside every tap reads cval: move the point into [-3, -2) or
        # [n + 1, n + 2) so the index stays small, keeping its fraction, so that the taps'
        # weights are scipy's (cval * 0 is NaN for an infinite cval, as in scipy).
        # (np.floor: Numba's math.floor returns an int64, which 1e30 overflows)
        if c < -2.0:
            return -3.0 + (c - np.floor(c)), 0.0, True
        if c > n + 1.0:
            return n + 1.0 + (c - np.floor(c)), 0.0, True
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


@njit(cache=True, inline="always")
def axis_taps(c, n, mode, order, slopes):
    """Taps along one axis: ``(i_low, i_high, l, h, sign, ok)``.

    ``l`` and ``h`` are the weights of ``i_low`` and ``i_high`` (``h = 1 - l`` as in scipy);
    indices are mapped into the axis or -1 (reads cval). For order 0 only ``i_low`` is used.
    With ``slopes`` (taps for a coordinate gradient), an integer point on a mirrored stretch
    gets the cell on the other side of its pixel (see below); the value is the same.
    """
    if not math.isfinite(c):
        return 0, 0, 0.0, 0.0, 0.0, False
    c_in = c
    c, sign, ok = map_coordinate(c, n, mode)
    if not ok:
        return 0, 0, 0.0, 0.0, 0.0, False
    tap_mode = MIRROR if (mode == CONSTANT or mode == WRAP) else mode
    if order == 0:  # the high tap gets weight 0 and points at the low one
        i = map_tap(int(math.floor(c + 0.5)), n, tap_mode)
        return i, i, 1.0, 0.0, 0.0, True
    if slopes and mode == REFLECT and c_in < 0.0 and n > 1 and np.fmod(-c_in, 2.0 * n) == 0.0:
        # An exact multiple of the period far left: scipy's cell (the forward keeps it) is the
        # flat mirrored one left of the point; the right-hand derivative is the cell right of
        # it, [0, 1], as at 0. Same value.
        c, sign = 0.0, 1.0
    f = math.floor(c)
    if slopes and sign < 0.0 and f == c:
        # On a mirrored stretch c runs against the caller's coordinate: the cell to the right
        # of the point is the one below c, and it gives the right-hand derivative (DESIGN §4).
        # Same value (weight 1 on c's own tap, 0 on the other); the forward keeps scipy's cell,
        # so that a NaN pixel reaches the samples scipy's reaches.
        f -= 1.0
    i = int(f)
    l = 1.0 - (c - f)
    h = 1.0 - l
    return map_tap(i, n, tap_mode), map_tap(i + 1, n, tap_mode), l, h, sign, True


@njit(cache=True, inline="always")
def zero_padding_cell(y, x, H, W):
    """:func:`zero_padding_taps` + :func:`corner_taps` (deform_conv2d's rule: mode
    'grid-constant', cval 0, order 1) without branches, bit for bit: selects, so that a loop
    over points vectorizes.

    Returns ``(i0, i1, i2, i3, w0, w1, w2, w3, code)``: the indices into the H*W plane and the
    weights of corners 00, 01, 10, 11, and ``code``: 2 for a point with no corner inside
    (indices and weights 0; non-finite points and points two or more pixels outside too), 1 for
    one that torchvision's rule sets to 0 (y <= -1, y >= H, x <= -1 or x >= W) although a
    corner of weight 0 is inside, else 0.
    """
    in_y = (y > -2.0) & (y < H + 1.0)  # False for NaN
    in_x = (x > -2.0) & (x < W + 1.0)
    # beyond those bounds every corner is outside: a dummy cell then keeps the integer
    # conversion away from huge and non-finite values
    yc = y if in_y else -3.0
    xc = x if in_x else -3.0
    fy, fx = math.floor(yc), math.floor(xc)
    y_low, x_low = int(fy), int(fx)
    ly, lx = 1.0 - (yc - fy), 1.0 - (xc - fx)
    hy, hx = 1.0 - ly, 1.0 - lx
    ok_yl, ok_yh = (y_low >= 0) & (y_low < H), (y_low >= -1) & (y_low < H - 1)
    ok_xl, ok_xh = (x_low >= 0) & (x_low < W), (x_low >= -1) & (x_low < W - 1)
    inside = (ok_yl | ok_yh) & (ok_xl | ok_xh)
    # an outside tap borrows the other tap of its axis: a corner inside, which is read anyway
    r_low = (y_low if ok_yl else y_low + 1) * W
    r_high = (y_low + 1 if ok_yh else y_low) * W
    c_low = x_low if ok_xl else x_low + 1
    c_high = x_low + 1 if ok_xh else x_low
    kept = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
    code = 0 if (inside & kept) else (1 if inside else 2)
    return (r_low + c_low if inside else 0, r_low + c_high if inside else 0,
            r_high + c_low if inside else 0, r_high + c_high if inside else 0,
            ly * lx if ok_yl & ok_xl else 0.0, ly * hx if ok_yl & ok_xh else 0.0,
            hy * lx if ok_yh & ok_xl else 0.0, hy * hx if ok_yh & ok_xh else 0.0, code)


@njit(cache=True, inline="always")
def _zero_padding_axis(c, n):
    """:func:`axis_taps` for mode 'grid-constant', order 1, without the mode dispatch.

    Points at or beyond two pixels outside (and non-finite ones) have both taps outside and
    sign 0, which gives the same value (cval) and zero derivative as the general path.
    """
    if not (c > -2.0 and c < n + 1.0):
        return -1, -1, 0.0, 0.0, 0.0, True
    f = math.floor(c)
    i = int(f)
    l = 1.0 - (c - f)
    return (i if 0 <= i < n else -1), (i + 1 if 0 <= i + 1 < n else -1), l, 1.0 - l, 1.0, True


@njit(cache=True)
def zero_padding_taps(y, x, H, W):
    """:func:`point_taps` for deform_conv2d's rule: mode 'grid-constant' (cval 0), order 1."""
    return _zero_padding_axis(y, H), _zero_padding_axis(x, W)


@njit(cache=True)
def point_taps(y, x, H, W, mode, order, slopes):
    """Axis taps ``(ya, xa)`` of the point (y, x) in an H x W image (see :func:`axis_taps`)."""
    return axis_taps(y, H, mode, order, slopes), axis_taps(x, W, mode, order, slopes)


@njit(cache=True)
def corner_taps(ya, xa, W, cval):
    """Corner taps of a point from its axis taps ``ya``, ``xa`` (see :func:`axis_taps`).

    Returns ``(i0, i1, i2, i3, w0, w1, w2, w3, bias, empty)`` for corners 00, 01, 10, 11: the
    sampled value is ``bias + sum_k w_k * plane[i_k]``. Corners that read cval get weight 0, add
    ``cval * weight`` to ``bias`` and point at a corner of the same point that is inside (its
    pixel is read anyway, so a non-finite pixel reaches no other sample). ``empty`` is True when
    no corner is inside: the value is ``bias`` and callers must not read the plane at all.
    Scalars only: passing arrays to a Numba function costs reference counting on every call.
    """
    y_low, y_high, ly, hy, sy, oky = ya
    x_low, x_high, lx, hx, sx, okx = xa
    if not (oky and okx):
        return 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, cval, True
    if (y_low < 0 or x_low < 0) and y_low == y_high and x_low == x_high and hy == 0.0 \
            and hx == 0.0:
        # one tap outside (order 0): cval itself, as scipy reads one pixel (the weight-0
        # corners would add 0 * cval, NaN for an infinite cval)
        return 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, cval, True
    bias = 0.0
    w0, bias = _corner(y_low, x_low, ly * lx, cval, bias)
    w1, bias = _corner(y_low, x_high, ly * hx, cval, bias)
    w2, bias = _corner(y_high, x_low, hy * lx, cval, bias)
    w3, bias = _corner(y_high, x_high, hy * hx, cval, bias)
    if (y_low < 0 and y_high < 0) or (x_low < 0 and x_high < 0):
        return 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, bias, True
    # an outside tap borrows the other tap of its axis: every index is then a corner inside
    if y_low < 0:
        y_low = y_high
    if y_high < 0:
        y_high = y_low
    if x_low < 0:
        x_low = x_high
    if x_high < 0:
        x_high = x_low
    r_low, r_high = y_low * W, y_high * W
    return (r_low + x_low, r_low + x_high, r_high + x_low, r_high + x_high,
            w0, w1, w2, w3, bias, False)


@njit(cache=True, inline="always")
def _corner(yi, xi, w, cval, bias):
    """(weight, bias) of one corner: an outside corner (index -1) moves its weight to bias."""
    if yi < 0 or xi < 0:
        return 0.0, bias + cval * w
    return w, bias


@njit(cache=True)
def corner_slopes(ya, xa, cval):
    """Derivative coefficients of a point's sampled value with respect to y and x.

    Returns ``(ay0, ay1, ay2, ay3, ax0, ax1, ax2, ax3, cy, cx)``:
    ``d value / dy = cy + sum_k ay_k * plane[i_k]`` (likewise x), with the corner indices of
    :func:`corner_taps`. This is the derivative of the bilinear interpolant of the cell from the
    four corner values the forward used (cval for corners outside), times the sign of the mode's
    coordinate mapping. Zero for order 0 and for points whose value is cval.
    """
    y_low, y_high, ly, hy, sy, oky = ya
    x_low, x_high, lx, hx, sx, okx = xa
    if not (oky and okx):
        sy = 0.0
        sx = 0.0
    # corner 00, 01, 10, 11: d/dy weights -lx, -hx, +lx, +hx; d/dx weights -ly, +ly, -hy, +hy
    ay0, ax0, cy, cx = _corner_slope(y_low, x_low, -sy * lx, -sx * ly, cval, 0.0, 0.0)
    ay1, ax1, cy, cx = _corner_slope(y_low, x_high, -sy * hx, sx * ly, cval, cy, cx)
    ay2, ax2, cy, cx = _corner_slope(y_high, x_low, sy * lx, -sx * hy, cval, cy, cx)
    ay3, ax3, cy, cx = _corner_slope(y_high, x_high, sy * hx, sx * hy, cval, cy, cx)
    return ay0, ay1, ay2, ay3, ax0, ax1, ax2, ax3, cy, cx


@njit(cache=True, inline="always")
def _corner_slope(yi, xi, dy, dx, cval, cy, cx):
    if yi < 0 or xi < 0:  # a zero slope adds nothing (not 0 * cval, NaN for an infinite cval)
        return (0.0, 0.0, (cy + cval * dy) if dy != 0.0 else cy,
                (cx + cval * dx) if dx != 0.0 else cx)
    return dy, dx, cy, cx
