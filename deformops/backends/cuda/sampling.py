"""CUDA kernels of ``sample`` / ``deform_sample`` and their gradients, launched through CuPy.

Same entry points and arguments as ``deformops.backends.cpu.sampling``; arrays are C-contiguous
CuPy arrays in NCHW or (``channels_last``) NHWC memory order. See ``kernels/sampling.cu``.
"""

import numpy as np

from . import _runtime as rt
from ._switch import is_deterministic

# Image chunk of the deterministic input gradient: at most this many tap-table entries per pass.
TABLE_ENTRIES = 1 << 24


def _dims(x, coords, channels_last):
    if channels_last:
        N, H, W, C = x.shape
        Ho, Wo, G2 = coords.shape[1:]
    else:
        N, C, H, W = x.shape
        G2, Ho, Wo = coords.shape[1:]
    return N, C, H, W, G2 // 2, Ho, Wo


def point_blocks(C, G, P, channels_last, dtype, index):
    """(PB, GB, shared bytes) of the staged kernels: PB points and GB groups per block.

    About 1024 (point, channel) elements per block of 256 threads, at least 32 points in NCHW
    (coalesced rows), and a tap table within :data:`_runtime.SHARED_BYTES`.
    """
    isz = 8 if index == "int64" else 4
    asz = rt.acc_dtype(dtype).itemsize
    entry = 4 * isz + 5 * asz + 4  # kernels/sampling.cu: TapTable
    pb = max(-(-1024 // max(C, 1)), 1 if channels_last else 32)
    pb = max(1, min(pb, P, rt.SHARED_BYTES // entry))
    gb = max(1, min(G, rt.SHARED_BYTES // (pb * entry)))
    return pb, gb, pb * gb * entry


def sample_forward(x, coords, out, order, mode, cval, relative, channels_last):
    """Sample ``x`` at ``coords`` into ``out`` (CuPy arrays in the memory order the flag names)."""
    if out.size == 0:
        return
    N, C, H, W, G, Ho, Wo = _dims(x, coords, channels_last)
    P = Ho * Wo
    index = rt.index_dtype(x.size, coords.size, out.size)
    I = rt.itype(index)
    pb, gb, smem = point_blocks(C, G, P, channels_last, x.dtype, index)
    nblocks = N * (-(-P // pb)) * (-(-G // gb))
    fn = rt.kernel("sample_forward", x.dtype, index, "true" if channels_last else "false")
    rt.launch_blocks(fn, nblocks, (x, coords, out, I(N), I(C), I(H), I(W), I(G), I(Ho), I(Wo),
                                   I(pb), I(gb), np.int32(order), np.int32(mode),
                                   np.float64(cval), np.int32(bool(relative))), smem)


def sample_backward(grad_out, x, coords, grad_x, grad_coords, order, mode, cval, relative,
                    channels_last):
    """Gradients of ``sample_forward``; ``grad_x`` / ``grad_coords`` may be None (not needed).

    grad_x: atomicAdd scatter into an accumulator (float32 for half types), or, when
    :func:`deformops.backends.cuda.set_deterministic` is on, an ordered gather.
    grad_coords: one thread (NCHW) or warp (NHWC) per point, no atomics.
    """
    cp = rt.cupy()
    if grad_out.size == 0:
        for g in (grad_x, grad_coords):
            if g is not None:
                g[...] = 0
        return
    N, C, H, W, G, Ho, Wo = _dims(x, coords, channels_last)
    P = Ho * Wo
    index = rt.index_dtype(x.size, coords.size, grad_out.size, 32 * N * P * G)
    I = rt.itype(index)
    common = (I(N), I(C), I(H), I(W), I(G), I(Ho), I(Wo))
    modes = (np.int32(order), np.int32(mode), np.float64(cval), np.int32(bool(relative)))
    if grad_coords is not None:
        if channels_last:
            fn = rt.kernel("sample_backward_coords_nhwc", x.dtype, index)
            rt.launch(fn, 32 * N * P * G, (grad_out, x, coords, grad_coords) + common + modes)
        else:
            fn = rt.kernel("sample_backward_coords_nchw", x.dtype, index)
            rt.launch(fn, N * P * G, (grad_out, x, coords, grad_coords) + common + modes)
    if grad_x is None:
        return
    acc = rt.acc_dtype(x.dtype)
    gxa = grad_x if grad_x.dtype == acc else cp.empty(grad_x.shape, acc)
    gxa[...] = 0
    if is_deterministic():
        _input_grad_gather(grad_out, coords, gxa, N, C, H, W, G, Ho, Wo, modes, channels_last,
                           index)
    else:
        pb, gb, smem = point_blocks(C, G, P, channels_last, x.dtype, index)
        nblocks = N * (-(-P // pb)) * (-(-G // gb))
        fn = rt.kernel("sample_backward_input", x.dtype, index,
                       "true" if channels_last else "false")
        rt.launch_blocks(fn, nblocks, (grad_out, coords, gxa) + common + (I(pb), I(gb)) + modes,
                         smem)
    if gxa is not grad_x:
        grad_x[...] = gxa.astype(grad_x.dtype)


def _input_grad_gather(grad_out, coords, gxa, N, C, H, W, G, Ho, Wo, modes, channels_last,
                       index):
    """Deterministic grad_x: tap table of a chunk of images, sorted by pixel, then one thread per
    (pixel read, channel) sums its entries in table order (no atomics)."""
    cp = rt.cupy()
    P, HW = Ho * Wo, H * W
    acc = gxa.dtype
    step = max(1, TABLE_ENTRIES // max(1, 4 * G * P))
    flag = "true" if channels_last else "false"
    table = rt.kernel("sample_tap_table", coords.dtype, index, flag)
    gather = rt.kernel("gather_segments", coords.dtype, index)
    for n0 in range(0, N, step):
        nb = min(step, N - n0)
        I = rt.itype(index)
        entries = 4 * nb * G * P
        key = cp.empty(entries, cp.int64)
        weight = cp.empty(entries, acc)
        src = cp.empty(entries, cp.int64)
        nkeys = nb * G * HW
        rt.launch(table, nb * G * P, (coords[n0:n0 + nb], key, weight, src, I(nb), I(H), I(W),
                                      I(G), I(Ho), I(Wo)) + modes + (np.int64(nkeys),))
        seg_key, seg_start, weight, src = rt.sorted_segments(key, weight, src)
        nseg = seg_key.size
        if channels_last:  # grad_out[n, p, c]
            strides = (I(P * C), I(1), I(C))
        else:  # grad_out[n, c, p]
            strides = (I(C * P), I(P), I(1))
        rt.launch(gather, nseg * (C // G),
                  (seg_key, seg_start, np.int64(nseg), weight, src, grad_out[n0:n0 + nb],
                   gxa[n0:n0 + nb], I(C), I(G), I(HW)) + strides
                  + (np.int32(bool(channels_last)), np.int64(nkeys)))
