"""Numba CPU kernels of ``deform_conv2d`` (DCNv1/v2) and its gradients, tiled, channels last.

The output pixels of the batch, flattened as (n, p), are cut into tiles of at most T columns:
whole images when an image has at most ``T`` pixels, else pieces of one image (tiles of equal
size). Each tile's images are copied channels last once (``_rows_of``; NHWC arrays are read
as they are), so that every sample of a tap reads a run of contiguous channels and the channel
loops are vector loops.

Forward, ``_forward_tile``, by blocks of at most ROW_BLOCK columns (one task per thread, each
with its own block buffers, which stay in the core's cache): for each (offset group g, kernel
tap k) the bilinear taps of the block's columns, with torchvision's zero-padding rule
(``mode='grid-constant'``, ``cval=0``) and the mask, in a vector loop (``_cells``), and the
block's im2col rows, ``rows[gr, j, k*cpg_w + c] = mask * bilinear(x[n, gr*cpg_w + c], y, x)``
(conv group gr); then ``rows @ W`` per conv group, stored transposed into the NCHW output, or
as it is into an NHWC one (+ bias).

Backward, per tile:

1. ``_tile_taps``: the taps of the whole tile, stored column by column (with their derivatives
   when the offset gradient is needed), and ``_im2row``: the tile's rows (weight gradient
   only);
2. ``_backward_rows``: ``grad_rows = grad_out @ Wᵀ`` and the weight gradient's part
   ``rowsᵀ @ grad_out`` per block of rows (parts summed in block order);
3. ``_row2im`` scatters grad_rows into the input gradient of the tile's images, channels last,
   with one task per run of channels (no two threads write one element), written back to NCHW
   once per image (``_rows_to_images``); ``_offset_mask_grad`` reduces grad_rows with the
   images over the channels of each offset group for each (g, k, j) (no atomics).

Depthwise convolutions (one input channel per conv group, ``groups = Cin > 1``, any channel
multiplier) would make every conv group's matmul one of inner size K (a single input channel)
and every channel run one channel long. Their rows are laid out channels last instead, as one
conv group's (``rows[j, k*Cin + c]``), and the matmuls are vector loops over the channels:
``_forward_tile_depthwise`` for the forward, ``_backward_rows_depthwise`` for step 2 of the
backward (step 1 writes, and step 3 reads, these rows as those of one conv group). Against the
general kernels: forward 6-11x, forward + backward 5-12x faster (N=8, 64-256 channels, one
offset group).

Every matmul runs single-threaded BLAS (Numba's np.dot) inside Numba's parallel loops, on blocks
that do not depend on the thread count: results are bit-identical for any number of Numba
threads, and no thread of another pool competes with Numba's workers (which spin-wait between
loops, for 300000 rounds by default when torch's OpenMP runtime was loaded first).

Workspace per call (bytes, s = itemsize, K = kh*kw, G offset groups, R = Numba's thread count,
I = Cin*H*W*max(1, T//P) for the tile's images), bounded independently of N: ``R * s *
ROW_BLOCK * (Cin*K + Cout + 4) + s*I`` for the forward (+ about 23 KB of scratch per thread
for the taps of a block); for the backward ``T * (s * (2*Cin*K +
Cout) + G*K*(33 + 17*s)) + 2*s*I + s * 2*ceil(T/2048) * Cin*K*Cout/groups``, with ``T =
clamp(TILE_BYTES / max(s * (Cin*K + Cout), B), 64, max(N*P, 64))``, B = 0 for the forward and
G*K*(33 + 17*s) for the backward, TILE_BYTES = 8 MiB and ROW_BLOCK = 256 (forward 2–7 MB on 2
threads, backward 19–21 MB at the benchmark shapes). Each thread
keeps the workspace of its last call (:func:`release_workspaces` frees it).
"""

import contextlib
import functools
import itertools
import os
import threading

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot; loaded before BLAS is limited)
from numba import njit, prange

from . import _threads as threads
from ._taps import corner_slopes, corner_taps, zero_padding_cell, zero_padding_taps
from ._threads import parallel_kernel

# Budget of the column tile (col and the matmul output), in bytes.
TILE_BYTES = 8 << 20
# Columns per task of the tap and offset-gradient loops.
CHUNK = 64
# Most rows of a block of the forward (its im2col rows, and one BLAS call per conv group).
ROW_BLOCK = 256
# Columns per task of the backward's taps (tasks for two threads even when a tile is short).
TAP_CHUNK = 16
# Twice the longest row block of the backward's matmuls (see _grad_blocks).
GRAD_BLOCK = 2048


@njit(cache=True, inline="always")
def _column_taps(offset, mask, has_mask, n, p, cy, cx, g, ki, kj, k, K, H, W, dilation):
    """Bilinear taps of offset group g, kernel tap k = (ki, kj) at output pixel p of image n,
    whose kernel has its top left corner at (cy, cx) (:func:`_columns`; the caller passes k
    with ki and kj: integer divisions cost more than the taps):
    ``(i0, i1, i2, i3, w0, w1, w2, w3, m, empty, ya, xa)``: corner indices into the H*W plane
    and weights, the mask m (1 without one), the axis taps ``ya, xa`` (for the derivatives) and
    ``empty`` 2 for a sample with no corner inside the image, 1 for one that torchvision's rule
    sets to 0 (y <= -1, y >= H, x <= -1 or x >= W) although a corner with weight 0 is inside,
    else 0; the value of a flagged sample is 0 without reading any pixel. Offset channel of
    (g, k) is g*2K + 2k (dy) and +1 (dx); mask channel g*K + k (torchvision's order)."""
    c = g * 2 * K + 2 * k
    y = cy + ki * dilation[0] + np.float64(offset[n, c, p])
    x = cx + kj * dilation[1] + np.float64(offset[n, c + 1, p])
    ya, xa = zero_padding_taps(y, x, H, W)
    i0, i1, i2, i3, w0, w1, w2, w3, _, no_corner = corner_taps(ya, xa, W, 0.0)
    outside = not (y > -1.0 and y < H and x > -1.0 and x < W)
    m = np.float64(mask[n, g * K + k, p]) if has_mask else 1.0
    return (i0, i1, i2, i3, w0, w1, w2, w3, m, 2 if no_corner else (1 if outside else 0), ya,
            xa)


@njit(cache=True, inline="always")
def _columns(n0, Tp, p0, lo, hi, Wo, stride, padding, cn, cp, cy, cx):
    """Where the tile's columns lo <= j < hi sample, for r = j - lo: image ``cn[r] = n0 + j //
    Tp``, output pixel ``cp[r] = p0 + j % Tp`` = (oy, ox), and the kernel's top left corner
    there, ``cy[r] = oy*stride_h - pad_h``, ``cx[r] = ox*stride_w - pad_w`` (advanced by
    counting: integer divisions cost more than the taps)."""
    b = lo // Tp
    p = p0 + lo - b * Tp
    oy = p // Wo
    ox = p - oy * Wo
    for r in range(hi - lo):
        cn[r], cp[r] = n0 + b, p
        cy[r], cx[r] = oy * stride[0] - padding[0], ox * stride[1] - padding[1]
        p += 1
        ox += 1
        if ox == Wo:
            ox, oy = 0, oy + 1
        if p == p0 + Tp:
            b, p = b + 1, p0
            oy, ox = p0 // Wo, p0 % Wo


@njit(cache=True, inline="always")
def _points(offset, mask, has_mask, g, k, K, dy, dx, m, cn, cp, cy, cx, ys, xs, ms):
    """The sample points of offset group g, kernel tap k (at (dy, dx) = (ki*dil_h, kj*dil_w) in
    the kernel) in columns r < m (:func:`_columns`): ``ys[r]``, ``xs[r]``, and the mask
    ``ms[r]`` (1 without one). Offset channel g*2K + 2k (Δy) and +1 (Δx), mask channel g*K + k
    (torchvision's order). Gathered into arrays so that the taps' loop vectorizes."""
    c = g * 2 * K + 2 * k
    for r in range(m):
        n, p = cn[r], cp[r]
        ys[r] = np.float64(cy[r] + dy) + np.float64(offset[n, c, p])
        xs[r] = np.float64(cx[r] + dx) + np.float64(offset[n, c + 1, p])
        ms[r] = np.float64(mask[n, g * K + k, p]) if has_mask else 1.0


@njit(cache=True)
def _cells(ys, xs, ms, m, H, W, idx, wm, code):
    """The taps of points r < m (:func:`zero_padding_cell`) for the forward: idx (4, m), wm
    (4, m) = weight * mask in the data's type (as a stored tap holds them), code (m,). A
    function of its own: inlined into the kernel, its loop was not vectorized."""
    for r in range(m):
        i0, i1, i2, i3, w0, w1, w2, w3, e = zero_padding_cell(ys[r], xs[r], H, W)
        idx[0, r], idx[1, r], idx[2, r], idx[3, r] = i0, i1, i2, i3
        mk = ms[r]
        wm[0, r], wm[1, r], wm[2, r], wm[3, r] = w0 * mk, w1 * mk, w2 * mk, w3 * mk
        code[r] = e


@parallel_kernel(cache=True)
def _tile_taps(offset, mask, has_mask, n0, Tp, p0, T, Wo, H, W, kh, kw, stride, padding,
               dilation, idx, wt, wm, msk, empty, slopes, ay, ax):
    """Taps of columns j < T of the tile (image n0 + j // Tp, output pixel p0 + j % Tp),
    stored for the backward's kernels: idx, wt, wm = wt * msk (0 where flagged), ay, ax (the
    derivative weights, with ``slopes``): (T, G, K, 4); msk, empty: (T, G, K) (see
    :func:`_column_taps`). One task per chunk of TAP_CHUNK columns, column by column: each
    tap's fields lie next to the previous tap's, as the kernels that read them go column by
    column (with tables (G, K, 4, T) the offset and mask gradients read a tap's 18 fields from
    18 cache lines, which no longer stayed in L1 with many offset groups). Writing the tables
    bounds this kernel (about 100 bytes per tap): the forward's vector loop of taps
    (:func:`_cells`) made it no faster, and its branch-free taps one at a time 4-10% slower."""
    K = kh * kw
    G = idx.shape[1]
    nchunks = (T + TAP_CHUNK - 1) // TAP_CHUNK
    for task in prange(nchunks):
        j0 = task * TAP_CHUNK
        j1 = min(j0 + TAP_CHUNK, T)
        cn, cp = np.empty(TAP_CHUNK, np.intp), np.empty(TAP_CHUNK, np.intp)
        cy, cx = np.empty(TAP_CHUNK, np.intp), np.empty(TAP_CHUNK, np.intp)
        _columns(n0, Tp, p0, j0, j1, Wo, stride, padding, cn, cp, cy, cx)
        for j in range(j0, j1):
            r = j - j0
            ti, tw, twm, tm, te = idx[j], wt[j], wm[j], msk[j], empty[j]
            for g in range(G):
                for ki in range(kh):
                    for kj in range(kw):
                        k = ki * kw + kj
                        i0, i1, i2, i3, w0, w1, w2, w3, m, e, ya, xa = _column_taps(
                            offset, mask, has_mask, cn[r], cp[r], cy[r], cx[r], g, ki, kj, k,
                            K, H, W, dilation)
                        te[g, k] = e
                        ti[g, k, 0], ti[g, k, 1], ti[g, k, 2], ti[g, k, 3] = i0, i1, i2, i3
                        tw[g, k, 0], tw[g, k, 1], tw[g, k, 2], tw[g, k, 3] = w0, w1, w2, w3
                        tm[g, k] = m
                        # a flagged sample's value is 0 whatever x: no input gradient (not
                        # even 0 * NaN)
                        mx = m if e == 0 else 0.0
                        twm[g, k, 0], twm[g, k, 1] = w0 * mx, w1 * mx
                        twm[g, k, 2], twm[g, k, 3] = w2 * mx, w3 * mx
                        if slopes:
                            a0, a1, a2, a3, b0, b1, b2, b3, _, _ = corner_slopes(ya, xa, 0.0)
                            ay[j, g, k, 0], ay[j, g, k, 1] = a0, a1
                            ay[j, g, k, 2], ay[j, g, k, 3] = a2, a3
                            ax[j, g, k, 0], ax[j, g, k, 1] = b0, b1
                            ax[j, g, k, 2], ax[j, g, k, 3] = b2, b3


@parallel_kernel(cache=True)
def _rows_of(src, n0, nimg, p0, Tp, dst):
    """dst[c // Cg, b*Tp + q, c % Cg] = src[n0 + b, c, p0 + q] for b < nimg, q < Tp:
    channels-first pixels (N, C, P) to rows (groups, pixel, channel of the group), with
    ``Cg = dst.shape[2]``. One task per image and chunk of pixels."""
    C, Cg = src.shape[1], dst.shape[2]
    nblocks = (Tp + CHUNK - 1) // CHUNK
    for task in prange(nimg * nblocks):
        b = task // nblocks
        q0 = (task % nblocks) * CHUNK
        q1 = min(q0 + CHUNK, Tp)
        for c in range(C):
            s_ = src[n0 + b, c, p0 + q0:p0 + q1]  # slices from 0: no wraparound checks
            d = dst[c // Cg, b * Tp + q0:b * Tp + q1, c % Cg]
            for i in range(q1 - q0):
                d[i] = s_[i]


@parallel_kernel(cache=True)
def _rows_to_images(src, n0, dst):
    """dst[n0 + b, c, i] = src[b, i, c]: images channels last (nimg, HW, C) back to
    channels first. One task per image and chunk of channels."""
    nimg, HW, C = src.shape
    nblocks = (C + 15) // 16
    for task in prange(nimg * nblocks):
        b = task // nblocks
        c0 = (task % nblocks) * 16
        for c in range(c0, min(c0 + 16, C)):
            d = dst[n0 + b, c]
            s_ = src[b, :, c]
            for i in range(HW):
                d[i] = s_[i]


@parallel_kernel(cache=True)
def _im2row(xh, Tp, t, idx, wm, empty, runs, first, rows):
    """rows[gr, j, k*cpg_w + c'] = sum_t wm * xh[j // Tp, idx, gr*cpg_w + c'] for the tile's
    columns j < t (conv group gr, its channel c', tap k), 0 where ``empty`` is set; ``runs``
    and ``first``: the channel runs of each offset group (:func:`_group_runs`).

    ``xh`` holds the tile's images channels last, so each tap reads (and each row writes) runs
    of contiguous channels: the channel loop is a vector loop. One task per chunk of columns.
    """
    G, K = idx.shape[1], idx.shape[2]
    cpg_w = xh.shape[2] // rows.shape[0]
    nchunks = (t + CHUNK - 1) // CHUNK
    for task in prange(nchunks):
        for j in range(task * CHUNK, min(task * CHUNK + CHUNK, t)):
            src = xh[j // Tp]
            for g in range(G):
                for k in range(K):
                    for r in range(first[g], first[g + 1]):
                        c, n, gr = runs[r, 0], runs[r, 1], runs[r, 2]
                        start = k * cpg_w + runs[r, 3]
                        # loops from 0 over slices: provably non-negative indices, no
                        # wraparound checks, so LLVM vectorizes them
                        d = rows[gr, j, start:start + n]
                        if empty[j, g, k]:  # the gather read pixels with weight 0
                            for i in range(n):
                                d[i] = 0.0
                        else:
                            r0 = src[idx[j, g, k, 0], c:c + n]
                            r1 = src[idx[j, g, k, 1], c:c + n]
                            r2 = src[idx[j, g, k, 2], c:c + n]
                            r3 = src[idx[j, g, k, 3], c:c + n]
                            w0, w1 = wm[j, g, k, 0], wm[j, g, k, 1]
                            w2, w3 = wm[j, g, k, 2], wm[j, g, k, 3]
                            for i in range(n):
                                d[i] = w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]


@njit(cache=True)
def _store_rows(res, lo, hi, Tp, p0, bias, has_bias, o0, of):
    """of[j // Tp, o0 + o, p0 + j % Tp] = res[j - lo, o] (+ bias) for columns lo <= j < hi: a
    transposed store in blocks of 16 rows, so that each block is read from L1 and each output
    line is written whole."""
    Cout_g = res.shape[1]
    j0 = lo
    while j0 < hi:
        b = j0 // Tp
        j1 = min(hi, j0 + 16, (b + 1) * Tp)  # rows of one image
        q0 = p0 + j0 - b * Tp
        m = j1 - j0
        block = res[j0 - lo:j1 - lo]
        for o in range(Cout_g):
            add = bias[o0 + o] if has_bias else 0.0
            d = of[b, o0 + o, q0:q0 + m]  # indices from 0: no wraparound checks
            for i in range(m):
                d[i] = block[i, o] + add
        j0 = j1


@njit(cache=True)
def _store_rows_nhwc(res, lo, hi, Tp, p0, bias, has_bias, o0, of):
    """of[j // Tp, p0 + j % Tp, o0 + o] = res[j - lo, o] (+ bias) for columns lo <= j < hi:
    the output channels last, one contiguous line per row."""
    Cout_g = res.shape[1]
    for j in range(lo, hi):
        b = j // Tp
        d = of[b, p0 + j - b * Tp, o0:o0 + Cout_g]
        r = res[j - lo]
        for o in range(Cout_g):
            d[o] = r[o] + (bias[o0 + o] if has_bias else 0.0)


@njit(cache=True, inline="always")
def _row_blocks(t):
    """Row blocks of the forward for a tile of t columns: an even number of equal blocks of at
    most ROW_BLOCK rows (an even count keeps two threads equally busy). It depends on t only,
    so every BLAS call, and the result, is the same for any number of threads."""
    return 2 * ((t + 2 * ROW_BLOCK - 1) // (2 * ROW_BLOCK))


@parallel_kernel(cache=True)
def _forward_tile(xh, offset, mask, has_mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding,
                  dilation, runs, first, w_rows, bias, has_bias, of, channels_last, rows_ws,
                  res_ws, wm_ws):
    """The output of the tile's columns j < t (image n0 + j // Tp, pixel p0 + j % Tp), by
    blocks of rows.

    For each block (:func:`_row_blocks`) and each (offset group g, kernel tap k): the sample
    points of the block's columns (:func:`_points`) and their taps (:func:`_cells`, a vector
    loop: the forward 1.0-1.1x as fast at G = 1, 1.2-1.35x at G = 8, 1.3-1.45x at G = Cin as
    with the taps computed one sample at a time, N=8, 64 channels, 28x28), then the block's
    im2col rows,
    ``rows[gr, j - lo, k*cpg_w + c'] = mask * bilinear(x[n, gr*cpg_w + c'], y, x)`` (conv group
    gr, its channel c'), read from the images channels last ``xh`` (runs of contiguous
    channels: vector loops); then ``rows @ W`` per conv
    group (single-threaded BLAS, Numba's np.dot), stored transposed into ``of`` (nimg, Cout,
    P), or as it is into ``of`` (nimg, P, Cout) with ``channels_last`` (+ bias). ``offset``
    and ``mask`` are (N, ., P) views (strided for NHWC); ``runs``, ``first``: the channel runs
    of each offset group (:func:`_group_runs`). Slot s of the workspaces (rows_ws: (slots,
    groups, ROW_BLOCK, K*cpg_w), res_ws: (slots, groups, ROW_BLOCK, Cout_g), wm_ws: (slots,
    4, ROW_BLOCK), the taps' weights) serves blocks s, s + slots, ...: it stays in the core's
    cache, and no two tasks share one.
    """
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    groups = w_rows.shape[0]
    Cout_g = w_rows.shape[2]
    cpg_w = xh.shape[2] // groups
    slots = rows_ws.shape[0]
    nblocks = _row_blocks(t)
    kij = np.empty((K, 2), np.intp)
    for k in range(K):
        kij[k, 0], kij[k, 1] = k // kw, k % kw
    for s in prange(slots):
        rows, res, wm = rows_ws[s], res_ws[s], wm_ws[s]
        cn, cp = np.empty(ROW_BLOCK, np.intp), np.empty(ROW_BLOCK, np.intp)
        cy, cx = np.empty(ROW_BLOCK, np.intp), np.empty(ROW_BLOCK, np.intp)
        ys, xs, ms = np.empty(ROW_BLOCK), np.empty(ROW_BLOCK), np.empty(ROW_BLOCK)
        idx, code = np.empty((4, ROW_BLOCK), np.intp), np.empty(ROW_BLOCK, np.uint8)
        for blk in range(s, nblocks, slots):
            lo, hi = blk * t // nblocks, (blk + 1) * t // nblocks
            _columns(n0, Tp, p0, lo, hi, Wo, stride, padding, cn, cp, cy, cx)
            for g in range(G):
                for k in range(K):
                    _points(offset, mask, has_mask, g, k, K, kij[k, 0] * dilation[0],
                            kij[k, 1] * dilation[1], hi - lo, cn, cp, cy, cx, ys, xs, ms)
                    _cells(ys, xs, ms, hi - lo, H, W, idx, wm, code)
                    for r in range(hi - lo):
                        src = xh[cn[r] - n0]
                        i0, i1, i2, i3 = idx[0, r], idx[1, r], idx[2, r], idx[3, r]
                        v0, v1, v2, v3 = wm[0, r], wm[1, r], wm[2, r], wm[3, r]
                        for q in range(first[g], first[g + 1]):
                            c, n, gr = runs[q, 0], runs[q, 1], runs[q, 2]
                            start = k * cpg_w + runs[q, 3]
                            # loops from 0 over slices: provably non-negative indices, no
                            # wraparound checks, so LLVM vectorizes them
                            d = rows[gr, r, start:start + n]
                            if code[r]:  # 0 without reading a pixel
                                for i in range(n):
                                    d[i] = 0.0
                            else:
                                r0, r1 = src[i0, c:c + n], src[i1, c:c + n]
                                r2, r3 = src[i2, c:c + n], src[i3, c:c + n]
                                for i in range(n):
                                    d[i] = v0 * r0[i] + v1 * r1[i] + v2 * r2[i] + v3 * r3[i]
            for gr in range(groups):
                np.dot(rows[gr, :hi - lo], w_rows[gr], res[gr, :hi - lo])
                if channels_last:
                    _store_rows_nhwc(res[gr], lo, hi, Tp, p0, bias, has_bias, gr * Cout_g, of)
                else:
                    _store_rows(res[gr], lo, hi, Tp, p0, bias, has_bias, gr * Cout_g, of)


@parallel_kernel(cache=True)
def _forward_tile_depthwise(xh, offset, mask, has_mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride,
                            padding, dilation, w_taps, bias, has_bias, of, channels_last,
                            rows_ws, res_ws, wm_ws, acc_ws):
    """:func:`_forward_tile` for depthwise convolutions (one input channel per conv group,
    ``Cout = mult * Cin``), where each conv group's matmul has inner size K (one input channel)
    and each of its channel runs is one channel long.

    Per block: the im2col rows channels last, ``rows[r, k, c]`` (per offset group and tap, a
    vector loop over the group's channels), then ``res[r, c*mult + m] = sum_k rows[r, k, c] *
    w_taps[k, m, c]`` (vector loops over the channels, the taps summed in order k = 0..K-1), stored
    as :func:`_forward_tile` stores its result. Workspaces per slot: rows_ws (slots, ROW_BLOCK,
    K, Cin), res_ws (slots, ROW_BLOCK, Cout), wm_ws (slots, 4, ROW_BLOCK), acc_ws (slots, Cin).
    """
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    Cin = xh.shape[2]
    cpg = Cin // G
    mult = w_taps.shape[1]
    slots = rows_ws.shape[0]
    nblocks = _row_blocks(t)
    kij = np.empty((K, 2), np.intp)
    for k in range(K):
        kij[k, 0], kij[k, 1] = k // kw, k % kw
    for s in prange(slots):
        rows, res, wm, acc = rows_ws[s], res_ws[s], wm_ws[s], acc_ws[s]
        cn, cp = np.empty(ROW_BLOCK, np.intp), np.empty(ROW_BLOCK, np.intp)
        cy, cx = np.empty(ROW_BLOCK, np.intp), np.empty(ROW_BLOCK, np.intp)
        ys, xs, ms = np.empty(ROW_BLOCK), np.empty(ROW_BLOCK), np.empty(ROW_BLOCK)
        idx, code = np.empty((4, ROW_BLOCK), np.intp), np.empty(ROW_BLOCK, np.uint8)
        for blk in range(s, nblocks, slots):
            lo, hi = blk * t // nblocks, (blk + 1) * t // nblocks
            _columns(n0, Tp, p0, lo, hi, Wo, stride, padding, cn, cp, cy, cx)
            for g in range(G):
                c0 = g * cpg
                for k in range(K):
                    _points(offset, mask, has_mask, g, k, K, kij[k, 0] * dilation[0],
                            kij[k, 1] * dilation[1], hi - lo, cn, cp, cy, cx, ys, xs, ms)
                    _cells(ys, xs, ms, hi - lo, H, W, idx, wm, code)
                    for r in range(hi - lo):
                        d = rows[r, k, c0:c0 + cpg]
                        if code[r]:  # 0 without reading a pixel
                            for i in range(cpg):
                                d[i] = 0.0
                        else:
                            src = xh[cn[r] - n0]
                            r0, r1 = src[idx[0, r], c0:c0 + cpg], src[idx[1, r], c0:c0 + cpg]
                            r2, r3 = src[idx[2, r], c0:c0 + cpg], src[idx[3, r], c0:c0 + cpg]
                            v0, v1, v2, v3 = wm[0, r], wm[1, r], wm[2, r], wm[3, r]
                            for i in range(cpg):
                                d[i] = v0 * r0[i] + v1 * r1[i] + v2 * r2[i] + v3 * r3[i]
            for r in range(hi - lo):
                x_r, out_r = rows[r], res[r]
                for m in range(mult):
                    a, w0 = x_r[0], w_taps[0, m]
                    for c in range(Cin):
                        acc[c] = a[c] * w0[c]
                    for k in range(1, K):
                        a, wk = x_r[k], w_taps[k, m]
                        for c in range(Cin):
                            acc[c] += a[c] * wk[c]
                    for c in range(Cin):
                        out_r[c * mult + m] = acc[c]
            if channels_last:
                _store_rows_nhwc(res, lo, hi, Tp, p0, bias, has_bias, 0, of)
            else:
                _store_rows(res, lo, hi, Tp, p0, bias, has_bias, 0, of)


@njit(cache=True)
def _grad_blocks(t):
    """Row blocks of the backward's matmuls for a tile of t columns: an even number of equal
    blocks of at most GRAD_BLOCK rows. The weight gradient sums over the rows, so its BLAS
    calls run best on long blocks (measured on one core: 197 GFLOP/s at 1568 rows, 116 at
    256); an even count keeps two threads busy. It depends on t only, not on the threads."""
    return 2 * ((t + GRAD_BLOCK - 1) // GRAD_BLOCK)


@parallel_kernel(cache=True)
def _backward_rows(rows, go_rows, w_cols, grad_rows, gw_parts, t, need_w, need_rows):
    """Per conv group gr and block of rows lo..hi (:func:`_grad_blocks` equal blocks) of the tile:
    ``grad_rows[gr, lo:hi] = go_rows[gr, lo:hi] @ w_cols[gr]`` and the block's part of the
    weight gradient, ``gw_parts[blk, gr] = rows[gr, lo:hi]ᵀ @ go_rows[gr, lo:hi]``.

    rows, grad_rows: (groups, T, Kc); go_rows: (groups, T, Cout_g); w_cols: (groups, Cout_g,
    Kc); gw_parts: (blocks, groups, Kc, Cout_g). Single-threaded BLAS (Numba's np.dot) on the
    threads of Numba's pool, on blocks that do not depend on the number of threads.
    """
    groups = rows.shape[0]
    nblocks = _grad_blocks(t)
    for blk in prange(nblocks):
        lo, hi = blk * t // nblocks, (blk + 1) * t // nblocks
        for gr in range(groups):
            if need_rows:
                np.dot(go_rows[gr, lo:hi], w_cols[gr], grad_rows[gr, lo:hi])
            if need_w:
                np.dot(rows[gr, lo:hi].T, go_rows[gr, lo:hi], gw_parts[blk, gr])


@parallel_kernel(cache=True)
def _backward_rows_depthwise(rows, go_rows, w_taps, grad_rows, gw_parts, t, need_w, need_rows):
    """:func:`_backward_rows` for depthwise convolutions (one input channel per conv group,
    ``Cout = mult * Cin``), the rows laid out as one conv group's: ``rows``, ``grad_rows`` (1,
    T, K*Cin), entry ``k*Cin + c``; ``go_rows`` (1, T, Cout), channel ``c*mult + m``;
    ``w_taps`` (K, mult, Cin). Per block of rows lo..hi (:func:`_grad_blocks`):
    ``grad_rows[0, j, k*Cin + c] = sum_m go_rows[0, j, c*mult + m] * w_taps[k, m, c]`` and the
    block's part of the weight gradient, ``gw_parts[blk, k, m, c] = sum_j rows[0, j, k*Cin + c]
    * go_rows[0, j, c*mult + m]`` (j in order): vector loops over the channels, where the
    general kernel made matmuls of one input channel per conv group.
    """
    K, mult, Cin = w_taps.shape
    nblocks = _grad_blocks(t)
    for blk in prange(nblocks):
        lo, hi = blk * t // nblocks, (blk + 1) * t // nblocks
        go_t = np.empty((mult, Cin), rows.dtype)  # a row's grad_out by multiplier
        parts = gw_parts[blk]
        if need_w:
            for k in range(K):
                for m in range(mult):
                    p = parts[k, m]
                    for c in range(Cin):
                        p[c] = 0.0
        for j in range(lo, hi):
            go = go_rows[0, j]
            for m in range(mult):
                gm = go_t[m]
                for c in range(Cin):
                    gm[c] = go[c * mult + m]
            if need_rows:
                g = grad_rows[0, j]
                for k in range(K):
                    d, w0, g0 = g[k * Cin:(k + 1) * Cin], w_taps[k, 0], go_t[0]
                    for c in range(Cin):
                        d[c] = g0[c] * w0[c]
                    for m in range(1, mult):
                        wk, gm = w_taps[k, m], go_t[m]
                        for c in range(Cin):
                            d[c] += gm[c] * wk[c]
            if need_w:
                a = rows[0, j]
                for k in range(K):
                    src = a[k * Cin:(k + 1) * Cin]
                    for m in range(mult):
                        p, gm = parts[k, m], go_t[m]
                        for c in range(Cin):
                            p[c] += src[c] * gm[c]


@parallel_kernel(cache=True)
def _row2im(grad_rows, Tp, t, idx, wm, runs, G, grad_xh):
    """grad_xh[j // Tp, idx, c] += wm * grad_rows[gr, j, k*cpg_w + c'] for every column j < t,
    tap k and corner: the scatter of the input gradient, channels last.

    One task per run of channels (``runs``: (start, end) within one offset group and one conv
    group, at most 32 or 64 channels): no two threads write one element, and each corner
    update is a vector loop over the run. Corners of weight 0 (samples that read no pixel
    point at pixel 0) add nothing, also where ``grad_out`` is not finite, as in the CUDA
    kernels.
    """
    Cin = grad_xh.shape[2]
    K = idx.shape[2]
    cpg, cpg_w = Cin // G, Cin // grad_rows.shape[0]
    for task in prange(runs.shape[0]):
        c0, c1 = runs[task, 0], runs[task, 1]
        g, gr = c0 // cpg, c0 // cpg_w
        n = c1 - c0
        for j in range(t):
            dst = grad_xh[j // Tp]
            for k in range(K):
                start = k * cpg_w + c0 - gr * cpg_w
                v = grad_rows[gr, j, start:start + n]
                for corner in range(4):
                    w = wm[j, g, k, corner]
                    if w != 0.0:
                        d = dst[idx[j, g, k, corner], c0:c1]
                        for i in range(n):
                            d[i] += w * v[i]


@njit(cache=True, inline="always")
def _corner_sum(c0, c1, c2, c3, s0, u, v, w, along_y):
    """``sum_t c_t S_t`` over the corners 00, 01, 10, 11 (``S_t`` a corner's sum over the
    channels) from ``S_0`` and three sums of neighbouring pixels' differences: with
    ``along_y``, ``(u, v, w) = (D_x0, D_y0, D_y1)`` and the sum is ``C S_0 + (c1 + c3) u + c2 v
    + c3 w``; else ``(D_x0, D_y0, D_x1)`` and ``C S_0 + c1 u + (c2 + c3) v + c3 w`` (``C = c0 +
    c1 + c2 + c3``; ``D_x0 = S_01 - S_00``, ``D_x1 = S_11 - S_10``, ``D_y0 = S_10 - S_00``,
    ``D_y1 = S_11 - S_01``, each summed from the pixels' differences). The coefficients' sums
    are taken in float64: for a derivative along y (x) inside the image, C and c1 + c3
    (c2 + c3) are exactly 0, and the large S_0 and the differences across the derivative add
    nothing, not even their rounding."""
    C = np.float64(c0) + np.float64(c1) + np.float64(c2) + np.float64(c3)
    if along_y:
        a, b = np.float64(c1) + np.float64(c3), np.float64(c2)
    else:
        a, b = np.float64(c1), np.float64(c2) + np.float64(c3)
    r = np.float64(c3) * w
    if a != 0.0:
        r += a * u
    if b != 0.0:
        r += b * v
    if C != 0.0:
        r += C * s0
    return r


@parallel_kernel(cache=True, fastmath={"reassoc"})
def _offset_mask_grad(xh, grad_rows, n0, Tp, p0, t, idx, wt, msk, empty, ay, ax, runs, first,
                      grad_offset, grad_mask, need_offset, need_mask, zero):
    """Offset and mask gradients of the tile's columns, channels last: for each (column j,
    offset group g, tap k) sums over the channels of g (dot products over contiguous runs) of
    ``grad_rows[., j, .]`` with the four corners' pixels, then d/dy, d/dx and the mask gradient
    as their dot products with ay, ax and wt. The sums are kept as the first corner's and four
    of neighbouring pixels' differences (:func:`_corner_sum`): the derivatives are small
    differences of the corners' sums where the image has a large mean (raw pixels, activations
    after a ReLU) or a steep edge across the derivative, and float32 sums of the corners
    themselves lost them (a relative error of 1e-3 to 1e-1 at a mean of 1000); neighbouring
    pixels' differences are exact, as in torchvision's per-channel differences. Where a sum is
    not finite (an infinite pixel: Inf - Inf) the corners' own sums are taken instead, which
    keep such a gradient infinite rather than NaN. One task per chunk of columns (no atomics).
    ``runs``, ``first``: the channel runs of each offset group (:func:`_group_runs`);
    grad_offset: (N, 2GK, P); grad_mask: (N, GK, P); ``zero``: 0 in the dtype of the sums. The
    sums may be reassociated (vectorized); their order depends only on the channel count, not
    on the threads.
    """
    Cin = xh.shape[2]
    G, K = idx.shape[1], idx.shape[2]
    cpg_w = Cin // grad_rows.shape[0]
    for task in prange((t + CHUNK - 1) // CHUNK):
        for j in range(task * CHUNK, min(task * CHUNK + CHUNK, t)):
            b = j // Tp
            n, p = n0 + b, p0 + j - b * Tp
            src = xh[b]
            for g in range(G):
                for k in range(K):
                    code = empty[j, g, k]  # see _tile_taps: flagged samples have value 0
                    s0 = dx0 = dy0 = dy1 = dx1 = zero
                    if code < 2:
                        for q in range(first[g], first[g + 1]):
                            c, m, gr = runs[q, 0], runs[q, 1], runs[q, 2]
                            start = k * cpg_w + runs[q, 3]
                            v = grad_rows[gr, j, start:start + m]
                            r0 = src[idx[j, g, k, 0], c:c + m]
                            r1 = src[idx[j, g, k, 1], c:c + m]
                            r2 = src[idx[j, g, k, 2], c:c + m]
                            r3 = src[idx[j, g, k, 3], c:c + m]
                            for i in range(m):
                                vi, a0, a1, a2, a3 = v[i], r0[i], r1[i], r2[i], r3[i]
                                s0 += vi * a0
                                dx0 += vi * (a1 - a0)
                                dy0 += vi * (a2 - a0)
                                dy1 += vi * (a3 - a1)
                                dx1 += vi * (a3 - a2)
                    finite = np.isfinite(s0 + dx0 + dy0 + dy1 + dx1)
                    s1 = s2 = s3 = zero
                    if not finite:  # the corners' own sums (s0 is the first's)
                        for q in range(first[g], first[g + 1]):
                            c, m, gr = runs[q, 0], runs[q, 1], runs[q, 2]
                            start = k * cpg_w + runs[q, 3]
                            v = grad_rows[gr, j, start:start + m]
                            r1 = src[idx[j, g, k, 1], c:c + m]
                            r2 = src[idx[j, g, k, 2], c:c + m]
                            r3 = src[idx[j, g, k, 3], c:c + m]
                            for i in range(m):
                                s1 += v[i] * r1[i]
                                s2 += v[i] * r2[i]
                                s3 += v[i] * r3[i]
                    if need_offset:  # a sample that reads no pixel has derivative 0
                        mk = msk[j, g, k] if code < 2 else zero
                        c0, c1, c2, c3 = ay[j, g, k, 0], ay[j, g, k, 1], ay[j, g, k, 2], \
                            ay[j, g, k, 3]
                        gy = (_corner_sum(c0, c1, c2, c3, s0, dx0, dy0, dy1, True) if finite
                              else c0 * s0 + c1 * s1 + c2 * s2 + c3 * s3)
                        c0, c1, c2, c3 = ax[j, g, k, 0], ax[j, g, k, 1], ax[j, g, k, 2], \
                            ax[j, g, k, 3]
                        gx = (_corner_sum(c0, c1, c2, c3, s0, dx0, dy0, dx1, False) if finite
                              else c0 * s0 + c1 * s1 + c2 * s2 + c3 * s3)
                        grad_offset[n, g * 2 * K + 2 * k, p] = mk * gy
                        grad_offset[n, g * 2 * K + 2 * k + 1, p] = mk * gx
                    if need_mask:
                        c0, c1, c2, c3 = wt[j, g, k, 0], wt[j, g, k, 1], wt[j, g, k, 2], \
                            wt[j, g, k, 3]
                        gm = (_corner_sum(c0, c1, c2, c3, s0, dx0, dy0, dy1, True) if finite
                              else c0 * s0 + c1 * s1 + c2 * s2 + c3 * s3)
                        grad_mask[n, g * K + k, p] = 0.0 if code else gm


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _take_blas_control():
    """Let the calling thread set OpenBLAS' limits. threadpoolctl (3.6 and later) ignores, without
    a word, limits set by any thread but the first that set one while that thread is alive
    (OpenBLAS' pthreads pool is process-wide): a call from a second thread then ran its
    matmuls on all of BLAS' threads, with other sums than the same call from the first."""
    from threadpoolctl import OpenBLASController

    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        try:
            clear(force=True)
        except TypeError:  # a version without force=: only the controlling thread may clear
            clear()


_blas_lock = threading.Lock()
_blas_calls = [0, None]  # calls inside _one_blas_thread, and their limiter


def _reset_blas_state_in_child():
    """After a fork: a child forked while another thread was inside a call inherited the lock
    held by a thread that does not exist here (its first call waited forever) and BLAS on one
    thread, with no call left to restore it (NumPy's matmuls stayed single-threaded). Both
    start afresh."""
    global _blas_lock
    _blas_lock = threading.Lock()
    limiter, _blas_calls[0], _blas_calls[1] = _blas_calls[1], 0, None
    if limiter is not None:
        _take_blas_control()
        limiter.restore_original_limits()
        _take_blas_control()


os.register_at_fork(after_in_child=_reset_blas_state_in_child)


@contextlib.contextmanager
def _one_blas_thread():
    """Context: BLAS on one thread per caller while a call runs.

    Idle BLAS threads spin-wait after each matmul and steal the cores that the Numba kernels
    between the matmuls run on (measured: 3x slower on 2 cores), so BLAS runs single-threaded
    (NumPy's and SciPy's, which Numba's np.dot calls) and the kernels split each product into
    blocks among Numba's threads. The limit is process-wide, so calls from several threads share
    it: the first to enter sets it, the last to leave restores the previous limits (each
    restoring its own, out of order, once left BLAS on one thread for good).
    """
    with _blas_lock:
        if _blas_calls[0] == 0:
            _take_blas_control()
            _blas_calls[1] = _blas_controller().limit(limits=1, user_api="blas")
        _blas_calls[0] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_calls[0] -= 1
            if _blas_calls[0] == 0:
                _take_blas_control()  # the last call to leave may run on another thread
                _blas_calls[1].restore_original_limits()
                _blas_calls[1] = None
                _take_blas_control()  # and the user's threads may set limits again


def _tiles(N, P, T):
    """(n0, nimg, p0, Tp) tiles covering the N*P output columns, at most T columns each, of
    sizes as equal as possible (so that no small last tile leaves a thread idle)."""
    if P <= T:
        ntiles = -(-N // max(1, T // P))
        cuts = [i * N // ntiles for i in range(ntiles + 1)]
        return [(n0, n1 - n0, 0, P) for n0, n1 in itertools.pairwise(cuts)]
    npieces = -(-P // T)
    cuts = [i * P // npieces for i in range(npieces + 1)]
    return [(n, 1, p0, p1 - p0) for n in range(N) for p0, p1 in itertools.pairwise(cuts)]


class _Workspace:
    """Tile buffers of a call, allocated once and reused by every tile.

    Forward: per slot of :func:`_forward_tile` (one per thread), a block's rows, its matmul
    result and the four weights of each of its columns' taps. Backward: the taps of a tile
    (column by column), its im2col rows, grad_out and grad_rows as rows, and the weight
    gradient's parts.
    """

    def __init__(self, dtype, Cin, Cout, G, K, T, slopes, backward, groups=1, slots=1,
                 depthwise=False):
        self.key = (np.dtype(dtype), Cin, Cout, G, K, T, slopes, backward, groups, slots,
                    depthwise)
        Kc, Cout_g = Cin * K // groups, Cout // groups
        if not backward:
            self.rows = np.empty((slots, groups, ROW_BLOCK, Kc), dtype)
            self.res = np.empty((slots, groups, ROW_BLOCK, Cout_g), dtype)
            self.wm = np.empty((slots, 4, ROW_BLOCK), dtype)
        else:
            # column-major tables: a column's taps are contiguous, as the kernels that read
            # them go column by column
            self.idx = np.empty((T, G, K, 4), np.uintp)
            self.wt = np.empty((T, G, K, 4), dtype)
            self.wm = np.empty((T, G, K, 4), dtype)
            self.msk = np.empty((T, G, K), dtype)
            self.empty = np.empty((T, G, K), np.uint8)
            shape = (T, G, K, 4) if slopes else (1, 1, 1, 4)
            self.ay, self.ax = np.empty(shape, dtype), np.empty(shape, dtype)
            # the im2col matrix as rows: (conv group, column, tap and channel of the group)
            self.rows = np.empty((groups, T, Kc), dtype)
            self.go_rows = np.empty((groups, T, Cout_g), dtype)
            self.grad_rows = np.empty((groups, T, Kc), dtype)
            nblocks = 2 * ((T + GRAD_BLOCK - 1) // GRAD_BLOCK)  # _grad_blocks(T)
            # depthwise (rows laid out as one conv group): (blocks, tap, multiplier, channel)
            parts = (K, Cout // Cin, Cin) if depthwise else (groups, Kc, Cout_g)
            self.gw_parts = np.empty((nblocks, *parts), dtype)
        self._images = {"x": np.empty(0, dtype), "grad": np.empty(0, dtype)}

    def _image_buffer(self, name, nimg, HW, Cin):
        size = nimg * HW * Cin
        if self._images[name].size < size:
            self._images[name] = np.empty(size, self._images[name].dtype)
        return self._images[name][:size].reshape(nimg, HW, Cin)

    def images(self, nimg, HW, Cin):
        """A (nimg, HW, Cin) buffer for a tile's images channels last (kept between calls)."""
        return self._image_buffer("x", nimg, HW, Cin)

    def grad_images(self, nimg, HW, Cin):
        """The same for their input gradient (backward)."""
        return self._image_buffer("grad", nimg, HW, Cin)


_last_workspace = threading.local()


def _workspace(dtype, Cin, Cout, G, K, T, slopes, backward, groups=1, slots=1, depthwise=False):
    """The calling thread's workspace for these sizes, kept from its previous call when they
    are the same: fresh buffers of several MB cost page faults on every call (about 10% of a
    small convolution). Each thread holds at most one forward and one backward workspace."""
    key = (np.dtype(dtype), Cin, Cout, G, K, T, slopes, backward, groups, slots, depthwise)
    slot = "backward" if backward else "forward"
    ws = getattr(_last_workspace, slot, None)
    if ws is None or ws.key != key:
        ws = _Workspace(*key)
        setattr(_last_workspace, slot, ws)
    return ws


def release_workspaces():
    """Free the workspaces that the calling thread kept from its last calls."""
    for slot in ("forward", "backward"):
        if hasattr(_last_workspace, slot):
            delattr(_last_workspace, slot)


def tile_columns(dtype, Cin, Cout, K, P, GK=0):
    """Columns per tile, at least 64: at most TILE_BYTES of col and matmul output, and at most
    TILE_BYTES of the backward's tap tables (``GK`` = G*K taps per column, 33 + 17*itemsize
    bytes each). (With the first bound alone, a conv with few channels per offset group held
    25 times the budget in its tap tables: 209 MB for one channel at 512x512.)"""
    s = np.dtype(dtype).itemsize
    per_column = max(s * (Cin * K + Cout), GK * (33 + 17 * s), 1)
    return int(min(max(TILE_BYTES // per_column, 64), max(P, 64)))


def _taps(ws, offset, mask, n0, Tp, p0, T, Wo, H, W, kh, kw, stride, padding, dilation,
          slopes):
    has_mask = mask is not None
    _tile_taps(offset, mask if has_mask else offset, has_mask, n0, Tp, p0, T, Wo, H, W, kh, kw,
               stride, padding, dilation, ws.idx, ws.wt, ws.wm, ws.msk, ws.empty, slopes, ws.ay,
               ws.ax)


def _weight_rows(weight, groups):
    """(groups, K*cpg_w, Cout/groups): W of each conv group as the right factor of rows @ W,
    its rows in the order (tap, channel) of :func:`_im2row`."""
    Cout, cpg_w, kh, kw = weight.shape
    w = weight.reshape(groups, Cout // groups, cpg_w, kh * kw)
    return np.ascontiguousarray(w.transpose(0, 3, 2, 1)).reshape(groups, kh * kw * cpg_w,
                                                                  Cout // groups)


def _channels_first_view(a):
    """(N, P, C) channels last as the (N, C, P) view the kernels index (strided)."""
    return None if a is None else a.transpose(0, 2, 1)


def _sizes(x, out, offset, mask, channels_last):
    """((N, Cin, H, W), (Ho, Wo), offset, mask) of a call: the sizes from x and the output (or
    its gradient) in either layout, offset and mask as the (N, ., P) views the kernels index."""
    if channels_last:
        N, H, W, Cin = x.shape
        return ((N, Cin, H, W), out.shape[1:3], _channels_first_view(offset),
                _channels_first_view(mask))
    return x.shape, out.shape[2:4], offset, mask


def deform_conv2d_forward(x, offset, weight, bias, mask, stride, padding, dilation, out,
                          channels_last=False):
    """Fill ``out`` (N, Cout, Ho, Wo) from contiguous NCHW arrays (offset/mask as (N, ., P)),
    or, with ``channels_last``, ``out`` (N, Ho, Wo, Cout) from contiguous NHWC ones (x (N, H,
    W, Cin), offset/mask (N, P, .)), read and written as they are.

    Per tile: the tile's images channels last (a copy once per image for NCHW, the input
    itself for NHWC), then :func:`_forward_tile`: by blocks of rows, the taps, the block's
    im2col rows and ``rows @ W``, stored into ``out`` (+ bias).
    """
    (N, Cin, H, W), (Ho, Wo), offset, mask = _sizes(x, out, offset, mask, channels_last)
    Cout, cpg_w, kh, kw = weight.shape
    K, P = kh * kw, Ho * Wo
    groups = Cin // cpg_w
    G = offset.shape[1] // (2 * K)
    T = tile_columns(x.dtype, Cin, Cout, K, N * P)
    ws = _workspace(x.dtype, Cin, Cout, G, K, T, False, False, groups, threads.count())
    of = out.reshape(N, P, Cout) if channels_last else out.reshape(N, Cout, P)
    has_mask, has_bias = mask is not None, bias is not None
    bias_vec = bias if has_bias else np.zeros(1, x.dtype)
    depthwise = groups > 1 and cpg_w == 1
    if not depthwise:
        runs, first = _group_runs(Cin, G, groups)
        w_rows = _weight_rows(weight, groups)
    else:  # the same buffers, channels last
        slots = ws.rows.shape[0]
        rows_dw = ws.rows.reshape(slots, ROW_BLOCK, K, Cin)
        res_dw = ws.res.reshape(slots, ROW_BLOCK, Cout)
        acc_dw = np.empty((slots, Cin), x.dtype)
        w_taps = np.ascontiguousarray(weight.reshape(Cin, Cout // Cin, K).transpose(2, 1, 0))
    held = None  # (n0, nimg) of the images in the channels-last buffer
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            if channels_last:
                xh = x.reshape(N, H * W, Cin)[n0:n0 + nimg]
            else:
                xh = ws.images(nimg, H * W, Cin)
                if held != (n0, nimg):  # the pieces of one image share its copy
                    _rows_of(x.reshape(N, Cin, H * W), n0, nimg, 0, H * W,
                             xh.reshape(1, nimg * H * W, Cin))
                    held = (n0, nimg)
            if depthwise:
                _forward_tile_depthwise(xh, offset, mask if has_mask else offset, has_mask, n0,
                                        Tp, p0, nimg * Tp, Wo, H, W, kh, kw, stride, padding,
                                        dilation, w_taps, bias_vec, has_bias, of[n0:n0 + nimg],
                                        channels_last, rows_dw, res_dw, ws.wm, acc_dw)
                continue
            _forward_tile(xh, offset, mask if has_mask else offset, has_mask, n0, Tp, p0,
                          nimg * Tp, Wo, H, W, kh, kw, stride, padding, dilation, runs, first,
                          w_rows, bias_vec, has_bias, of[n0:n0 + nimg], channels_last, ws.rows,
                          ws.res, ws.wm)


def _group_runs(Cin, G, groups):
    """The channel runs of each offset group, cut where a conv group ends: ``(runs, first)``
    with ``runs[q] = (c, n, gr, c - gr*cpg_w)``, n channels from c in conv group gr, the runs
    of offset group g being ``first[g] <= q < first[g + 1]`` (a table, so that the kernels
    divide nothing per tap)."""
    cpg, cpg_w = Cin // G, Cin // groups
    runs, first = [], [0]
    for g in range(G):
        c0, c1 = g * cpg, (g + 1) * cpg
        cuts = sorted({c0, c1} | {c for c in range(0, Cin, cpg_w) if c0 < c < c1})
        runs += [(c, e - c, c // cpg_w, c - c // cpg_w * cpg_w) for c, e in itertools.pairwise(cuts)]
        first.append(len(runs))
    return np.array(runs, np.intp).reshape(-1, 4), np.array(first, np.intp)


def _channel_runs(Cin, cpg, cpg_w, width):
    """(start, end) runs of at most ``width`` channels, each within one offset group (``cpg``
    channels) and one conv group (``cpg_w``)."""
    cuts = sorted(set(range(0, Cin, cpg)) | set(range(0, Cin, cpg_w))
                  | set(range(0, Cin, width)) | {Cin})
    return np.array(list(itertools.pairwise(cuts)), np.intp)


def deform_conv2d_backward(grad_out, x, offset, weight, mask, stride, padding, dilation,
                           grad_x, grad_offset, grad_weight, grad_mask, channels_last=False):
    """Fill the requested gradients (None = not needed); bias gradient is the caller's.

    Arrays as :func:`deform_conv2d_forward` (NCHW, or NHWC with ``channels_last``, the
    gradients in the layout of their inputs). Per tile: taps (with their derivatives when the
    offset gradient is needed), the tile's images and grad_out channels last (copies for NCHW,
    views for NHWC), ``rows = im2row`` (weight gradient only), then ``grad_rows = grad_out @
    Wᵀ`` and the weight gradient by blocks of rows; grad_rows is scattered into the input
    gradient of the tile's images (channels last, written back to NCHW once per image) and
    reduced with the images into the offset and mask gradients.
    """
    (N, Cin, H, W), (Ho, Wo), offset, mask = _sizes(x, grad_out, offset, mask, channels_last)
    Cout, cpg_w, kh, kw = weight.shape
    K, P, HW = kh * kw, Ho * Wo, H * W
    groups = Cin // cpg_w
    G = offset.shape[1] // (2 * K)
    Cout_g = Cout // groups
    need_x, need_offset = grad_x is not None, grad_offset is not None
    need_w, need_mask = grad_weight is not None, grad_mask is not None
    need_rows = need_x or need_offset or need_mask
    need_images = need_w or need_offset or need_mask
    T = tile_columns(x.dtype, Cin, Cout, K, N * P, G * K)
    # Depthwise convolutions (one input channel per conv group) lay their rows out as one conv
    # group's, channels last (runs as long as the offset groups'), and replace the per-group
    # matmuls of one row by vector loops (_backward_rows_depthwise).
    depthwise = groups > 1 and cpg_w == 1
    lg = 1 if depthwise else groups  # the conv groups of the rows' layout
    ws = _workspace(x.dtype, Cin, Cout, G, K, T, need_offset, True, lg, depthwise=depthwise)
    if depthwise:
        w_taps = np.ascontiguousarray(weight.reshape(Cin, Cout // Cin, K).transpose(2, 1, 0))
    else:
        w_cols = np.ascontiguousarray(_weight_rows(weight, groups).transpose(0, 2, 1))
    dummy = np.empty((1, 1, 1), x.dtype)
    if channels_last:
        gof_off = _channels_first_view(grad_offset) if need_offset else dummy
        gof_msk = _channels_first_view(grad_mask) if need_mask else dummy
    else:
        gof_off = grad_offset.reshape(N, 2 * G * K, P) if need_offset else dummy
        gof_msk = grad_mask.reshape(N, G * K, P) if need_mask else dummy
    gxf = grad_x.reshape(N, Cin, HW) if need_x and not channels_last else None
    gw = np.zeros(ws.gw_parts.shape[1:], x.dtype) if need_w else None
    gw_parts = ws.gw_parts if need_w else np.empty((1, 1, 1, 1), x.dtype)
    # Scatter tasks: runs of 64 channels when there are enough for every thread, else 32
    # (shorter runs fall out of LLVM's vector loop: 16 measured 3x slower than 32). Which
    # task a channel is in does not change its sums.
    runs = _channel_runs(Cin, Cin // G, Cin // lg, 64 if Cin >= 64 * threads.count() else 32)
    group_runs, first = _group_runs(Cin, G, lg)
    held = None  # (n0, nimg) of the images in the channels-last buffers
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            t = nimg * Tp
            _taps(ws, offset, mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding, dilation,
                  need_offset)
            fresh = held != (n0, nimg)  # the pieces of one image share its buffers
            if fresh and need_x and held is not None and not channels_last:
                _rows_to_images(ws.grad_images(held[1], HW, Cin), held[0], gxf)  # done
            held = (n0, nimg)
            if channels_last:  # the arrays themselves are channels last
                xh = x.reshape(N, HW, Cin)[n0:n0 + nimg]
                gxh = grad_x.reshape(N, HW, Cin)[n0:n0 + nimg] if need_x else dummy
                go_tile = grad_out.reshape(N, P, Cout)[n0:n0 + nimg, p0:p0 + Tp]
                if lg == 1:
                    go_rows = go_tile.reshape(1, t, Cout)  # a view: whole images or one piece
                else:
                    go_rows = ws.go_rows
                    go_rows[:, :t] = go_tile.reshape(t, groups, Cout_g).transpose(1, 0, 2)
            else:
                xh = ws.images(nimg, HW, Cin)
                gxh = ws.grad_images(nimg, HW, Cin) if need_x else dummy
                if fresh and need_images:
                    _rows_of(x.reshape(N, Cin, HW), n0, nimg, 0, HW,
                             xh.reshape(1, nimg * HW, Cin))
                go_rows = ws.go_rows
                _rows_of(grad_out.reshape(N, Cout, P), n0, nimg, p0, Tp, go_rows)
            if fresh and need_x:
                gxh[...] = 0
            if need_w:
                _im2row(xh, Tp, t, ws.idx, ws.wm, ws.empty, group_runs, first, ws.rows)
            if depthwise:  # (the workspace's parts: one per block, needed or not)
                _backward_rows_depthwise(ws.rows, go_rows, w_taps, ws.grad_rows, ws.gw_parts,
                                         t, need_w, need_rows)
            else:
                _backward_rows(ws.rows, go_rows, w_cols, ws.grad_rows, gw_parts, t, need_w,
                               need_rows)
            if need_w:
                gw += gw_parts[:_grad_blocks(t)].sum(axis=0)
            if need_x:
                _row2im(ws.grad_rows, Tp, t, ws.idx, ws.wm, runs, G, gxh)
            if need_offset or need_mask:
                _offset_mask_grad(xh, ws.grad_rows, n0, Tp, p0, t, ws.idx, ws.wt, ws.msk,
                                  ws.empty, ws.ay, ws.ax, group_runs, first, gof_off, gof_msk,
                                  need_offset, need_mask, x.dtype.type(0))
        if need_x and held is not None and not channels_last:
            _rows_to_images(ws.grad_images(held[1], HW, Cin), held[0], gxf)
    if need_w and depthwise:  # gw[k, m, c] -> grad_weight[c*mult + m, 0, k]
        grad_weight[...] = gw.transpose(2, 1, 0).reshape(Cout, 1, kh, kw)
    elif need_w:
        grad_weight[...] = gw.reshape(groups, K, cpg_w, Cout_g).transpose(0, 3, 2, 1).reshape(
            Cout, cpg_w, kh, kw)
