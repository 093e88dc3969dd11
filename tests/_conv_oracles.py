"""Independent references and input generators for the deform_conv2d tests.

Oracles (all float64, written from the formula in DESIGN.md §3/§4, sharing no code with
``deformops``):

- ``ref_deform_conv2d``: a naive loop over (image, offset group, tap, output pixel) that samples
  each point with the zero-padding bilinear rule (0 if y <= -1, y >= H, x <= -1 or x >= W, else
  bilinear with outside corners 0), then contracts the sampled columns with the weights group by
  group;
- ``einsum_conv2d`` / ``einsum_conv2d_grads``: a plain grouped convolution (zero padding, stride,
  dilation) by slicing a zero-padded image and ``np.einsum``; with zero offsets and no mask the
  deformable convolution is exactly this. The offset gradient at zero offsets is the right-hand
  difference of the zero-padded image (torchvision's convention at integer sample points, also at
  y = -1), the mask gradient the sampled columns.
"""

import math

import numpy as np
from hypothesis import strategies as st


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return Ho, Wo


# ------------------------------------------------------------------ naive loop reference


def bilinear_zero(img, y, x):
    """img (C, H, W) sampled at the scalar point (y, x) with the zero-padding rule -> (C,)."""
    C, H, W = img.shape
    out = np.zeros(C, np.float64)
    if not (y > -1 and y < H and x > -1 and x < W):  # also catches NaN
        return out
    y0 = math.floor(y)
    x0 = math.floor(x)
    ly = y - y0
    lx = x - x0
    for yy, wy in ((y0, 1.0 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1.0 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                out += (wy * wx) * img[:, yy, xx]
    return out


def ref_columns(x, offset, mask, kh, kw, stride=1, padding=0, dilation=1):
    """Sampled columns cols[n, c, k, oy, ox] = mask * bilinear(x[n, c], y, x) (NCHW float64)."""
    x = np.asarray(x, np.float64)
    offset = np.asarray(offset, np.float64)
    mask = None if mask is None else np.asarray(mask, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    N, Cin, H, W = x.shape
    K = kh * kw
    Ho, Wo = offset.shape[2:]
    G = offset.shape[1] // (2 * K)
    cpg = Cin // G
    cols = np.zeros((N, Cin, K, Ho, Wo), np.float64)
    for n in range(N):
        for g in range(G):
            img = x[n, g * cpg:(g + 1) * cpg]
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(Ho):
                        for ox in range(Wo):
                            dy = offset[n, g * 2 * K + 2 * k, oy, ox]
                            dx = offset[n, g * 2 * K + 2 * k + 1, oy, ox]
                            y = oy * sh - ph + i * dh + dy
                            xx = ox * sw - pw + j * dw + dx
                            m = 1.0 if mask is None else mask[n, g * K + k, oy, ox]
                            v = bilinear_zero(img, y, xx)
                            cols[n, g * cpg:(g + 1) * cpg, k, oy, ox] = m * v
    return cols


def contract(cols, weight):
    """out[n, o] = sum over o's conv group of weight[o, c', k] * cols[n, c, k] (float64)."""
    weight = np.asarray(weight, np.float64)
    N, Cin, K, Ho, Wo = cols.shape
    Cout, cpg_w = weight.shape[:2]
    groups = Cin // cpg_w
    opg = Cout // groups
    out = np.zeros((N, Cout, Ho, Wo), np.float64)
    wk = weight.reshape(Cout, cpg_w, K)
    for o in range(Cout):
        g = o // opg
        out[:, o] = np.einsum("ck,nckyx->nyx", wk[o], cols[:, g * cpg_w:(g + 1) * cpg_w])
    return out


def ref_deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Oracle for ``dops.deform_conv2d`` (NCHW, float64): the naive loop of DESIGN.md §3."""
    kh, kw = np.asarray(weight).shape[2:]
    cols = ref_columns(x, offset, mask, kh, kw, stride, padding, dilation)
    out = contract(cols, weight)
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


# ------------------------------------------------------------------ plain grouped convolution


def _padded(x, padding, extra=1):
    (ph, pw) = pair(padding)
    return np.pad(np.asarray(x, np.float64),
                  ((0, 0), (0, 0), (ph, ph + extra), (pw, pw + extra)))


def _tap_slices(i, j, Ho, Wo, stride, dilation, dy=0, dx=0):
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    r0, c0 = i * dh + dy, j * dw + dx
    return (slice(r0, r0 + sh * (Ho - 1) + 1, sh), slice(c0, c0 + sw * (Wo - 1) + 1, sw))


def einsum_columns(x, kh, kw, stride, padding, dilation, dy=0, dx=0):
    """cols[n, c, k, oy, ox] = xpad[n, c, oy*sh + i*dh + dy, ox*sw + j*dw + dx] (zero padding)."""
    N, Cin, H, W = np.shape(x)
    Ho, Wo = out_size(H, W, kh, kw, stride, padding, dilation)
    xp = _padded(x, padding)
    cols = np.empty((N, Cin, kh * kw, Ho, Wo))
    for i in range(kh):
        for j in range(kw):
            rs, cs = _tap_slices(i, j, Ho, Wo, stride, dilation, dy, dx)
            cols[:, :, i * kw + j] = xp[:, :, rs, cs]
    return cols


def _grouped(weight, Cin):
    weight = np.asarray(weight, np.float64)
    Cout, cpg_w, kh, kw = weight.shape
    groups = Cin // cpg_w
    return weight.reshape(groups, Cout // groups, cpg_w, kh * kw), groups


def einsum_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Plain grouped convolution (torch.nn.functional.conv2d semantics), float64 NCHW."""
    N, Cin = np.shape(x)[:2]
    kh, kw = np.shape(weight)[2:]
    cols = einsum_columns(x, kh, kw, stride, padding, dilation)
    wg, groups = _grouped(weight, Cin)
    Ho, Wo = cols.shape[3:]
    cg = cols.reshape(N, groups, Cin // groups, kh * kw, Ho, Wo)
    out = np.einsum("gock,ngckyx->ngoyx", wg, cg).reshape(N, -1, Ho, Wo)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[None, :, None, None]
    return out


def einsum_conv2d_grads(grad_out, x, weight, G, stride=1, padding=0, dilation=1):
    """Gradients of the deformable convolution at zero offsets and mask = 1 (float64, NCHW):
    (grad_input, grad_offset, grad_weight, grad_mask, grad_bias) for G offset groups.

    grad_input scatters W^T grad_out back through the tap slices; grad_weight is
    grad_out . cols^T; grad_offset is the sum over a group's channels of (W^T grad_out) times the
    right-hand difference of the zero-padded image; grad_mask that sum times the columns.
    """
    x = np.asarray(x, np.float64)
    go = np.asarray(grad_out, np.float64)
    N, Cin, H, W = x.shape
    Cout, _, kh, kw = np.shape(weight)
    K = kh * kw
    Ho, Wo = go.shape[2:]
    (ph, pw) = pair(padding)
    wg, groups = _grouped(weight, Cin)
    gog = go.reshape(N, groups, Cout // groups, Ho, Wo)
    # W^T grad_out: (N, Cin, K, Ho, Wo)
    gcol = np.einsum("gock,ngoyx->ngckyx", wg, gog).reshape(N, Cin, K, Ho, Wo)
    cols = einsum_columns(x, kh, kw, stride, padding, dilation)
    cols_dy = einsum_columns(x, kh, kw, stride, padding, dilation, dy=1) - cols
    cols_dx = einsum_columns(x, kh, kw, stride, padding, dilation, dx=1) - cols
    # input: transpose of the slicing
    gxp = np.zeros((N, Cin, H + 2 * ph + 1, W + 2 * pw + 1))
    for i in range(kh):
        for j in range(kw):
            rs, cs = _tap_slices(i, j, Ho, Wo, stride, dilation)
            gxp[:, :, rs, cs] += gcol[:, :, i * kw + j]
    grad_input = gxp[:, :, ph:ph + H, pw:pw + W]
    cg = cols.reshape(N, groups, Cin // groups, K, Ho, Wo)
    grad_weight = np.einsum("ngoyx,ngckyx->gock", gog, cg).reshape(np.shape(weight))
    per_group = lambda a: a.reshape(N, G, Cin // G, K, Ho, Wo).sum(2)  # noqa: E731
    gdy, gdx = per_group(gcol * cols_dy), per_group(gcol * cols_dx)
    grad_offset = np.stack([gdy, gdx], axis=3).reshape(N, 2 * G * K, Ho, Wo)
    grad_mask = per_group(gcol * cols).reshape(N, G * K, Ho, Wo)
    grad_bias = go.sum((0, 2, 3))
    return grad_input, grad_offset, grad_weight, grad_mask, grad_bias


# ------------------------------------------------------------------ input generators


@st.composite
def conv_configs(draw, max_n=2, max_k=5, max_groups=4, max_offset_groups=4, max_extra=6):
    """Shape and hyper-parameters of one deform_conv2d call (NCHW), as a dict.

    Kernels 1..max_k per axis, stride 1-3, padding 0-2, dilation 1-2 (each per axis, equal or
    not), conv groups and offset groups 1..4, Cin a multiple of both, non-square images no
    smaller than the dilated kernel minus the padding (so the output is never empty).
    """
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    per_axis = draw(st.booleans())

    def hp(lo, hi):
        a = draw(st.integers(lo, hi))
        return (a, draw(st.integers(lo, hi))) if per_axis else (a, a)

    stride, padding, dilation = hp(1, 3), hp(0, 2), hp(1, 2)
    groups = draw(st.integers(1, max_groups))
    G = draw(st.integers(1, max_offset_groups))
    lcm = groups * G // math.gcd(groups, G)
    Cin = lcm * draw(st.integers(1, 2 if lcm <= 4 else 1))
    Cout = groups * draw(st.integers(1, 2))
    H0 = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    W0 = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    H = H0 + draw(st.integers(0, max_extra))
    W = W0 + draw(st.integers(0, max_extra))
    N = draw(st.integers(1, max_n))
    Ho, Wo = out_size(H, W, kh, kw, stride, padding, dilation)
    return dict(N=N, Cin=Cin, Cout=Cout, H=H, W=W, kh=kh, kw=kw, groups=groups, G=G,
                stride=stride, padding=padding, dilation=dilation, Ho=Ho, Wo=Wo)


OFFSET_KINDS = ("uniform", "integer", "zero", "mixed")


def make_offset(rng, cfg, kind, scale=4.0):
    """(N, 2GK, Ho, Wo) float64 offsets: uniform in [-scale, scale] (reaching outside the image),
    exact integers (sample points on pixel centres and on the -1 / H borders), zeros, or a mix."""
    shape = (cfg["N"], 2 * cfg["G"] * cfg["kh"] * cfg["kw"], cfg["Ho"], cfg["Wo"])
    uni = rng.uniform(-scale, scale, shape)
    if kind == "uniform":
        return uni
    ints = np.round(uni)
    if kind == "integer":
        return ints
    if kind == "zero":
        return np.zeros(shape)
    return np.choose(rng.integers(0, 3, shape), [uni, ints, np.zeros(shape)])


def smooth_offset(rng, cfg, lo=-3, hi=3):
    """Offsets k + f, integer k in [lo, hi], f in [0.1, 0.9]: every sample point is inside a
    bilinear cell, away from its edges, so central finite differences are exact up to rounding."""
    shape = (cfg["N"], 2 * cfg["G"] * cfg["kh"] * cfg["kw"], cfg["Ho"], cfg["Wo"])
    return rng.integers(lo, hi + 1, shape) + rng.uniform(0.1, 0.9, shape)


def make_arrays(rng, cfg, offset_kind="uniform", with_mask=True, with_bias=True, smooth=False):
    """float64 NCHW (x, offset, weight, bias, mask, grad_out) for ``cfg``."""
    N, Cin, Cout = cfg["N"], cfg["Cin"], cfg["Cout"]
    G, K, Ho, Wo = cfg["G"], cfg["kh"] * cfg["kw"], cfg["Ho"], cfg["Wo"]
    x = rng.uniform(-1, 1, (N, Cin, cfg["H"], cfg["W"]))
    offset = smooth_offset(rng, cfg) if smooth else make_offset(rng, cfg, offset_kind)
    weight = rng.uniform(-1, 1, (Cout, Cin // cfg["groups"], cfg["kh"], cfg["kw"]))
    bias = rng.uniform(-1, 1, Cout) if with_bias else None
    mask = rng.uniform(-0.5, 1.5, (N, G * K, Ho, Wo)) if with_mask else None
    grad_out = rng.uniform(-1, 1, (N, Cout, Ho, Wo))
    return x, offset, weight, bias, mask, grad_out


def conv_kwargs(cfg):
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
