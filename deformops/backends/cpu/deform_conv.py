"""Numba CPU kernels of ``deform_conv2d`` (DCNv1/v2) and its gradients, tiled.

The output pixels of the batch, flattened as (n, p), are cut into tiles of T columns: whole
images when an image has at most ``T`` pixels, else pieces of one image. For each tile:

1. ``_tile_taps``: the bilinear taps of every (offset group g, kernel tap k, column j), with the
   zero-padding rule of torchvision (``mode='grid-constant'``, ``cval=0``), and the mask;
2. ``_im2col``: columns ``col[c*K + k, j] = mask * bilinear(x[n, c], y, x)`` (parallel over
   blocks of four channels, which share each load of the taps);
3. a BLAS matmul per conv group: ``out[:, j] = W_g @ col_g`` (:func:`_matmul`: single-threaded
   BLAS calls on column blocks, one per thread).

The backward recomputes the taps and columns of a tile once, then ``grad_W += grad_out @ colᵀ``
and ``grad_col = Wᵀ @ grad_out``; ``_col2im`` scatters grad_col into grad_input with one task
per block of input channels (no two threads write one element), and ``_offset_mask_grad`` sums over the
channels of a group for each (g, k, j) (no atomics). Every result is independent of the number
of Numba threads.

Workspace per call (bytes, s = itemsize, K = kh*kw, G offset groups), bounded independently of
N: ``T * (s * (Cin*K + Cout) + G*K*(32 + 9*s))`` for the forward, plus
``T * s * (Cin*K + Cout + 8*G*K)`` for the backward, with
``T = clamp(TILE_BYTES / (s * (Cin*K + Cout)), 64, max(N*P, 64))`` and TILE_BYTES = 8 MiB
(about 19 MB in all at the benchmark shapes).
"""

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from ._taps import corner_slopes, corner_taps, zero_padding_taps

# Budget of the column tile (col and the matmul output), in bytes.
TILE_BYTES = 8 << 20
# Columns per task of the tap and offset-gradient loops.
CHUNK = 64


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
    and :func:`_matmul` splits each product among threads of its own, which sleep when idle.
    The previous limits are restored.
    """
    return _blas_controller().limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=None)
def _matmul_pool():
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="deformops-gemm")


def _matmul(a, b, out):
    """``np.matmul(a, b, out=out)`` with the columns of ``b`` and ``out`` split among
    ``numba.get_num_threads()`` threads that each call single-threaded BLAS. Each output element
    is still one whole dot product, so the split does not change the result."""
    parts = min(numba.get_num_threads(), out.shape[-1] // 128)
    if parts <= 1:
        np.matmul(a, b, out=out)
        return
    bounds = np.linspace(0, out.shape[-1], parts + 1).astype(int)
    jobs = [_matmul_pool().submit(np.matmul, a, b[..., lo:hi], out=out[..., lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()


def _tiles(N, P, T):
    """(n0, nimg, p0, Tp) tiles covering the N*P output columns, at most T columns each."""
    if P <= T:
        per = max(1, T // P)
        return [(n0, min(per, N - n0), 0, P) for n0 in range(0, N, per)]
    return [(n, 1, p0, min(T, P - p0)) for n in range(N) for p0 in range(0, P, T)]


class _Workspace:
    """Tile buffers of a call, allocated once and reused by every tile."""

    def __init__(self, dtype, Cin, Cout, G, K, T, slopes, backward):
        self.key = (np.dtype(dtype), Cin, Cout, G, K, T, slopes, backward)
        self.idx = np.empty((G, K, 4, T), np.uintp)
        self.wt = np.empty((G, K, 4, T), dtype)
        self.wm = np.empty((G, K, 4, T), dtype)
        self.msk = np.empty((G, K, T), dtype)
        self.empty = np.empty((G, K, T), np.uint8)
        shape = (G, K, 4, T) if slopes else (1, 1, 4, 1)
        self.ay, self.ax = np.empty(shape, dtype), np.empty(shape, dtype)
        self.col = np.empty((Cin * K, T), dtype)
        self.res = np.empty((Cout, T), dtype)
        self.grad_col = np.empty((Cin * K, T), dtype) if backward else None


_last_workspace = threading.local()


def _workspace(*key):
    """The calling thread's workspace for ``key``, kept from its previous call when the key is
    the same: fresh buffers of several MB cost page faults on every call (about 10% of a small
    convolution). Each thread holds at most one forward and one backward workspace."""
    slot = "backward" if key[-1] else "forward"
    ws = getattr(_last_workspace, slot, None)
    if ws is None or ws.key != (np.dtype(key[0]),) + key[1:]:
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


def deform_conv2d_forward(x, offset, weight, bias, mask, stride, padding, dilation, out):
    """Fill ``out`` (N, Cout, Ho, Wo) from contiguous NCHW arrays (offset/mask as (N, ., P))."""
    N, Cin, H, W = x.shape
    Cout, cpg_w, kh, kw = weight.shape
    Ho, Wo = out.shape[2], out.shape[3]
    K, P = kh * kw, Ho * Wo
    groups = Cin // cpg_w
    G = offset.shape[1] // (2 * K)
    T = tile_columns(x.dtype, Cin, Cout, K, N * P)
    ws = _workspace(x.dtype, Cin, Cout, G, K, T, False, False)
    w_g = weight.reshape(groups, Cout // groups, cpg_w * K)
    xf = x.reshape(N, Cin, H * W)
    of = out.reshape(N, Cout, P)
    bias_col = None if bias is None else bias.reshape(1, Cout, 1)
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            _forward_tile(ws, xf, offset, mask, w_g, bias_col, of, n0, nimg, p0, Tp, Wo, H, W,
                          kh, kw, stride, padding, dilation, groups)


def _forward_tile(ws, xf, offset, mask, w_g, bias_col, of, n0, nimg, p0, Tp, Wo, H, W, kh, kw,
                  stride, padding, dilation, groups):
    """One tile of the forward: taps, columns, one matmul per conv group, store (+ bias)."""
    Cout = of.shape[1]
    cpg_w, K = w_g.shape[2] // (kh * kw), kh * kw
    t = nimg * Tp
    _taps(ws, offset, mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding, dilation, False)
    _im2col(xf, n0, nimg, Tp, ws.idx, ws.wm, ws.empty, ws.col)  # full buffers: one Numba type
    col = ws.col[:, :t]
    res = ws.res[:, :t]
    _matmul(w_g, col.reshape(groups, cpg_w * K, t), res.reshape(groups, Cout // groups, t))
    block = res.reshape(Cout, nimg, Tp).transpose(1, 0, 2)
    if bias_col is None:
        of[n0:n0 + nimg, :, p0:p0 + Tp] = block
    else:
        np.add(block, bias_col, out=of[n0:n0 + nimg, :, p0:p0 + Tp])


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
    w_g = weight.reshape(groups, Cout // groups, cpg_w * K)
    w_gt = w_g.transpose(0, 2, 1)
    xf = x.reshape(N, Cin, H * W)
    gof = grad_out.reshape(N, Cout, P)
    gxf = None
    if need_x:
        grad_x[...] = 0
        gxf = grad_x.reshape(N, Cin, H * W)
    if need_w:
        grad_weight[...] = 0
        gwg = grad_weight.reshape(groups, Cout // groups, cpg_w * K)
        gw_tile = np.empty_like(gwg)
    dummy = np.empty((1, 1, 1), x.dtype)
    gof_off = grad_offset.reshape(N, 2 * G * K, P) if need_offset else dummy
    gof_msk = grad_mask.reshape(N, G * K, P) if need_mask else dummy
    with _one_blas_thread():
        for n0, nimg, p0, Tp in _tiles(N, P, T):
            t = nimg * Tp
            _taps(ws, offset, mask, n0, Tp, p0, t, Wo, H, W, kh, kw, stride, padding, dilation, slopes)
            go = ws.res[:, :t]
            go.reshape(Cout, nimg, Tp)[...] = gof[n0:n0 + nimg, :, p0:p0 + Tp].transpose(1, 0, 2)
            go_g = go.reshape(groups, Cout // groups, t)
            if need_w:
                _im2col(xf, n0, nimg, Tp, ws.idx, ws.wm, ws.empty, ws.col)
                col = ws.col[:, :t]
                _matmul(go_g, col.reshape(groups, cpg_w * K, t).transpose(0, 2, 1), gw_tile)
                gwg += gw_tile
            if need_col_grad:
                gcol = ws.grad_col[:, :t]
                _matmul(w_gt, go_g, gcol.reshape(groups, cpg_w * K, t))
                if need_x:
                    _col2im(ws.grad_col, n0, nimg, Tp, ws.idx, ws.wm, gxf)
                if need_offset or need_mask:
                    _offset_mask_grad(xf, ws.grad_col, n0, Tp, p0, t, ws.idx, ws.wt, ws.msk,
                                      ws.empty, ws.ay, ws.ax, gof_off, gof_msk, need_offset,
                                      need_mask)
