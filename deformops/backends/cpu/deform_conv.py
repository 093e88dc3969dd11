"""Numba CPU kernels of ``deform_conv2d`` (DCNv1/v2) and its gradients, tiled.

The output pixels of the batch, flattened as (n, p), are cut into tiles of T columns: whole
images when an image has at most ``T`` pixels, else pieces of one image. For each tile:

1. ``_tile_taps``: the bilinear taps of every (offset group g, kernel tap k, column j), with the
   zero-padding rule of torchvision (``mode='grid-constant'``, ``cval=0``), and the mask;
2. forward: ``_to_channels_last`` copies the tile's images to (H*W, Cin) (once per image), and
   ``_im2row`` samples ``rows[gr, j, k*cpg_w + c] = mask * bilinear(x[n, c], y, x)``: each tap
   reads a run of contiguous channels, so the channel loop is a vector loop;
3. ``_rows_matmul_store``: ``rows @ W`` per conv group by blocks of ROW_BLOCK rows (one BLAS
   call each, Numba's np.dot), each block stored transposed into the NCHW output (+ bias).

The backward recomputes the taps and NCHW columns ``col[c*K + k, j]`` (``_im2col``) of a tile,
then ``_backward_matmuls``: ``grad_Wᵀ = col @ grad_outᵀ`` and ``grad_col = Wᵀ @ grad_out`` by
blocks of COL_BLOCK rows; ``_col2im`` scatters grad_col into grad_input with one task per block
of input channels (no two threads write one element), and ``_offset_mask_grad`` sums over the
channels of a group for each (g, k, j) (no atomics).

Every matmul runs single-threaded BLAS inside Numba's parallel loops, on blocks that do not
depend on the thread count: results are bit-identical for any number of Numba threads, and no
thread of another pool competes with Numba's workers (which spin-wait between loops, for
300000 rounds by default when torch's OpenMP runtime was loaded first).

Workspace per call (bytes, s = itemsize, K = kh*kw, G offset groups), bounded independently of
N: ``T * (s * (Cin*K + Cout) + G*K*(32 + 9*s)) + s * Cin*H*W*max(1, T // P)`` for the forward
(the last term: the tile's images channels last), plus ``T * s * (Cin*K + Cout + 8*G*K)`` for
the backward, with ``T = clamp(TILE_BYTES / (s * (Cin*K + Cout)), 64, max(N*P, 64))`` and
TILE_BYTES = 8 MiB (about 19 MB in all at the benchmark shapes).
"""

import functools
import threading

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot; loaded before BLAS is limited)
from numba import njit, prange

from ._taps import corner_slopes, corner_taps, zero_padding_taps

# Budget of the column tile (col and the matmul output), in bytes.
TILE_BYTES = 8 << 20
# Columns per task of the tap and offset-gradient loops.
CHUNK = 64
# Rows per task (and per BLAS call) of the forward's matmul.
ROW_BLOCK = 256
# Rows of the column matrix per task (and per BLAS call) of the backward's matmuls.
COL_BLOCK = 64


@njit(parallel=True, cache=True)
def _tile_taps(offset, mask, has_mask, n0, Tp, p0, T, Wo, H, W, kh, kw, stride, padding,
               dilation, idx, wt, wm, msk, empty, slopes, ay, ax):
    """Taps of columns j < T of the tile: image n0 + j // Tp, output pixel p0 + j % Tp.

    idx, wt, wm = wt * msk, ay, ax: (G, K, 4, T); msk, empty: (G, K, T). ``empty`` is 2 for
    samples with no corner inside the image, 1 for samples that torchvision's rule sets to 0
    (y <= -1, y >= H, x <= -1 or x >= W) although a corner with weight 0 is inside, else 0;
    the value of a flagged sample is 0 without reading any pixel. Offset channel of (g, k) is
    g*2K + 2k (dy) and +1 (dx); mask channel g*K + k (torchvision's order).
    """
    K = kh * kw
    G = idx.shape[0]
    nchunks = (T + CHUNK - 1) // CHUNK
    for task in prange(G * K * nchunks):
        g = task // (K * nchunks)
        k = (task // nchunks) % K
        j0 = (task % nchunks) * CHUNK
        ki, kj = k // kw, k % kw
        # column j is image n, pixel p = (oy, ox); advanced by counting, not dividing
        n, q = n0 + j0 // Tp, j0 % Tp
        p = p0 + q
        oy, ox = p // Wo, p % Wo
        for j in range(j0, min(j0 + CHUNK, T)):
            y = oy * stride[0] - padding[0] + ki * dilation[0] + np.float64(offset[n, g * 2 * K + 2 * k, p])
            x = ox * stride[1] - padding[1] + kj * dilation[1] + np.float64(offset[n, g * 2 * K + 2 * k + 1, p])
            ya, xa = zero_padding_taps(y, x, H, W)
            i0, i1, i2, i3, w0, w1, w2, w3, _, no_corner = corner_taps(ya, xa, W, 0.0)
            # 2: no corner inside; 1: outside by torchvision's cutoff (y <= -1 ...), which
            # zeroes the value but keeps the derivative from the corner inside; 0: inside
            outside = not (y > -1.0 and y < H and x > -1.0 and x < W)
            empty[g, k, j] = 2 if no_corner else (1 if outside else 0)
            idx[g, k, 0, j], idx[g, k, 1, j], idx[g, k, 2, j], idx[g, k, 3, j] = i0, i1, i2, i3
            wt[g, k, 0, j], wt[g, k, 1, j], wt[g, k, 2, j], wt[g, k, 3, j] = w0, w1, w2, w3
            m = mask[n, g * K + k, p] if has_mask else 1.0
            msk[g, k, j] = m
            wm[g, k, 0, j], wm[g, k, 1, j], wm[g, k, 2, j], wm[g, k, 3, j] = w0 * m, w1 * m, w2 * m, w3 * m
            if slopes:
                a0, a1, a2, a3, b0, b1, b2, b3, _, _ = corner_slopes(ya, xa, 0.0)
                ay[g, k, 0, j], ay[g, k, 1, j], ay[g, k, 2, j], ay[g, k, 3, j] = a0, a1, a2, a3
                ax[g, k, 0, j], ax[g, k, 1, j], ax[g, k, 2, j], ax[g, k, 3, j] = b0, b1, b2, b3
            q += 1
            p += 1
            ox += 1
            if ox == Wo:
                ox = 0
                oy += 1
            if q == Tp:
                q, n, p = 0, n + 1, p0
                oy, ox = p0 // Wo, p0 % Wo


@njit(cache=True)
def _channel_block(task, cpg):
    """Channels [c0, c1) of parallel task ``task``: blocks of up to 4 channels of one group."""
    nbpg = (cpg + 3) // 4
    g = task // nbpg
    c0 = g * cpg + (task % nbpg) * 4
    return g, c0, min(c0 + 4, (g + 1) * cpg)


@njit(parallel=True, cache=True)
def _to_channels_last(x, n0, nimg, xh):
    """xh[b, i, c] = x[n0 + b, c, i] for b < nimg: images (Cin, H*W) to (H*W, Cin)."""
    Cin, HW = x.shape[1], x.shape[2]
    nblocks = (HW + CHUNK - 1) // CHUNK
    for task in prange(nimg * nblocks):
        b = task // nblocks
        i0 = (task % nblocks) * CHUNK
        i1 = min(i0 + CHUNK, HW)
        dst = xh[b]
        for c in range(Cin):
            src = x[n0 + b, c]
            for i in range(i0, i1):
                dst[i, c] = src[i]


@njit(parallel=True, cache=True)
def _im2row(xh, Tp, t, idx, wm, empty, rows):
    """rows[gr, j, k*cpg_w + c'] = sum_t wm * xh[j // Tp, idx, gr*cpg_w + c'] for the tile's
    columns j < t (conv group gr, its channel c', tap k), 0 where ``empty`` is set.

    ``xh`` holds the tile's images channels last, so each tap reads (and each row writes) runs
    of contiguous channels: the channel loop is a vector loop. One task per chunk of columns.
    """
    Cin = xh.shape[2]
    G, K = idx.shape[0], idx.shape[1]
    cpg = Cin // G
    cpg_w = Cin // rows.shape[0]
    nchunks = (t + CHUNK - 1) // CHUNK
    for task in prange(nchunks):
        for j in range(task * CHUNK, min(task * CHUNK + CHUNK, t)):
            src = xh[j // Tp]
            for g in range(G):
                for k in range(K):
                    c, c_end = g * cpg, (g + 1) * cpg
                    while c < c_end:  # runs of channels of one conv group
                        gr = c // cpg_w
                        n = min(c_end, (gr + 1) * cpg_w) - c
                        # loops from 0 over slices: provably non-negative indices, no
                        # wraparound checks, so LLVM vectorizes them
                        start = k * cpg_w + c - gr * cpg_w
                        d = rows[gr, j, start:start + n]
                        if empty[g, k, j]:  # the gather read pixels with weight 0
                            for i in range(n):
                                d[i] = 0.0
                        else:
                            r0 = src[idx[g, k, 0, j], c:c + n]
                            r1 = src[idx[g, k, 1, j], c:c + n]
                            r2 = src[idx[g, k, 2, j], c:c + n]
                            r3 = src[idx[g, k, 3, j], c:c + n]
                            w0, w1 = wm[g, k, 0, j], wm[g, k, 1, j]
                            w2, w3 = wm[g, k, 2, j], wm[g, k, 3, j]
                            for i in range(n):
                                d[i] = w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]
                        c += n


@njit(cache=True)
def _store_rows(res, lo, hi, Tp, p0, bias, has_bias, o0, of):
    """of[j // Tp, o0 + o, p0 + j % Tp] = res[j, o] (+ bias) for rows lo <= j < hi: a
    transposed store in blocks of 16 rows, so that each block is read from L1 and each output
    line is written whole."""
    Cout_g = res.shape[1]
    j0 = lo
    while j0 < hi:
        b = j0 // Tp
        j1 = min(hi, j0 + 16, (b + 1) * Tp)  # rows of one image
        q0 = p0 + j0 - b * Tp
        m = j1 - j0
        block = res[j0:j1]
        for o in range(Cout_g):
            add = bias[o0 + o] if has_bias else 0.0
            d = of[b, o0 + o, q0:q0 + m]  # indices from 0: no wraparound checks
            for i in range(m):
                d[i] = block[i, o] + add
        j0 = j1


@njit(parallel=True, cache=True)
def _rows_matmul_store(rows, w_rows, res, t, Tp, p0, bias, has_bias, of):
    """res[gr, j] = rows[gr, j] @ w_rows[gr] for rows j < t, stored transposed into ``of``
    (nimg, Cout, P) at output channels of conv group gr (+ bias).

    One task per block of ROW_BLOCK rows: a single-threaded BLAS call per conv group (Numba's
    np.dot), then the store while the block is in cache. The blocks do not depend on the number
    of threads, so neither does the result. BLAS runs on the threads of Numba's pool, which are
    spinning anyway between parallel loops.
    """
    groups, Cout_g = rows.shape[0], w_rows.shape[2]
    for blk in prange((t + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = blk * ROW_BLOCK
        hi = min(t, lo + ROW_BLOCK)
        for gr in range(groups):
            np.dot(rows[gr, lo:hi], w_rows[gr], res[gr, lo:hi])
            _store_rows(res[gr], lo, hi, Tp, p0, bias, has_bias, gr * Cout_g, of)


@njit(parallel=True, cache=True)
def _backward_matmuls(w_t, go, col, grad_col, grad_w_t, need_w, need_col):
    """Per conv group gr: grad_col[gr] = w_t[gr] @ go[gr] and grad_w_t[gr] = col[gr] @ go[gr]ᵀ
    (w_t: (groups, Kc, Cout_g); go: (groups, Cout_g, t); col, grad_col: (groups, Kc, t)).

    One task per (gr, block of COL_BLOCK rows): single-threaded BLAS (Numba's np.dot) on the
    threads of Numba's pool. The blocks do not depend on the number of threads, so neither does
    the result.
    """
    groups, Kc = w_t.shape[0], w_t.shape[1]
    nblocks = (Kc + COL_BLOCK - 1) // COL_BLOCK
    for task in prange(groups * nblocks):
        gr = task // nblocks
        lo = (task % nblocks) * COL_BLOCK
        hi = min(Kc, lo + COL_BLOCK)
        if need_col:
            np.dot(w_t[gr, lo:hi], go[gr], grad_col[gr, lo:hi])
        if need_w:
            np.dot(col[gr, lo:hi], go[gr].T, grad_w_t[gr, lo:hi])


@njit(parallel=True, cache=True)
def _im2col(x, n0, nimg, Tp, idx, wm, empty, col):
    """col[c*K + k, j] = sum_t wm * x[n, c, idx] (wm: weights times mask) for the tile's columns,
    and 0 where ``empty`` is set (see :func:`_tile_taps`; the gather read pixels with weight 0).

    One task per block of four channels of a group, which share each load of the taps.
    """
    Cin = x.shape[1]
    G, K = idx.shape[0], idx.shape[1]
    cpg = Cin // G
    for task in prange(G * ((cpg + 3) // 4)):
        g, c0, c1 = _channel_block(task, cpg)
        for b in range(nimg):
            for k in range(K):
                ti, tw = idx[g, k], wm[g, k]
                if c1 - c0 == 4:
                    s0, s1, s2, s3 = x[n0 + b, c0], x[n0 + b, c0 + 1], x[n0 + b, c0 + 2], x[n0 + b, c0 + 3]
                    r0, r1, r2, r3 = col[c0 * K + k], col[(c0 + 1) * K + k], col[(c0 + 2) * K + k], col[(c0 + 3) * K + k]
                    for jj in range(Tp):
                        j = b * Tp + jj
                        i0, i1, i2, i3 = ti[0, j], ti[1, j], ti[2, j], ti[3, j]
                        w0, w1, w2, w3 = tw[0, j], tw[1, j], tw[2, j], tw[3, j]
                        r0[j] = w0 * s0[i0] + w1 * s0[i1] + w2 * s0[i2] + w3 * s0[i3]
                        r1[j] = w0 * s1[i0] + w1 * s1[i1] + w2 * s1[i2] + w3 * s1[i3]
                        r2[j] = w0 * s2[i0] + w1 * s2[i1] + w2 * s2[i2] + w3 * s2[i3]
                        r3[j] = w0 * s3[i0] + w1 * s3[i1] + w2 * s3[i2] + w3 * s3[i3]
                else:
                    for c in range(c0, c1):
                        src = x[n0 + b, c]
                        row = col[c * K + k]
                        for jj in range(Tp):
                            j = b * Tp + jj
                            row[j] = (tw[0, j] * src[ti[0, j]] + tw[1, j] * src[ti[1, j]]
                                      + tw[2, j] * src[ti[2, j]] + tw[3, j] * src[ti[3, j]])
                te = empty[g, k]
                for jj in range(Tp):
                    if te[b * Tp + jj]:
                        for c in range(c0, c1):
                            col[c * K + k, b * Tp + jj] = 0.0


@njit(parallel=True, cache=True)
def _col2im(grad_col, n0, nimg, Tp, idx, wm, grad_x):
    """grad_x[n, c] += scatter of grad_col[c*K + k, j] * wm (weights times mask).

    One task per block of four channels of a group: no two threads write one element.
    """
    Cin = grad_x.shape[1]
    G, K = idx.shape[0], idx.shape[1]
    cpg = Cin // G
    for task in prange(G * ((cpg + 3) // 4)):
        g, c0, c1 = _channel_block(task, cpg)
        for b in range(nimg):
            for k in range(K):
                ti, tw = idx[g, k], wm[g, k]
                if c1 - c0 == 4:
                    d0, d1, d2, d3 = (grad_x[n0 + b, c0], grad_x[n0 + b, c0 + 1],
                                      grad_x[n0 + b, c0 + 2], grad_x[n0 + b, c0 + 3])
                    r0, r1, r2, r3 = (grad_col[c0 * K + k], grad_col[(c0 + 1) * K + k],
                                      grad_col[(c0 + 2) * K + k], grad_col[(c0 + 3) * K + k])
                    for jj in range(Tp):
                        j = b * Tp + jj
                        i0, i1, i2, i3 = ti[0, j], ti[1, j], ti[2, j], ti[3, j]
                        w0, w1, w2, w3 = tw[0, j], tw[1, j], tw[2, j], tw[3, j]
                        v = r0[j]
                        d0[i0] += w0 * v
                        d0[i1] += w1 * v
                        d0[i2] += w2 * v
                        d0[i3] += w3 * v
                        v = r1[j]
                        d1[i0] += w0 * v
                        d1[i1] += w1 * v
                        d1[i2] += w2 * v
                        d1[i3] += w3 * v
                        v = r2[j]
                        d2[i0] += w0 * v
                        d2[i1] += w1 * v
                        d2[i2] += w2 * v
                        d2[i3] += w3 * v
                        v = r3[j]
                        d3[i0] += w0 * v
                        d3[i1] += w1 * v
                        d3[i2] += w2 * v
                        d3[i3] += w3 * v
                else:
                    for c in range(c0, c1):
                        dst = grad_x[n0 + b, c]
                        row = grad_col[c * K + k]
                        for jj in range(Tp):
                            j = b * Tp + jj
                            v = row[j]
                            dst[ti[0, j]] += tw[0, j] * v
                            dst[ti[1, j]] += tw[1, j] * v
                            dst[ti[2, j]] += tw[2, j] * v
                            dst[ti[3, j]] += tw[3, j] * v


@njit(parallel=True, cache=True)
def _offset_mask_grad(x, grad_col, n0, Tp, p0, T, idx, wt, msk, empty, ay, ax, grad_offset,
                      grad_mask, need_offset, need_mask):
    """Offset and mask gradients of the tile's columns: one task per (g, k, chunk of columns)
    sums over the channels of group g (no atomics). grad_offset: (N, 2GK, P); grad_mask:
    (N, GK, P).

    Per column only the four corner sums S_t = sum_c grad_col[c*K + k, j] * x[n, c, idx_t] are
    accumulated (four channels at a time, sharing the loads of the taps); d/dy, d/dx and the
    mask gradient are then their dot products with ay, ax and wt.
    """
    Cin = x.shape[1]
    G, K = idx.shape[0], idx.shape[1]
    cpg = Cin // G
    nchunks = (T + CHUNK - 1) // CHUNK
    for task in prange(G * K * nchunks):
        g = task // (K * nchunks)
        k = (task // nchunks) % K
        j0 = (task % nchunks) * CHUNK
        j1 = min(j0 + CHUNK, T)
        ti, tw, ta, tb = idx[g, k], wt[g, k], ay[g, k], ax[g, k]
        S = np.zeros((4, CHUNK), x.dtype)
        for n in range(n0 + j0 // Tp, n0 + (j1 - 1) // Tp + 1):
            ja, jb = max(j0, (n - n0) * Tp), min(j1, (n - n0 + 1) * Tp)  # columns of image n
            c, c_end = g * cpg, (g + 1) * cpg
            while c + 4 <= c_end:
                s0, s1, s2, s3 = x[n, c], x[n, c + 1], x[n, c + 2], x[n, c + 3]
                r0, r1 = grad_col[c * K + k], grad_col[(c + 1) * K + k]
                r2, r3 = grad_col[(c + 2) * K + k], grad_col[(c + 3) * K + k]
                for j in range(ja, jb):
                    i0, i1, i2, i3 = ti[0, j], ti[1, j], ti[2, j], ti[3, j]
                    g0, g1, g2, g3 = r0[j], r1[j], r2[j], r3[j]
                    jj = j - j0
                    S[0, jj] += g0 * s0[i0] + g1 * s1[i0] + g2 * s2[i0] + g3 * s3[i0]
                    S[1, jj] += g0 * s0[i1] + g1 * s1[i1] + g2 * s2[i1] + g3 * s3[i1]
                    S[2, jj] += g0 * s0[i2] + g1 * s1[i2] + g2 * s2[i2] + g3 * s3[i2]
                    S[3, jj] += g0 * s0[i3] + g1 * s1[i3] + g2 * s2[i3] + g3 * s3[i3]
                c += 4
            while c < c_end:
                src, row = x[n, c], grad_col[c * K + k]
                for j in range(ja, jb):
                    gc = row[j]
                    jj = j - j0
                    S[0, jj] += gc * src[ti[0, j]]
                    S[1, jj] += gc * src[ti[1, j]]
                    S[2, jj] += gc * src[ti[2, j]]
                    S[3, jj] += gc * src[ti[3, j]]
                c += 1
        n, q = n0 + j0 // Tp, j0 % Tp  # column j is image n, pixel p0 + q
        for j in range(j0, j1):
            jj = j - j0
            p = p0 + q
            s0, s1, s2, s3 = S[0, jj], S[1, jj], S[2, jj], S[3, jj]
            code = empty[g, k, j]  # see _tile_taps; the sums of flagged samples read pixel 0
            if need_offset:
                m = msk[g, k, j] if code < 2 else 0.0
                if code == 2:
                    s0 = s1 = s2 = s3 = 0.0
                grad_offset[n, g * 2 * K + 2 * k, p] = m * (ta[0, j] * s0 + ta[1, j] * s1
                                                            + ta[2, j] * s2 + ta[3, j] * s3)
                grad_offset[n, g * 2 * K + 2 * k + 1, p] = m * (tb[0, j] * s0 + tb[1, j] * s1
                                                                + tb[2, j] * s2 + tb[3, j] * s3)
            if need_mask:
                grad_mask[n, g * K + k, p] = 0.0 if code else (tw[0, j] * s0 + tw[1, j] * s1
                                                               + tw[2, j] * s2 + tw[3, j] * s3)
            q += 1
            if q == Tp:
                q, n = 0, n + 1


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    """Context: BLAS on one thread per caller while a call runs.

    Idle BLAS threads spin-wait after each matmul and steal the cores that the Numba kernels
    between the matmuls run on (measured: 3x slower on 2 cores), so BLAS runs single-threaded
    (NumPy's and SciPy's, which Numba's np.dot calls) and the kernels split each product into
    blocks among Numba's threads. The previous limits are restored.
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def _tiles(N, P, T):
    """(n0, nimg, p0, Tp) tiles covering the N*P output columns, at most T columns each."""
    if P <= T:
        per = max(1, T // P)
        return [(n0, min(per, N - n0), 0, P) for n0 in range(0, N, per)]
    return [(n, 1, p0, min(T, P - p0)) for n in range(N) for p0 in range(0, P, T)]


class _Workspace:
    """Tile buffers of a call, allocated once and reused by every tile."""

    def __init__(self, dtype, Cin, Cout, G, K, T, slopes, backward, groups=1):
        self.key = (np.dtype(dtype), Cin, Cout, G, K, T, slopes, backward, groups)
        self.idx = np.empty((G, K, 4, T), np.uintp)
        self.wt = np.empty((G, K, 4, T), dtype)
        self.wm = np.empty((G, K, 4, T), dtype)
        self.msk = np.empty((G, K, T), dtype)
        self.empty = np.empty((G, K, T), np.uint8)
        shape = (G, K, 4, T) if slopes else (1, 1, 4, 1)
        self.ay, self.ax = np.empty(shape, dtype), np.empty(shape, dtype)
        if backward:  # flat: each tile views exactly its t columns (contiguous for BLAS)
            self.col = np.empty(Cin * K * T, dtype)
            self.res = np.empty(Cout * T, dtype)
            self.grad_col = np.empty(Cin * K * T, dtype)
        else:  # the forward's columns are rows: (conv group, column, tap and channel)
            self.rows = np.empty((groups, T, Cin * K // groups), dtype)
            self.res = np.empty((groups, T, Cout // groups), dtype)
        self._images = np.empty(0, dtype)

    def images(self, nimg, HW, Cin):
        """A (nimg, HW, Cin) buffer for a tile's images channels last (kept between calls)."""
        if self._images.size < nimg * HW * Cin:
            self._images = np.empty(nimg * HW * Cin, self._images.dtype)
        return self._images[:nimg * HW * Cin].reshape(nimg, HW, Cin)


_last_workspace = threading.local()


def _workspace(dtype, Cin, Cout, G, K, T, slopes, backward, groups=1):
    """The calling thread's workspace for these sizes, kept from its previous call when they
    are the same: fresh buffers of several MB cost page faults on every call (about 10% of a
    small convolution). Each thread holds at most one forward and one backward workspace."""
    key = (np.dtype(dtype), Cin, Cout, G, K, T, slopes, backward, groups)
    slot = "backward" if backward else "forward"
    ws = getattr(_last_workspace, slot, None)
    if ws is None or ws.key != key:
        ws = _Workspace(*key)
        setattr(_last_workspace, slot, ws)
    return ws


def tile_columns(dtype, Cin, Cout, K, P):
    """Columns per tile: about TILE_BYTES of col and matmul output, at least 64."""
    per_column = np.dtype(dtype).itemsize * (Cin * K + Cout)
    return int(min(max(TILE_BYTES // max(per_column, 1), 64), max(P, 64)))


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


def deform_conv2d_forward(x, offset, weight, bias, mask, stride, padding, dilation, out):
    """Fill ``out`` (N, Cout, Ho, Wo) from contiguous NCHW arrays (offset/mask as (N, ., P)).

    Per tile: taps, the tile's images channels last (once per image), ``rows = im2row``
    (groups, T, K*Cin/groups), then ``rows @ W`` by blocks of rows, each block stored
    transposed into ``out`` (+ bias).
    """
    N, Cin, H, W = x.shape
    Cout, cpg_w, kh, kw = weight.shape
    Ho, Wo = out.shape[2], out.shape[3]
    K, P = kh * kw, Ho * Wo
    groups = Cin // cpg_w
    G = offset.shape[1] // (2 * K)
    T = tile_columns(x.dtype, Cin, Cout, K, N * P)
    ws = _workspace(x.dtype, Cin, Cout, G, K, T, False, False, groups)
    w_rows = _weight_rows(weight, groups)
    xf = x.reshape(N, Cin, H * W)
    of = out.reshape(N, Cout, P)
    has_bias = bias is not None
    bias_vec = bias if has_bias else np.zeros(1, x.dtype)
    held = None  # (n0, nimg) of the images in the channels-last buffer
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            t = nimg * Tp
            _taps(ws, offset, mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding, dilation,
                  False)
            xh = ws.images(nimg, H * W, Cin)
            if held != (n0, nimg):  # the pieces of one image share its copy
                _to_channels_last(xf, n0, nimg, xh)
                held = (n0, nimg)
            _im2row(xh, Tp, t, ws.idx, ws.wm, ws.empty, ws.rows)  # full buffers: one type
            _rows_matmul_store(ws.rows, w_rows, ws.res, t, Tp, p0, bias_vec, has_bias,
                               of[n0:n0 + nimg])


def deform_conv2d_backward(grad_out, x, offset, weight, mask, stride, padding, dilation,
                           grad_x, grad_offset, grad_weight, grad_mask):
    """Fill the requested gradients (None = not needed); bias gradient is the caller's."""
    N, Cin, H, W = x.shape
    Cout, cpg_w, kh, kw = weight.shape
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    K, P = kh * kw, Ho * Wo
    groups = Cin // cpg_w
    G = offset.shape[1] // (2 * K)
    need_x, need_offset = grad_x is not None, grad_offset is not None
    need_w, need_mask = grad_weight is not None, grad_mask is not None
    need_col_grad = need_x or need_offset or need_mask
    slopes = need_offset
    T = tile_columns(x.dtype, Cin, Cout, K, N * P)
    ws = _workspace(x.dtype, Cin, Cout, G, K, T, slopes, True)
    Kc, Cout_g = cpg_w * K, Cout // groups
    w_t = np.ascontiguousarray(weight.reshape(groups, Cout_g, Kc).transpose(0, 2, 1))
    xf = x.reshape(N, Cin, H * W)
    gof = grad_out.reshape(N, Cout, P)
    gxf = None
    if need_x:
        grad_x[...] = 0
        gxf = grad_x.reshape(N, Cin, H * W)
    dummy = np.empty((1, 1, 1), x.dtype)
    gw_t = np.empty((groups, Kc, Cout_g), x.dtype) if need_w else dummy
    if need_w:
        grad_weight[...] = 0
        gwg = grad_weight.reshape(groups, Cout_g, Kc)
    gof_off = grad_offset.reshape(N, 2 * G * K, P) if need_offset else dummy
    gof_msk = grad_mask.reshape(N, G * K, P) if need_mask else dummy
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            t = nimg * Tp
            _taps(ws, offset, mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding, dilation, slopes)
            go = ws.res[:Cout * t].reshape(Cout, t)
            go.reshape(Cout, nimg, Tp)[...] = gof[n0:n0 + nimg, :, p0:p0 + Tp].transpose(1, 0, 2)
            col = ws.col[:Cin * K * t].reshape(Cin * K, t)
            gcol = ws.grad_col[:Cin * K * t].reshape(Cin * K, t)
            if need_w:
                _im2col(xf, n0, nimg, Tp, ws.idx, ws.wm, ws.empty, col)
            _backward_matmuls(w_t, go.reshape(groups, Cout_g, t),
                              col.reshape(groups, Kc, t) if need_w else dummy,
                              gcol.reshape(groups, Kc, t) if need_col_grad else dummy,
                              gw_t, need_w, need_col_grad)
            if need_w:
                gwg += gw_t.transpose(0, 2, 1)
            if need_x:
                _col2im(gcol, n0, nimg, Tp, ws.idx, ws.wm, gxf)
            if need_offset or need_mask:
                _offset_mask_grad(xf, gcol, n0, Tp, p0, t, ws.idx, ws.wt, ws.msk, ws.empty,
                                  ws.ay, ws.ax, gof_off, gof_msk, need_offset, need_mask)
