"""CUDA ``deform_conv2d`` (DCNv1/v2) and its gradients: tiled im2col kernels + cuBLAS.

Same entry points and arguments as ``deformops.backends.cpu.deform_conv`` (contiguous NCHW CuPy
arrays; offset (N, 2GK, P) and mask (N, GK, P)). The batch's output pixels are cut into tiles of
at most ``T`` columns (whole images, or pieces of one image); per tile:

- forward: ``dc_im2col`` writes the columns ``col[c*K + k, j]`` (mask folded in), then
  ``cupy.matmul`` (cuBLAS) multiplies each conv group's weights with its rows, and the result is
  stored (plus bias) into the output;
- backward: ``grad_col = W^T @ grad_out`` (cuBLAS); ``dc_col2im`` scatters it into grad_input
  with ``atomicAdd`` into a float32/float64 accumulator, or, in deterministic mode
  (:func:`deformops.backends.cuda.set_deterministic`), ``dc_tap_table`` + sort + ``gather_segments``
  sum each input pixel's contributions in a fixed order; ``dc_offset_mask_grad`` sums over the
  channels of each group per (g, k, column) without atomics; ``grad_W += grad_out @ col^T``.

Workspace (bytes, s = itemsize): ``T * s * (Cin*K + Cout)`` for the forward and up to
``T * s * (2*Cin*K + Cout)`` for the backward (plus the deterministic mode's tap table,
``T * G*K*4 * 24`` bytes), with ``T = clamp(TILE_BYTES / (s * (Cin*K + Cout)), 256, N*P)``:
bounded independently of N. Half types accumulate in float32 (cuBLAS compute type, kernels,
grad_input and grad_weight accumulators).
"""

import numpy as np

from . import _runtime as rt
from ._switch import is_deterministic

# Budget of the column tile (col and the matmul output), in bytes.
TILE_BYTES = 128 << 20
# Threads the channel-chunked kernels aim for (im2col, col2im).
TARGET_THREADS = 1 << 18


def tile_columns(dtype, Cin, Cout, K, NP):
    """Columns per tile: about TILE_BYTES of col and matmul output, at least 256."""
    per_column = np.dtype(dtype).itemsize * (Cin * K + Cout)
    return int(min(max(TILE_BYTES // max(per_column, 1), 256), max(NP, 1)))


def tiles(N, P, T):
    """(n0, nimg, p0, Tp) tiles covering the N*P output columns, at most T columns each."""
    if P <= T:
        per = max(1, T // P)
        return [(n0, min(per, N - n0), 0, P) for n0 in range(0, N, per)]
    return [(n, 1, p0, min(T, P - p0)) for n in range(N) for p0 in range(0, P, T)]


def _matmul(cp, a, b, out=None):
    """``cupy.matmul`` (cuBLAS; half types accumulate in float32); where this CuPy cannot
    multiply the dtype (bfloat16 in some versions), in float32 and cast back."""
    try:
        return cp.matmul(a, b, out=out)
    except (TypeError, ValueError, NotImplementedError):
        res = cp.matmul(a.astype(cp.float32), b.astype(cp.float32))
        if out is None:
            return res.astype(a.dtype)
        out[...] = res.astype(out.dtype)
        return out


def _channel_chunk(cpg, G, K, t):
    """Channels per thread of dc_im2col / dc_col2im: enough threads to fill the GPU."""
    nch = min(max(1, -(-TARGET_THREADS // max(1, G * K * t))), max(cpg, 1))
    cb = -(-cpg // nch)
    return max(cb, 1), -(-cpg // max(cb, 1))


class _Geometry:
    def __init__(self, x, offset, weight, stride, padding, dilation, Ho, Wo):
        self.N, self.Cin, self.H, self.W = x.shape
        self.Cout, self.cpg_w, self.kh, self.kw = weight.shape
        self.K = self.kh * self.kw
        self.Ho, self.Wo, self.P = Ho, Wo, Ho * Wo
        self.groups = self.Cin // self.cpg_w
        self.G = offset.shape[1] // (2 * self.K)
        self.cpg = self.Cin // self.G
        self.conv = tuple(np.int32(v) for v in (self.kh, self.kw, stride[0], stride[1],
                                                 padding[0], padding[1], dilation[0],
                                                 dilation[1]))
        self.T = tile_columns(x.dtype, self.Cin, self.Cout, self.K, self.N * self.P)
        self.cb, self.nch = _channel_chunk(self.cpg, self.G, self.K, self.T)

    def index(self, *arrays):
        counts = [a.size for a in arrays if a is not None]
        T = self.T
        counts += [self.Cin * self.K * T, self.Cout * T, self.nch * self.G * self.K * T,
                   4 * self.G * self.K * T, self.N * self.Cin * self.H * self.W]
        return rt.index_dtype(*counts)


def _im2col(fn, g, I, x, offset, mask, col, n0, nimg, p0, Tp):
    t = nimg * Tp
    has_mask = mask is not None
    rt.launch(fn, g.nch * g.G * g.K * t,
              (x, offset, mask if has_mask else offset, np.int32(has_mask), col, I(n0), I(Tp),
               I(p0), I(t), I(g.Cin), I(g.H), I(g.W), I(g.G), I(g.Wo), I(g.P), I(g.cb)) + g.conv)


def deform_conv2d_forward(x, offset, weight, bias, mask, stride, padding, dilation, out):
    """Fill ``out`` (N, Cout, Ho, Wo) from contiguous NCHW CuPy arrays (offset/mask (N, ., P))."""
    cp = rt.cupy()
    g = _Geometry(x, offset, weight, stride, padding, dilation, out.shape[2], out.shape[3])
    index = g.index(x, offset, mask, out)
    I = rt.itype(index)
    im2col = rt.kernel("dc_im2col", x.dtype, index)
    col_buf = cp.empty(g.Cin * g.K * g.T, x.dtype)
    res_buf = cp.empty(g.Cout * g.T, x.dtype)
    w_g = weight.reshape(g.groups, g.Cout // g.groups, g.cpg_w * g.K)
    of = out.reshape(g.N, g.Cout, g.P)
    bias_col = None if bias is None else bias.reshape(1, g.Cout, 1)
    for n0, nimg, p0, Tp in tiles(g.N, g.P, g.T):
        t = nimg * Tp
        col = col_buf[:g.Cin * g.K * t].reshape(g.Cin * g.K, t)
        _im2col(im2col, g, I, x, offset, mask, col, n0, nimg, p0, Tp)
        res = res_buf[:g.Cout * t].reshape(g.groups, g.Cout // g.groups, t)
        _matmul(cp, w_g, col.reshape(g.groups, g.cpg_w * g.K, t), out=res)
        block = res.reshape(g.Cout, nimg, Tp).transpose(1, 0, 2)
        if bias_col is None:
            of[n0:n0 + nimg, :, p0:p0 + Tp] = block
        else:
            of[n0:n0 + nimg, :, p0:p0 + Tp] = block + bias_col


def deform_conv2d_backward(grad_out, x, offset, weight, mask, stride, padding, dilation,
                           grad_x, grad_offset, grad_weight, grad_mask):
    """Fill the requested gradients (None = not needed); the bias gradient is the caller's."""
    cp = rt.cupy()
    g = _Geometry(x, offset, weight, stride, padding, dilation, grad_out.shape[2],
                  grad_out.shape[3])
    index = g.index(x, offset, mask, grad_out)
    I = rt.itype(index)
    need_x, need_offset = grad_x is not None, grad_offset is not None
    need_w, need_mask = grad_weight is not None, grad_mask is not None
    need_col_grad = need_x or need_offset or need_mask
    acc = rt.acc_dtype(x.dtype)
    has_mask = mask is not None
    mask_arg = mask if has_mask else offset
    deterministic = is_deterministic()
    gxa = gwa = None
    if need_x:
        gxa = grad_x if grad_x.dtype == acc else cp.empty(grad_x.shape, acc)
        gxa[...] = 0
    if need_w:
        gwa = cp.zeros((g.groups, g.Cout // g.groups, g.cpg_w * g.K), acc)
    w_gt = weight.reshape(g.groups, g.Cout // g.groups, g.cpg_w * g.K).transpose(0, 2, 1)
    gof = grad_out.reshape(g.N, g.Cout, g.P)
    dummy = cp.empty(1, x.dtype)
    goff = grad_offset.reshape(g.N, 2 * g.G * g.K, g.P) if need_offset else dummy
    gmsk = grad_mask.reshape(g.N, g.G * g.K, g.P) if need_mask else dummy
    go_buf = cp.empty(g.Cout * g.T, x.dtype)
    col_buf = cp.empty(g.Cin * g.K * g.T, x.dtype) if need_w else None
    gcol_buf = cp.empty(g.Cin * g.K * g.T, x.dtype) if need_col_grad else None
    im2col = rt.kernel("dc_im2col", x.dtype, index)
    col2im = rt.kernel("dc_col2im", x.dtype, index)
    om_grad = rt.kernel("dc_offset_mask_grad", x.dtype, index)
    for n0, nimg, p0, Tp in tiles(g.N, g.P, g.T):
        t = nimg * Tp
        go = go_buf[:g.Cout * t].reshape(g.Cout, nimg, Tp)
        go[...] = gof[n0:n0 + nimg, :, p0:p0 + Tp].transpose(1, 0, 2)
        go_g = go.reshape(g.groups, g.Cout // g.groups, t)
        if need_w:
            col = col_buf[:g.Cin * g.K * t].reshape(g.Cin * g.K, t)
            _im2col(im2col, g, I, x, offset, mask, col, n0, nimg, p0, Tp)
            col_t = col.reshape(g.groups, g.cpg_w * g.K, t).transpose(0, 2, 1)
            if gwa.dtype == go_g.dtype:
                gwa += _matmul(cp, go_g, col_t)
            else:  # half types: the tile's product in float32 too, never rounded to half
                gwa += cp.matmul(go_g.astype(gwa.dtype), col_t.astype(gwa.dtype))
        if not need_col_grad:
            continue
        gcol = gcol_buf[:g.Cin * g.K * t]
        _matmul(cp, w_gt, go_g, out=gcol.reshape(g.groups, g.cpg_w * g.K, t))
        tile = (I(n0), I(Tp), I(p0), I(t))
        if need_x and deterministic:
            _col2im_gather(g, I, index, x.dtype, gcol, offset, mask_arg, has_mask, gxa, n0, nimg,
                           p0, Tp)
        elif need_x:
            rt.launch(col2im, g.nch * g.G * g.K * t,
                      (gcol, offset, mask_arg, np.int32(has_mask), gxa) + tile
                      + (I(g.Cin), I(g.H), I(g.W), I(g.G), I(g.Wo), I(g.P), I(g.cb)) + g.conv)
        if need_offset or need_mask:
            rt.launch(om_grad, g.G * g.K * t,
                      (x, gcol, offset, mask_arg, np.int32(has_mask), goff, gmsk,
                       np.int32(need_offset), np.int32(need_mask)) + tile
                      + (I(g.Cin), I(g.H), I(g.W), I(g.G), I(g.Wo), I(g.P)) + g.conv)
    if need_x and gxa is not grad_x:
        grad_x[...] = gxa.astype(grad_x.dtype)
    if need_w:
        grad_weight[...] = gwa.reshape(grad_weight.shape).astype(grad_weight.dtype, copy=False)


def _col2im_gather(g, I, index, dtype, gcol, offset, mask_arg, has_mask, gxa, n0, nimg, p0, Tp):
    """Deterministic grad_input of one tile: table of (column, tap, corner) entries keyed by input
    pixel, sorted, then one thread per (pixel read, channel of its group) sums in table order."""
    cp = rt.cupy()
    t = nimg * Tp
    HW = g.H * g.W
    entries = g.G * g.K * 4 * t
    key = cp.empty(entries, cp.int64)
    weight = cp.empty(entries, rt.acc_dtype(dtype))
    src = cp.empty(entries, cp.int64)
    nkeys = nimg * g.G * HW
    table = rt.kernel("dc_tap_table", dtype, index)
    rt.launch(table, g.G * g.K * t,
              (offset, mask_arg, np.int32(has_mask), key, weight, src, I(n0), I(Tp), I(p0), I(t),
               I(g.H), I(g.W), I(g.G), I(g.Wo), I(g.P)) + g.conv + (np.int64(nkeys),))
    seg_key, seg_start, weight, src = rt.sorted_segments(key, weight, src)
    gather = rt.kernel("gather_segments", dtype, index)
    rt.launch(gather, seg_key.size * g.cpg,
              (seg_key, seg_start, np.int64(seg_key.size), weight, src, gcol, gxa[n0:n0 + nimg],
               I(g.Cin), I(g.G), I(HW), I(0), I(g.K * t), I(1), np.int32(0), np.int64(nkeys)))
