"""Numba CPU kernels for ``sample`` / ``deform_sample`` and their gradients.

Every kernel works on C-contiguous arrays in one of two memory orders and is compiled lazily,
once per (kernel, dtype), as a serial C entry point that runs a range of tasks; ``._launch``
runs it over all tasks on Numba's thread team (a ``prange`` loop per kernel took twice as long
to compile, issue 2). Arguments are packed by ``._launch.pack`` (layouts in each kernel):

- ``nchw``: x (N, C, H, W), coords (N, 2G, Ho, Wo), out (N, C, Ho, Wo);
- ``nhwc``: x (N, H, W, C), coords (N, Ho, Wo, 2G), out (N, Ho, Wo, C).

Tasks write disjoint outputs, so no two threads write one element and results are
bit-identical from run to run and for any number of threads:

- forward and coordinate gradient: one task per (image, group, chunk of output points); the taps
  of the chunk are computed once and reused for every channel of the group;
- input gradient: a first pass stores the taps of a block of images in a table, a second pass
  scatters with one task per input plane (NCHW) or per block of channels (NHWC).

With ``relative=True`` the coordinates are offsets from the output grid (``deform_sample``):
the sample point of output (i, j) is ``(i + dy, j + dx)``.
"""

import functools
import math

import numpy as np
from numba import cfunc, njit, types

from ._taps import CHUNK, corner_slopes, corner_taps, point_taps
from ._launch import array4, float_at, launch, meta_array, pack

# Tap indices are stored unsigned (np.uintp): Numba then skips the negative-index wraparound
# check on every gather and scatter.
# NHWC input gradient: channels per scatter task (one 64-byte line of float32).
CHANNEL_BLOCK = 16
# Tap-table budget of the input gradient, in (image, group, point) entries: 48 bytes each.
TABLE_POINTS = 1 << 18


@njit(cache=True, inline="always")
def _store_taps(taps, j, idx, wt, bias, empty):
    """Store the :func:`corner_taps` tuple as column j (casting weights to the array dtype)."""
    idx[0, j], idx[1, j], idx[2, j], idx[3, j] = taps[0], taps[1], taps[2], taps[3]
    wt[0, j], wt[1, j], wt[2, j], wt[3, j] = taps[4], taps[5], taps[6], taps[7]
    bias[j] = taps[8]
    empty[j] = taps[9]


@njit(cache=True, inline="always")
def _store_slopes(slopes, j, ay, ax, cst):
    """Store the :func:`corner_slopes` tuple as column j."""
    ay[0, j], ay[1, j], ay[2, j], ay[3, j] = slopes[0], slopes[1], slopes[2], slopes[3]
    ax[0, j], ax[1, j], ax[2, j], ax[3, j] = slopes[4], slopes[5], slopes[6], slopes[7]
    cst[0, j], cst[1, j] = slopes[8], slopes[9]


@njit(cache=True)
def _fill_chunk(cn, channels_last, g, p0, m, Wo, relative, H, W, mode, order, cval, col0,
                idx, wt, bias, empty, ay, ax, cst):
    """Taps (and, when ``cst`` has columns, derivative coefficients) of points p0 .. p0+m-1 of
    group g. (A run-time condition: one compiled variant serves forward and backward.)

    ``cn`` holds one image's coordinates, (2G, P) or, if ``channels_last``, (P, 2G); point
    p0 + j goes to column col0 + j of the tap arrays. ``empty`` flags the points that read no
    pixel (their value is ``bias``); returns how many there are.
    """
    n_empty = 0
    slopes = cst.shape[1] > 0
    # the grid position of point p0 + j, counted on (no integer division per point)
    row = p0 // Wo
    col = p0 - row * Wo
    for j in range(m):
        p = p0 + j
        if channels_last:
            y, x = np.float64(cn[p, 2 * g]), np.float64(cn[p, 2 * g + 1])
        else:
            y, x = np.float64(cn[2 * g, p]), np.float64(cn[2 * g + 1, p])
        if relative:
            y += row
            x += col
            col += 1
            if col == Wo:
                col = 0
                row += 1
        if order == 1 and 0.0 <= y < H - 1 and 0.0 <= x < W - 1:  # False for NaN
            # a cell inside the image, where every mode leaves the point and its four corners
            # as they are: the general path's arithmetic without its branches, bit for bit
            # (in the loop body: in an inline="always" helper taking the arrays it ran 15x
            # slower, Numba counting references of the arrays at every call)
            fy = math.floor(y)
            fx = math.floor(x)
            ly = 1.0 - (y - fy)
            lx = 1.0 - (x - fx)
            hy = 1.0 - ly
            hx = 1.0 - lx
            r = fy * W + fx
            k = col0 + j
            idx[0, k], idx[1, k], idx[2, k], idx[3, k] = r, r + 1, r + W, r + W + 1
            wt[0, k], wt[1, k], wt[2, k], wt[3, k] = ly * lx, ly * hx, hy * lx, hy * hx
            bias[k] = 0.0
            empty[k] = False
            if slopes:
                ay[0, k], ay[1, k], ay[2, k], ay[3, k] = -lx, -hx, lx, hx
                ax[0, k], ax[1, k], ax[2, k], ax[3, k] = -ly, ly, -hy, hy
                cst[0, k], cst[1, k] = 0.0, 0.0
            continue
        ya, xa = point_taps(y, x, H, W, mode, order, slopes)
        taps = corner_taps(ya, xa, W, cval)
        _store_taps(taps, col0 + j, idx, wt, bias, empty)
        n_empty += taps[9]
        if slopes:
            _store_slopes(corner_slopes(ya, xa, cval), col0 + j, ay, ax, cst)
    return n_empty


@njit(cache=True)
def _set_empty(rows, c0, c1, empty, values, p0, m):
    """rows[c, p0 + j] = values[j] for c0 <= c < c1 and the flagged points j < m."""
    for j in range(m):
        if empty[j]:
            for c in range(c0, c1):
                rows[c, p0 + j] = values[j]


@njit(cache=True)
def _blend1(xf, of, c, idx, wt, bias, p0, m):
    """of[c, p0 + j] = bias[j] + sum_k wt[k, j] * xf[c, idx[k, j]] for j < m. For the points
    flagged ``empty`` this reads pixel 0 with weight 0, which a NaN or Inf pixel 0 would spoil:
    the caller then sets them to bias[j] (:func:`_set_empty`), outside this hot loop."""
    src = xf[c]
    dst = of[c]
    for j in range(m):
        dst[p0 + j] = (bias[j] + wt[0, j] * src[idx[0, j]] + wt[1, j] * src[idx[1, j]]
                       + wt[2, j] * src[idx[2, j]] + wt[3, j] * src[idx[3, j]])


@njit(cache=True)
def _blend4(xf, of, c, idx, wt, bias, p0, m):
    """:func:`_blend1` for channels c .. c+3 at once (one load of the taps per point)."""
    s0, s1, s2, s3 = xf[c], xf[c + 1], xf[c + 2], xf[c + 3]
    d0, d1, d2, d3 = of[c], of[c + 1], of[c + 2], of[c + 3]
    for j in range(m):
        i0, i1, i2, i3 = idx[0, j], idx[1, j], idx[2, j], idx[3, j]
        w0, w1, w2, w3 = wt[0, j], wt[1, j], wt[2, j], wt[3, j]
        b = bias[j]
        v0 = b + w0 * s0[i0] + w1 * s0[i1] + w2 * s0[i2] + w3 * s0[i3]
        v1 = b + w0 * s1[i0] + w1 * s1[i1] + w2 * s1[i2] + w3 * s1[i3]
        v2 = b + w0 * s2[i0] + w1 * s2[i1] + w2 * s2[i2] + w3 * s2[i3]
        v3 = b + w0 * s3[i0] + w1 * s3[i1] + w2 * s3[i2] + w3 * s3[i3]
        d0[p0 + j] = v0
        d1[p0 + j] = v1
        d2[p0 + j] = v2
        d3[p0 + j] = v3


@njit(cache=True)
def _pick1(xf, of, c, idx, wt, bias, p0, m):
    """:func:`_blend1` for order 0: the one tap of weight 1 (tap 0) alone. The other taps point
    at its pixel with weight 0, which an infinite pixel would turn into NaN (0 * Inf), where
    scipy reads that pixel once."""
    src = xf[c]
    dst = of[c]
    for j in range(m):
        dst[p0 + j] = bias[j] + wt[0, j] * src[idx[0, j]]


@njit(cache=True)
def _slope_sums(xf, gof, c0, c1, idx, ay, ax, cst, p0, m, acc):
    """acc[:, j] = sum over channels c0..c1-1 of grad_out * (d value / dy, d value / dx).

    Channels go four at a time, so that each point's coefficients are loaded once per block.
    """
    acc[:, :m] = 0.0
    c = c0
    while c + 4 <= c1:
        s0, s1, s2, s3 = xf[c], xf[c + 1], xf[c + 2], xf[c + 3]
        g0, g1, g2, g3 = gof[c], gof[c + 1], gof[c + 2], gof[c + 3]
        for j in range(m):
            i0, i1, i2, i3 = idx[0, j], idx[1, j], idx[2, j], idx[3, j]
            a0, a1, a2, a3, cy = ay[0, j], ay[1, j], ay[2, j], ay[3, j], cst[0, j]
            b0, b1, b2, b3, cx = ax[0, j], ax[1, j], ax[2, j], ax[3, j], cst[1, j]
            p = p0 + j
            u0, u1, u2, u3 = s0[i0], s0[i1], s0[i2], s0[i3]
            sum_y = g0[p] * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3)
            sum_x = g0[p] * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3)
            u0, u1, u2, u3 = s1[i0], s1[i1], s1[i2], s1[i3]
            sum_y += g1[p] * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3)
            sum_x += g1[p] * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3)
            u0, u1, u2, u3 = s2[i0], s2[i1], s2[i2], s2[i3]
            sum_y += g2[p] * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3)
            sum_x += g2[p] * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3)
            u0, u1, u2, u3 = s3[i0], s3[i1], s3[i2], s3[i3]
            sum_y += g3[p] * (cy + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3)
            sum_x += g3[p] * (cx + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3)
            acc[0, j] += sum_y
            acc[1, j] += sum_x
        c += 4
    while c < c1:
        src = xf[c]
        go = gof[c]
        for j in range(m):
            v0, v1, v2, v3 = src[idx[0, j]], src[idx[1, j]], src[idx[2, j]], src[idx[3, j]]
            gv = go[p0 + j]
            acc[0, j] += gv * (cst[0, j] + ay[0, j] * v0 + ay[1, j] * v1
                               + ay[2, j] * v2 + ay[3, j] * v3)
            acc[1, j] += gv * (cst[1, j] + ax[0, j] * v0 + ax[1, j] * v1
                               + ax[2, j] * v2 + ax[3, j] * v3)
        c += 1


# The kernels' arguments, unpacked (``._launch.pack`` order; ``first`` types the arrays).


@njit(cache=True, inline="always")
def _forward_args(first, maddr):
    """Packed by :func:`sample_forward`: x, coords, out; order, mode, relative; cval."""
    args = meta_array(maddr, 19)
    return (array4(args, 0, first), array4(args, 5, first), array4(args, 10, first),
            args[15], args[16], float_at(maddr, 18), args[17] != 0)


@njit(cache=True, inline="always")
def _points_args(first, maddr):
    """Packed by :func:`sample_backward` for the first pass: grad_out, x, coords, grad_coords,
    tidx (uintp), twt; order, mode, relative, need_x, need_coords; cval."""
    args = meta_array(maddr, 36)
    return (array4(args, 0, first), array4(args, 5, first), array4(args, 10, first),
            array4(args, 15, first), array4(args, 20, np.uintp), array4(args, 25, first),
            args[30], args[31], float_at(maddr, 35), args[32] != 0, args[33] != 0,
            args[34] != 0)


@njit(cache=True, inline="always")
def _scatter_args(first, maddr):
    """Packed by :func:`sample_backward` for the scatter: grad_out, grad_x, tidx (uintp), twt."""
    args = meta_array(maddr, 20)
    return (array4(args, 0, first), array4(args, 5, first), array4(args, 10, np.uintp),
            array4(args, 15, first))


def _forward_nchw(t0, t1, first, maddr):
    """Tasks t0 .. t1-1 of the NCHW forward: one per (image, group, chunk of points)."""
    x, coords, out, order, mode, cval, relative = _forward_args(first, maddr)
    N, C, H, W = x.shape
    G = coords.shape[1] // 2
    Ho, Wo = coords.shape[2], coords.shape[3]
    P = Ho * Wo
    cpg = C // G
    xf = x.reshape(N * C, H * W)
    cf = coords.reshape(N, 2 * G, P)
    of = out.reshape(N * C, P)
    nchunks = (P + CHUNK - 1) // CHUNK
    idx = np.empty((4, CHUNK), np.uintp)
    wt = np.empty((4, CHUNK), x.dtype)
    bias = np.empty(CHUNK, x.dtype)
    empty = np.empty(CHUNK, np.bool_)
    no_slopes = np.empty((4, 0), x.dtype)
    for task in range(t0, t1):
        n = task // (G * nchunks)
        g = (task // nchunks) % G
        p0 = (task % nchunks) * CHUNK
        m = min(CHUNK, P - p0)
        n_empty = _fill_chunk(cf[n], False, g, p0, m, Wo, relative, H, W, mode, order, cval,
                              0, idx, wt, bias, empty, no_slopes, no_slopes, no_slopes)
        c = n * C + g * cpg
        c_end = c + cpg
        if order == 0:
            while c < c_end:
                _pick1(xf, of, c, idx, wt, bias, p0, m)
                c += 1
        while c + 4 <= c_end:  # four channels share each load of the taps
            _blend4(xf, of, c, idx, wt, bias, p0, m)
            c += 4
        while c < c_end:
            _blend1(xf, of, c, idx, wt, bias, p0, m)
            c += 1
        if n_empty:  # points that read no pixel: bias (cval) alone
            _set_empty(of, n * C + g * cpg, c_end, empty, bias, p0, m)


def _forward_nhwc(t0, t1, first, maddr):
    """Tasks t0 .. t1-1 of the NHWC forward: one per (image, chunk of points), all groups."""
    x, coords, out, order, mode, cval, relative = _forward_args(first, maddr)
    N, H, W, C = x.shape
    Ho, Wo = coords.shape[1], coords.shape[2]
    G = coords.shape[3] // 2
    P = Ho * Wo
    cpg = C // G
    xf = x.reshape(N, H * W, C)
    cf = coords.reshape(N, P, 2 * G)
    of = out.reshape(N, P, C)
    nchunks = (P + CHUNK - 1) // CHUNK
    cap = min(CHUNK, P)  # points per chunk at most: the tables hold G * cap
    idx = np.empty((4, G * cap), np.uintp)
    wt = np.empty((4, G * cap), x.dtype)
    bias = np.empty(G * cap, x.dtype)
    empty = np.empty(G * cap, np.bool_)
    no_slopes = np.empty((4, 0), x.dtype)
    for task in range(t0, t1):
        n = task // nchunks
        p0 = (task % nchunks) * CHUNK
        m = min(CHUNK, P - p0)
        for g in range(G):
            _fill_chunk(cf[n], True, g, p0, m, Wo, relative, H, W, mode, order, cval, g * cap,
                        idx, wt, bias, empty, no_slopes, no_slopes, no_slopes)
        for j in range(m):
            dst = of[n, p0 + j]
            for g in range(G):
                t = g * cap + j
                r0, r1, r2, r3 = xf[n, idx[0, t]], xf[n, idx[1, t]], xf[n, idx[2, t]], xf[n, idx[3, t]]
                w0, w1, w2, w3, b = wt[0, t], wt[1, t], wt[2, t], wt[3, t], bias[t]
                if empty[t]:  # reads no pixel: cval
                    for c in range(g * cpg, (g + 1) * cpg):
                        dst[c] = b
                elif order == 0:  # tap 0 alone (see _pick1)
                    for c in range(g * cpg, (g + 1) * cpg):
                        dst[c] = b + w0 * r0[c]
                else:
                    for c in range(g * cpg, (g + 1) * cpg):
                        dst[c] = b + w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c]


def _points_nchw(t0, t1, first, maddr):
    """Tasks t0 .. t1-1 of the NCHW backward's first pass, one per (image, group, chunk of
    points): the taps into the tables ``tidx``/``twt`` (N, G, 4, P) when ``need_x``, and the
    coordinate gradient when ``need_coords``."""
    (grad_out, x, coords, grad_coords, tidx, twt, order, mode, cval, relative, need_x,
     need_coords) = _points_args(first, maddr)
    N, C, H, W = x.shape
    G = coords.shape[1] // 2
    Ho, Wo = coords.shape[2], coords.shape[3]
    P = Ho * Wo
    cpg = C // G
    xf = x.reshape(N * C, H * W)
    cf = coords.reshape(N, 2 * G, P)
    gof = grad_out.reshape(N * C, P)
    # grad_coords is a (0, 0, 0, 0) placeholder when not needed
    gcf = grad_coords.reshape(grad_coords.shape[0], grad_coords.shape[1],
                              grad_coords.shape[2] * grad_coords.shape[3])
    nchunks = (P + CHUNK - 1) // CHUNK
    idx = np.empty((4, CHUNK), np.uintp)
    wt = np.empty((4, CHUNK), x.dtype)
    bias = np.empty(CHUNK, x.dtype)
    ns = CHUNK if need_coords else 0  # no slope columns: no slopes computed
    ay = np.empty((4, ns), x.dtype)
    ax = np.empty((4, ns), x.dtype)
    cst = np.empty((2, ns), x.dtype)
    empty = np.empty(CHUNK, np.bool_)
    acc = np.empty((2, CHUNK), x.dtype)
    zeros = np.zeros(CHUNK, x.dtype)
    for task in range(t0, t1):
        n = task // (G * nchunks)
        g = (task // nchunks) % G
        p0 = (task % nchunks) * CHUNK
        m = min(CHUNK, P - p0)
        n_empty = _fill_chunk(cf[n], False, g, p0, m, Wo, relative, H, W, mode, order, cval, 0,
                              idx, wt, bias, empty, ay, ax, cst)
        if need_x:
            for k in range(4):
                for j in range(m):
                    tidx[n, g, k, p0 + j] = idx[k, j]
                    twt[n, g, k, p0 + j] = wt[k, j]
        if need_coords:
            _slope_sums(xf, gof, n * C + g * cpg, n * C + (g + 1) * cpg, idx, ay, ax, cst, p0, m,
                        acc)
            if n_empty:  # constant output, and the sums read pixel 0 with weight 0
                _set_empty(acc, 0, 2, empty, zeros, 0, m)
            for j in range(m):
                gcf[n, 2 * g, p0 + j] = acc[0, j]
                gcf[n, 2 * g + 1, p0 + j] = acc[1, j]


def _scatter_nchw(t0, t1, first, maddr):
    """Planes t0 .. t1-1 of the NCHW input gradient (one task per (image, channel) plane): the
    adjoint of sampling, ``grad_x[ti[k, p]] += tw[k, p] * grad_out[p]``. Taps of weight 0 (points
    that read no pixel, whose taps point at pixel 0) add nothing, also where ``grad_out`` is
    not finite (0 * Inf would be NaN), as in the CUDA kernels."""
    grad_out, grad_x, tidx, twt = _scatter_args(first, maddr)
    N, C, H, W = grad_x.shape
    G = tidx.shape[1]
    P = tidx.shape[3]
    cpg = C // G
    gxf = grad_x.reshape(N * C, H * W)
    gof = grad_out.reshape(N * C, P)
    for plane in range(t0, t1):
        n = plane // C
        g = (plane % C) // cpg
        dst = gxf[plane]
        for i in range(H * W):
            dst[i] = 0.0
        go = gof[plane]
        ti = tidx[n, g]
        tw = twt[n, g]
        for p in range(P):
            gv = go[p]
            for k in range(4):
                w = tw[k, p]
                if w != 0.0:
                    dst[ti[k, p]] += w * gv


def _points_nhwc(t0, t1, first, maddr):
    """:func:`_points_nchw` for NHWC: one task per (image, chunk of points), all groups; the
    tables are (N, P, 4, G)."""
    (grad_out, x, coords, grad_coords, tidx, twt, order, mode, cval, relative, need_x,
     need_coords) = _points_args(first, maddr)
    N, H, W, C = x.shape
    Ho, Wo = coords.shape[1], coords.shape[2]
    G = coords.shape[3] // 2
    P = Ho * Wo
    cpg = C // G
    xf = x.reshape(N, H * W, C)
    cf = coords.reshape(N, P, 2 * G)
    gof = grad_out.reshape(N, P, C)
    gcf = grad_coords.reshape(grad_coords.shape[0], grad_coords.shape[1] * grad_coords.shape[2],
                              grad_coords.shape[3])
    nchunks = (P + CHUNK - 1) // CHUNK
    cap = min(CHUNK, P)  # points per chunk at most: the tables hold G * cap
    idx = np.empty((4, G * cap), np.uintp)
    wt = np.empty((4, G * cap), x.dtype)
    bias = np.empty(G * cap, x.dtype)
    ns = G * cap if need_coords else 0  # no slope columns: no slopes computed
    ay = np.empty((4, ns), x.dtype)
    ax = np.empty((4, ns), x.dtype)
    cst = np.empty((2, ns), x.dtype)
    empty = np.empty(G * cap, np.bool_)
    acc = np.empty(2, x.dtype)
    for task in range(t0, t1):
        n = task // nchunks
        p0 = (task % nchunks) * CHUNK
        m = min(CHUNK, P - p0)
        for g in range(G):
            _fill_chunk(cf[n], True, g, p0, m, Wo, relative, H, W, mode, order, cval, g * cap,
                        idx, wt, bias, empty, ay, ax, cst)
        for j in range(m):
            p = p0 + j
            for g in range(G):
                t = g * cap + j
                if need_x:
                    for k in range(4):
                        tidx[n, p, k, g] = idx[k, t]
                        twt[n, p, k, g] = wt[k, t]
                if need_coords and empty[t]:  # constant output: zero gradient, no pixel read
                    gcf[n, p, 2 * g] = 0.0
                    gcf[n, p, 2 * g + 1] = 0.0
                elif need_coords:
                    go = gof[n, p]
                    r0, r1, r2, r3 = xf[n, idx[0, t]], xf[n, idx[1, t]], xf[n, idx[2, t]], xf[n, idx[3, t]]
                    acc[0] = 0.0
                    acc[1] = 0.0
                    for c in range(g * cpg, (g + 1) * cpg):
                        gv = go[c]
                        acc[0] += gv * (cst[0, t] + ay[0, t] * r0[c] + ay[1, t] * r1[c]
                                        + ay[2, t] * r2[c] + ay[3, t] * r3[c])
                        acc[1] += gv * (cst[1, t] + ax[0, t] * r0[c] + ax[1, t] * r1[c]
                                        + ax[2, t] * r2[c] + ax[3, t] * r3[c])
                    gcf[n, p, 2 * g] = acc[0]
                    gcf[n, p, 2 * g + 1] = acc[1]


def _scatter_nhwc(t0, t1, first, maddr):
    """Tasks t0 .. t1-1 of the NHWC input gradient, one per (image, group, block of
    CHANNEL_BLOCK channels); taps of weight 0 add nothing (see :func:`_scatter_nchw`)."""
    grad_out, grad_x, tidx, twt = _scatter_args(first, maddr)
    N, H, W, C = grad_x.shape
    P = tidx.shape[1]
    G = tidx.shape[3]
    cpg = C // G
    gxf = grad_x.reshape(N, H * W, C)
    gof = grad_out.reshape(N, P, C)
    nblocks = (cpg + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for task in range(t0, t1):
        n = task // (G * nblocks)
        g = (task // nblocks) % G
        c0 = g * cpg + (task % nblocks) * CHANNEL_BLOCK
        c1 = min(c0 + CHANNEL_BLOCK, (g + 1) * cpg)
        gxn = gxf[n]
        for i in range(H * W):
            for c in range(c0, c1):
                gxn[i, c] = 0.0
        for p in range(P):
            go = gof[n, p]
            for k in range(4):
                w = twt[n, p, k, g]
                if w != 0.0:
                    dst = gxn[tidx[n, p, k, g]]
                    for c in range(c0, c1):
                        dst[c] += w * go[c]


_ENTRIES = {
    "forward_nchw": _forward_nchw,
    "forward_nhwc": _forward_nhwc,
    "points_nchw": _points_nchw,
    "points_nhwc": _points_nhwc,
    "scatter_nchw": _scatter_nchw,
    "scatter_nhwc": _scatter_nhwc,
}


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype):
    """Compile the C entry point ``name`` for ``dtype`` once (cached on disk by Numba)."""
    t = types.float32 if dtype == np.float32 else types.float64
    sig = types.void(types.intp, types.intp, types.CPointer(t), types.intp)
    return cfunc(sig, nogil=True, cache=True)(_ENTRIES[name])


def _forward_tasks(coords, channels_last):
    """Task count of the forward and the backward's first pass."""
    if channels_last:
        N, Ho, Wo, G2 = coords.shape
        return N * ((Ho * Wo + CHUNK - 1) // CHUNK)
    N, G2, Ho, Wo = coords.shape
    return N * (G2 // 2) * ((Ho * Wo + CHUNK - 1) // CHUNK)


def sample_forward(x, coords, out, order, mode, cval, relative, channels_last):
    """Sample ``x`` at ``coords`` into ``out`` (arrays in the memory order the flag names)."""
    if out.size == 0:
        return
    kernel = _kernel("forward_" + ("nhwc" if channels_last else "nchw"), x.dtype.type)
    meta = pack([x, coords, out], (order, mode, relative), (cval,))
    launch(kernel, _forward_tasks(coords, channels_last), x, meta)


def sample_backward(grad_out, x, coords, grad_x, grad_coords, order, mode, cval, relative,
                    channels_last):
    """Gradients of ``sample_forward``; ``grad_x`` / ``grad_coords`` may be None (not needed)."""
    need_x, need_coords = grad_x is not None, grad_coords is not None
    if grad_x is not None and grad_out.size == 0:
        grad_x[...] = 0
    if grad_coords is not None and grad_out.size == 0:
        grad_coords[...] = 0
    if grad_out.size == 0 or not (need_x or need_coords):
        return
    layout = "nhwc" if channels_last else "nchw"
    points = _kernel("points_" + layout, x.dtype.type)
    scatter = _kernel("scatter_" + layout, x.dtype.type)
    dummy = np.empty((0, 0, 0, 0), x.dtype)
    if channels_last:
        N, Ho, Wo, G2 = coords.shape
        C = x.shape[3]
    else:
        N, G2, Ho, Wo = coords.shape
        C = x.shape[1]
    G, P = G2 // 2, Ho * Wo
    # Images per call, so that the tap table of grad_x stays within TABLE_POINTS entries.
    step = max(1, TABLE_POINTS // max(1, G * P)) if need_x else N
    # one pair of tables for every block (a fresh pair per block, allocated while the previous
    # one is still alive, measured 5-10 ms slower per call at N=32, C=G=128, 14x14)
    tp = P if need_x else 0
    shape = (min(step, N), tp, 4, G) if channels_last else (min(step, N), G, 4, tp)
    tables = np.empty(shape, np.uintp), np.empty(shape, x.dtype)
    for n0 in range(0, N, step):
        sl = slice(n0, n0 + step)
        xs, cs, gos = x[sl], coords[sl], grad_out[sl]
        n = xs.shape[0]
        tidx, twt = tables[0][:n], tables[1][:n]
        gcs = grad_coords[sl] if need_coords else dummy
        meta = pack([gos, xs, cs, gcs, tidx, twt],
                    (order, mode, relative, need_x, need_coords), (cval,))
        launch(points, _forward_tasks(cs, channels_last), gos, meta)
        if need_x:
            cpg = C // G
            tasks = (n * G * ((cpg + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK) if channels_last
                     else n * C)
            gxs = grad_x[sl]
            launch(scatter, tasks, gos, pack([gos, gxs, tidx, twt]))
