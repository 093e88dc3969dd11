"""deform_conv2d / deform_conv2d_backward (DCNv1 and v2, torchvision semantics).

Oracles (each test names its own):

- [naive loop]: ``_conv_oracles.ref_deform_conv2d``, a float64 loop over (image, offset group,
  tap, output pixel) written from the formula of DESIGN.md §3/§4;
- [hand-computed]: values worked out by hand for single sample points at the borders;
- [grouped conv]: ``_conv_oracles.einsum_conv2d(_grads)``, a plain grouped convolution by
  slicing and ``np.einsum`` (zero offsets, no mask), the offset gradient there being the
  right-hand difference of the zero-padded image;
- [finite differences]: float64 central differences of sum(out * grad_out);
- [adjoint identity]: the conv is linear in x, so <conv(v), g> == <v, grad_input(g)>;
- [NCHW result], [full backward], [first run]: the op itself in another layout, with all
  gradients requested, or run before (layout, needs_input_grad and determinism tests);
- [torchvision]: autograd of ``torchvision.ops.deform_conv2d`` (skipped when not installed).
"""

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deformops as dops
from _conv_oracles import (OFFSET_KINDS, conv_configs, conv_kwargs,
                           einsum_conv2d, einsum_conv2d_grads, make_arrays, out_size,
                           ref_columns, ref_deform_conv2d)
from _oracles import from_layout, to_layout

LAYOUTS = ("NCHW", "NHWC")
GRAD_NAMES = ("grad_input", "grad_offset", "grad_weight", "grad_mask", "grad_bias")


def examples(divisor):
    return max(4, settings.default.max_examples // divisor)


def seeds():
    return st.integers(0, 2**32 - 1)


def run_forward(x, offset, weight, bias, mask, cfg, layout="NCHW", dtype=np.float64):
    """dops.deform_conv2d on NCHW float64 arrays, cast to dtype and put in layout; result NCHW."""
    c = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    cl = lambda a: None if a is None else to_layout(c(a), layout)  # noqa: E731
    out = dops.deform_conv2d(cl(x), cl(offset), c(weight), c(bias), mask=cl(mask),
                             layout=layout, **conv_kwargs(cfg))
    assert out.dtype == np.dtype(dtype)
    return from_layout(out, layout)


def run_backward(grad_out, x, offset, weight, mask, cfg, layout="NCHW", dtype=np.float64,
                 needs=(True,) * 5):
    """dops.deform_conv2d_backward on NCHW float64 arrays; gradients back in NCHW (None kept)."""
    c = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    cl = lambda a: None if a is None else to_layout(c(a), layout)  # noqa: E731
    res = dops.deform_conv2d_backward(cl(grad_out), cl(x), cl(offset), c(weight), mask=cl(mask),
                                      layout=layout, needs_input_grad=needs, **conv_kwargs(cfg))
    assert isinstance(res, dops.DeformConv2dGrads)
    g = res._asdict()
    for name in ("grad_input", "grad_offset", "grad_mask"):
        if g[name] is not None:
            g[name] = from_layout(g[name], layout)
    for a in g.values():
        assert a is None or a.dtype == np.dtype(dtype)
    return g


def abs_reference(x, offset, weight, mask, cfg):
    """sum of |terms| of the reference (scale of float32 rounding errors)."""
    return ref_deform_conv2d(np.abs(x), offset, np.abs(weight), None, mask=None if mask is None
                             else np.abs(mask), **conv_kwargs(cfg))


# ====================================================================== 1. naive loop


@settings(max_examples=examples(1))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       with_bias=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds())
def test_forward_float64_matches_naive_loop(cfg, kind, with_mask, with_bias, layout, seed):
    """float64 forward == naive loop reference within 1e-10, for kernels 1x1..5x5, stride 1-3,
    padding 0-2, dilation 1-2 (per axis), groups and offset groups 1-4, mask/bias on and off,
    offsets uniform in [-4, 4], exact integers (taps on the -1 / H borders), zero, or mixed
    [oracle: naive loop]."""
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask, _ = make_arrays(rng, cfg, kind, with_mask, with_bias)
    expected = ref_deform_conv2d(x, offset, weight, bias, mask=mask, **conv_kwargs(cfg))
    out = run_forward(x, offset, weight, bias, mask, cfg, layout)
    assert out.shape == (cfg["N"], cfg["Cout"], cfg["Ho"], cfg["Wo"])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=examples(2))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       with_bias=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds())
def test_forward_float32_matches_naive_loop(cfg, kind, with_mask, with_bias, layout, seed):
    """float32 forward == float64 naive loop on the same (float32-representable) inputs within
    1e-4 of the sum of |terms| [oracle: naive loop]."""
    rng = np.random.default_rng(seed)
    arrays = make_arrays(rng, cfg, kind, with_mask, with_bias)
    x, offset, weight, bias, mask, _ = (None if a is None else a.astype(np.float32)
                                        for a in arrays)
    expected = ref_deform_conv2d(x, offset, weight, bias, mask=mask, **conv_kwargs(cfg))
    scale = abs_reference(x, offset, weight, mask, cfg) + (0 if bias is None else 1.0)
    out = run_forward(x, offset, weight, bias, mask, cfg, layout, np.float32)
    err = np.abs(out.astype(np.float64) - expected)
    assert np.all(err <= 1e-4 * scale + 1e-6), err.max()


@st.composite
def depthwise_configs(draw):
    """conv_configs with one input channel per conv group (groups = Cin, 2-24 channels, Cout =
    1-3 times Cin) and offset groups that divide Cin, up to one per channel."""
    cfg = draw(conv_configs(max_groups=1, max_offset_groups=1))
    C = draw(st.sampled_from([2, 3, 5, 8, 16, 24]))
    G = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8, C) if C % g == 0]))
    return dict(cfg, Cin=C, groups=C, G=G, Cout=C * draw(st.integers(1, 3)))


@settings(max_examples=examples(2))
@given(cfg=depthwise_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       with_bias=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=seeds())
def test_depthwise_forward_matches_naive_loop(cfg, kind, with_mask, with_bias, layout, seed):
    """Depthwise convolutions (groups = Cin, any channel multiplier) take a kernel of their own
    (the general one is made to fail here, so the test sees which ran): float64 == naive loop
    within 1e-10, float32 within 1e-4 of the sum of |terms| [oracle: naive loop]; non-finite
    offsets give 0 there [oracle: naive loop at an offset far outside]."""
    from deformops.backends.cpu import deform_conv as cpu

    def general(*args):
        raise AssertionError("the general forward ran for a depthwise convolution")

    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask, _ = make_arrays(rng, cfg, kind, with_mask, with_bias)
    bad = rng.random(offset.shape) < 0.05
    offset = np.where(bad, rng.choice([np.nan, np.inf, -np.inf], offset.shape), offset)
    far = np.where(bad, 1e9, offset)
    expected = ref_deform_conv2d(x, far, weight, bias, mask=mask, **conv_kwargs(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_forward_tile", general)
        out = run_forward(x, offset, weight, bias, mask, cfg, layout)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
        c32 = [None if a is None else a.astype(np.float32) for a in (x, far, weight, bias, mask)]
        expected32 = ref_deform_conv2d(*c32[:4], mask=c32[4], **conv_kwargs(cfg))
        scale = abs_reference(c32[0], c32[1], c32[2], c32[4], cfg) + (0 if bias is None else 1.0)
        out32 = run_forward(x, offset, weight, bias, mask, cfg, layout, np.float32)
    err = np.abs(out32.astype(np.float64) - expected32)
    assert np.all(err <= 1e-4 * scale + 1e-6), err.max()


@settings(max_examples=examples(2))
@given(cfg=depthwise_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       layout=st.sampled_from(LAYOUTS), needs=st.lists(st.booleans(), min_size=5, max_size=5),
       dtype=st.sampled_from([np.float64, np.float32]), seed=seeds())
def test_depthwise_backward_equals_the_dense_conv_with_block_diagonal_weights(
        cfg, kind, with_mask, layout, needs, dtype, seed):
    """Depthwise backward (its own matmul kernel: the general one is made to fail here) == the
    backward of the same convolution as a dense one (groups = 1) whose weights are zero off
    the block diagonal, for any subset of the gradients: input, offset, mask and bias
    directly, the weight gradient on the diagonal blocks; within 1e-10 in float64, in float32
    within 1e-4 of the largest |gradient| (+1e-6) [oracle: the general kernels, groups = 1,
    in float64]."""
    from deformops.backends.cpu import deform_conv as cpu

    def general(*args):
        raise AssertionError("the general backward matmuls ran for a depthwise convolution")

    rng = np.random.default_rng(seed)
    arrays = make_arrays(rng, cfg, kind, with_mask, False)
    # float32-representable values: the float64 reference samples the same points
    x, offset, weight, _, mask, grad_out = (None if a is None else a.astype(dtype).astype(
        np.float64) for a in arrays)
    C, mult = cfg["Cin"], cfg["Cout"] // cfg["Cin"]
    dense = np.zeros((cfg["Cout"], C, cfg["kh"], cfg["kw"]))
    for c in range(C):
        dense[c * mult:(c + 1) * mult, c] = weight[c * mult:(c + 1) * mult, 0]
    expected = run_backward(grad_out, x, offset, dense, mask, dict(cfg, groups=1), layout)
    expected["grad_weight"] = np.stack([expected["grad_weight"][c * mult:(c + 1) * mult, c]
                                        for c in range(C)]).reshape(weight.shape)
    needs = tuple(needs) if with_mask else (*needs[:3], False, needs[4])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_backward_rows", general)
        got = run_backward(grad_out, x, offset, weight, mask, cfg, layout, dtype, needs)
    for name, need in zip(("grad_input", "grad_offset", "grad_weight", "grad_mask",
                           "grad_bias"), needs):
        if not need:
            assert got[name] is None, name
        elif dtype == np.float64:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-10,
                                       err_msg=name)
        else:
            tol = 1e-4 * float(np.max(np.abs(expected[name]), initial=0.0)) + 1e-6
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=tol,
                                       err_msg=name)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("padding", [1, (1, 2), (2, 1)])
def test_zero_offsets_on_minus_one_border(padding, with_mask):
    """padding >= 1 with zero offsets puts taps exactly on y = -1 / x = -1 (and deeper in the
    padding), where the sample is 0, and the last taps on the far border; plus offsets of -1
    that move interior taps onto -1 exactly [oracle: naive loop, grouped conv]."""
    rng = np.random.default_rng(3)
    cfg = dict(N=2, Cin=4, Cout=2, H=4, W=5, kh=3, kw=3, groups=2, G=2, stride=1,
               padding=padding, dilation=1)
    cfg["Ho"], cfg["Wo"] = out_size(4, 5, 3, 3, 1, padding, 1)
    x, _, weight, bias, mask, _ = make_arrays(rng, cfg, with_mask=with_mask)
    zero = np.zeros((2, 2 * 2 * 9, cfg["Ho"], cfg["Wo"]))
    out = run_forward(x, zero, weight, bias, mask, cfg)
    np.testing.assert_allclose(out, ref_deform_conv2d(x, zero, weight, bias, mask=mask,
                                                      **conv_kwargs(cfg)), rtol=0, atol=1e-12)
    if mask is None:
        np.testing.assert_allclose(out, einsum_conv2d(x, weight, bias, **conv_kwargs(cfg)),
                                   rtol=0, atol=1e-12)
    minus_one = np.full_like(zero, -1.0)
    out = run_forward(x, minus_one, weight, bias, mask, cfg)
    np.testing.assert_allclose(out, ref_deform_conv2d(x, minus_one, weight, bias, mask=mask,
                                                      **conv_kwargs(cfg)), rtol=0, atol=1e-12)


def _single_tap(H, W, y, x_):
    """x (1, 1, H, W) = 1 + arange, 1x1 kernel of weight 1, offsets moving the only tap of output
    (0, 0) to (y, x_); returns the output value."""
    img = 1.0 + np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W)
    off = np.zeros((1, 2, H, W))
    off[0, 0, 0, 0], off[0, 1, 0, 0] = y, x_
    return dops.deform_conv2d(img, off, np.ones((1, 1, 1, 1)))[0, 0, 0, 0], img[0, 0]


@pytest.mark.parametrize("y, x_, expected", [
    (-1.0, 0.0, lambda a: 0.0),                     # on the cut-off: 0
    (0.0, -1.0, lambda a: 0.0),
    (-0.5, 0.0, lambda a: 0.5 * a[0, 0]),           # half outside: outside corner counts 0
    (0.0, -0.25, lambda a: 0.75 * a[0, 0]),
    (-0.5, -0.5, lambda a: 0.25 * a[0, 0]),
    (2.0, 3.0, lambda a: a[2, 3]),                  # last pixel exactly
    (2.5, 1.0, lambda a: 0.5 * a[2, 1]),            # between last row and H
    (3.0, 1.0, lambda a: 0.0),                      # y == H: 0
    (1.0, 4.0, lambda a: 0.0),                      # x == W: 0
    (-1.0000001, 0.0, lambda a: 0.0),
    (-0.9999, 0.0, lambda a: 0.0001 * a[0, 0]),
    (1.25, 2.5, lambda a: 0.75 * 0.5 * (a[1, 2] + a[1, 3]) + 0.25 * 0.5 * (a[2, 2] + a[2, 3])),
    (np.nan, 0.0, lambda a: 0.0),                   # non-finite: 0 (DESIGN.md §4)
    (0.0, np.inf, lambda a: 0.0),
    (-np.inf, 0.0, lambda a: 0.0),
    (1e30, 0.0, lambda a: 0.0),                     # huge: 0, no overflow
    (0.0, -1e300, lambda a: 0.0),
])
def test_single_sample_point_values(y, x_, expected):
    """Single sample points on and around the zero-padding borders of a 3x4 image
    [oracle: hand-computed]."""
    val, img = _single_tap(3, 4, y, x_)
    assert val == pytest.approx(expected(img), rel=1e-12, abs=1e-12)


def _special_coordinates(n):
    """Coordinates along an axis of n pixels: the rule's borders (-2, -1, 0, n - 1, n, n + 1)
    and their neighbours one float apart, integers, fractions, huge and non-finite values."""
    edges = [b + d for b in (-2.0, -1.0, 0.0, n - 1.0, n, n + 1.0) for d in (-0.5, 0.0, 0.5)]
    near = [float(np.nextafter(b, b + s)) for b in edges for s in (-1.0, 1.0)]
    special = [-0.0, 1e-300, -1e-300, 1e30, -1e30, 1e300, 2.0**63, np.inf, -np.inf, np.nan]
    return edges + near + special


def _check_forward_taps(ys, xs, H, W, dtype, rng):
    """The forward's taps of the points (ys, xs), computed by its vector loop (``_cells``),
    equal bit for bit the backward's, computed one point at a time (``_column_taps``)."""
    from deformops.backends.cpu.deform_conv import _cells, _column_taps

    m = len(ys)
    ms = rng.uniform(0.0, 2.0, m)
    idx, wm, code = np.empty((4, m), np.intp), np.empty((4, m), dtype), np.empty(m, np.uint8)
    _cells(np.array(ys, np.float64), np.array(xs, np.float64), ms, m, H, W, idx, wm, code)
    assert ((idx >= 0) & (idx < H * W)).all()
    for r in range(m):
        offset = np.array([ys[r], xs[r]]).reshape(1, 2, 1)
        i0, i1, i2, i3, w0, w1, w2, w3, mk, e, _, _ = _column_taps(
            offset, ms[r:r + 1].reshape(1, 1, 1), True, 0, 0, 0, 0, 0, 0, 0, 0, 1, H, W,
            (1, 1))
        where = (ys[r], xs[r], H, W)
        assert (tuple(idx[:, r]), code[r]) == ((i0, i1, i2, i3), e), where
        expected = np.array([w0 * mk, w1 * mk, w2 * mk, w3 * mk]).astype(dtype)
        assert wm[:, r].tobytes() == expected.tobytes(), where


@pytest.mark.parametrize("H, W", [(1, 1), (1, 3), (2, 5), (4, 4)])
def test_forward_taps_equal_the_backward_taps_on_borders(H, W):
    """Every pair of the rule's border values, their neighbours one float apart, huge and
    non-finite values, through the forward's vector loop of taps [oracle: the backward's taps,
    one point at a time]."""
    rng = np.random.default_rng(H * 10 + W)
    pairs = list(itertools.product(_special_coordinates(H), _special_coordinates(W)))
    ys, xs = [p[0] for p in pairs], [p[1] for p in pairs]
    for dtype in (np.float32, np.float64):
        _check_forward_taps(ys, xs, H, W, dtype, rng)


@settings(max_examples=examples(2))
@given(H=st.integers(1, 6), W=st.integers(1, 6), seed=seeds(),
       points=st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True),
                                 st.floats(-3.0, 9.0)), min_size=1, max_size=40))
def test_forward_taps_equal_the_backward_taps(H, W, seed, points):
    """Random points, inside and around the image and anywhere [oracle: the backward's taps,
    one point at a time]."""
    rng = np.random.default_rng(seed)
    ys = [y if rng.random() < 0.3 else x for y, x in points]
    xs = [x if rng.random() < 0.7 else y for y, x in points]
    _check_forward_taps(ys, xs, H, W, np.float32, rng)


# ====================================================================== 2. batch tiling


def _check_big(cfg, seed, kind="uniform"):
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, kind)
    out = run_forward(x, offset, weight, bias, mask, cfg)
    np.testing.assert_allclose(out, ref_deform_conv2d(x, offset, weight, bias, mask=mask,
                                                      **conv_kwargs(cfg)), rtol=1e-10, atol=1e-10)
    return x, offset, weight, bias, mask, gout


def _cfg(**kw):
    cfg = dict(kw)
    cfg["Ho"], cfg["Wo"] = out_size(cfg["H"], cfg["W"], cfg["kh"], cfg["kw"], cfg["stride"],
                                    cfg["padding"], cfg["dilation"])
    return cfg


def test_prime_batch_over_32_tiny_images():
    """N = 37 (prime, > 32) tiny 3x4 images, several images per tile [oracle: naive loop]."""
    cfg = _cfg(N=37, Cin=4, Cout=6, H=3, W=4, kh=2, kw=3, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    _check_big(cfg, 11)


@pytest.mark.parametrize("conv", ["grouped", "depthwise"])
@pytest.mark.parametrize("tile_bytes", [1, 40_000])
def test_tiles_that_cut_images_into_pieces(monkeypatch, tile_bytes, conv):
    """A small tile budget cuts each image into pieces of 64 (the minimum) or about 200 columns,
    which share one channels-last copy of their image and whose row blocks end inside an image;
    forward and every gradient, for a grouped conv and a depthwise one (channel multiplier 2)
    [oracle: naive loop, float64 finite differences' reference]."""
    from deformops.backends.cpu import deform_conv as cpu

    monkeypatch.setattr(cpu, "TILE_BYTES", tile_bytes)
    groups, Cout = (2, 4) if conv == "grouped" else (6, 12)
    cfg = _cfg(N=3, Cin=6, Cout=Cout, H=17, W=19, kh=3, kw=3, groups=groups, G=3, stride=1,
               padding=1, dilation=1)
    x, offset, weight, bias, mask, gout = _check_big(cfg, 12)
    monkeypatch.setattr(cpu, "TILE_BYTES", 8 << 20)
    whole = run_backward(gout, x, offset, weight, mask, cfg)
    monkeypatch.setattr(cpu, "TILE_BYTES", tile_bytes)
    for layout in LAYOUTS:  # NHWC: the pieces read and accumulate into the arrays themselves
        pieces = run_backward(gout, x, offset, weight, mask, cfg, layout)
        for name in GRAD_NAMES:
            np.testing.assert_allclose(pieces[name], whole[name], rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} {layout}")
        np.testing.assert_allclose(run_forward(x, offset, weight, bias, mask, cfg, layout),
                                   run_forward(x, offset, weight, bias, mask, cfg),
                                   rtol=1e-12, atol=1e-12, err_msg=layout)


def test_prime_batch_over_32_split_in_uneven_tiles():
    """N = 37 with wide columns (Cin*K + Cout = 432): with an 8 MiB tile budget the batch is cut
    into tiles of whole images that do not divide N; forward and input/weight gradients
    [oracle: naive loop, adjoint identity, grad_weight = contraction of the naive columns]."""
    cfg = _cfg(N=37, Cin=16, Cout=32, H=9, W=9, kh=5, kw=5, groups=2, G=2, stride=1, padding=2,
               dilation=1)
    x, offset, weight, bias, mask, gout = _check_big(cfg, 12)
    g = run_backward(gout, x, offset, weight, mask, cfg, needs=(True, False, True, False, False))
    cols = ref_columns(x, offset, mask, 5, 5, **conv_kwargs(cfg))
    cg = cols.reshape(37, 2, 8, 25, 9, 9)
    gog = gout.reshape(37, 2, 16, 9, 9)
    gw = np.einsum("ngoyx,ngckyx->gock", gog, cg).reshape(weight.shape)
    np.testing.assert_allclose(g["grad_weight"], gw, rtol=1e-10, atol=1e-9)
    lin = run_forward(x, offset, weight, None, mask, cfg)
    lhs, rhs = np.vdot(lin, gout), np.vdot(x, g["grad_input"])
    assert abs(lhs - rhs) <= 1e-12 * (np.abs(lin).sum() + np.abs(x * g["grad_input"]).sum())


def test_large_image_split_into_pieces():
    """One 41x41 output with Cin*K + Cout = 640: more pixels than an 8 MiB tile holds, so an
    image is cut into pieces; forward, weight and mask gradients [oracle: naive loop: the
    gradients as contractions of its columns]."""
    cfg = _cfg(N=2, Cin=64, Cout=64, H=41, W=41, kh=3, kw=3, groups=1, G=1, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = _check_big(cfg, 13)
    g = run_backward(gout, x, offset, weight, mask, cfg)
    cols = ref_columns(x, offset, mask, 3, 3, **conv_kwargs(cfg))
    np.testing.assert_allclose(
        g["grad_weight"], np.einsum("noyx,nckyx->ock", gout, cols).reshape(weight.shape),
        rtol=1e-10, atol=1e-9)
    # mask gradient: out is linear in mask, <d out/d mask, gout> == columns without mask . W^T gout
    cols1 = ref_columns(x, offset, None, 3, 3, **conv_kwargs(cfg))
    gcol = np.einsum("ock,noyx->nckyx", weight.reshape(64, 64, 9), gout)
    np.testing.assert_allclose(g["grad_mask"], (gcol * cols1).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("Cin, G", [(1, 1), (8, 8)])
def test_backward_workspace_stays_near_the_tile_budget(monkeypatch, Cin, G):
    """Few channels per offset group (one input channel, or a depthwise conv with an offset
    group per channel): the backward's tap tables (G*K entries per column) count in the tile's
    budget, so the workspace kept after the call stays within a few budgets (they took 25
    budgets, 209 MB, at one channel, 512x512) [oracle: the workspace's buffers' sizes; the
    gradients of the same call in one tile]."""
    from deformops.backends.cpu import deform_conv as cpu

    cfg = _cfg(N=1, Cin=Cin, Cout=Cin, H=160, W=160, kh=3, kw=3, groups=Cin, G=G, stride=1,
               padding=1, dilation=1)
    rng = np.random.default_rng(5)
    x, offset, weight, _, mask, gout = make_arrays(rng, cfg)
    cpu.release_workspaces()
    g = run_backward(gout, x, offset, weight, mask, cfg)
    ws = cpu._last_workspace.backward
    held = sum(a.nbytes for a in vars(ws).values() if isinstance(a, np.ndarray))
    assert held <= 3 * cpu.TILE_BYTES, held
    monkeypatch.setattr(cpu, "TILE_BYTES", 1 << 40)  # one tile
    one = run_backward(gout, x, offset, weight, mask, cfg)
    cpu.release_workspaces()
    for name in GRAD_NAMES:
        np.testing.assert_allclose(g[name], one[name], rtol=1e-12, atol=1e-12, err_msg=name)


# ====================================================================== 3. gradients


def fd_check(cfg, x, offset, weight, bias, mask, gout, grads, rng, entries=5, eps=1e-6):
    """Central differences of f = sum(deform_conv2d(...) * gout) at random entries of every
    input, compared with ``grads`` (NCHW float64)."""
    inputs = dict(grad_input=x, grad_offset=offset, grad_weight=weight, grad_bias=bias,
                  grad_mask=mask)

    def f(arrs):
        out = run_forward(arrs["grad_input"], arrs["grad_offset"], arrs["grad_weight"],
                          arrs["grad_bias"], arrs["grad_mask"], cfg)
        return np.vdot(out, gout)

    scale = np.abs(gout).sum() * (1 + np.abs(weight).max()) * (1 + np.abs(x).max())
    for name, a in inputs.items():
        if a is None:
            assert grads[name] is None
            continue
        assert grads[name].shape == a.shape
        for flat in rng.choice(a.size, size=min(entries, a.size), replace=False):
            idx = np.unravel_index(flat, a.shape)
            plus = {k: (None if v is None else v.copy()) for k, v in inputs.items()}
            minus = {k: (None if v is None else v.copy()) for k, v in inputs.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            h = plus[name][idx] - minus[name][idx]
            fd = (f(plus) - f(minus)) / h
            assert abs(grads[name][idx] - fd) <= 1e-6 * abs(fd) + 1e-8 * scale, (name, idx,
                                                                              grads[name][idx], fd)


@settings(max_examples=examples(4))
@given(cfg=conv_configs(max_k=4), with_mask=st.booleans(), seed=seeds())
def test_all_grads_match_central_fd(cfg, with_mask, seed):
    """grad_input, grad_offset, grad_weight, grad_mask, grad_bias == float64 central finite
    differences (eps 1e-6) of sum(out * grad_out) at random entries, offsets k + f with
    f in [0.1, 0.9] (every sample point inside a bilinear cell, so f is smooth there)
    [oracle: finite differences]."""
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, with_mask=with_mask,
                                                      smooth=True)
    g = run_backward(gout, x, offset, weight, mask, cfg)
    fd_check(cfg, x, offset, weight, bias, mask, gout, g, rng)


@settings(max_examples=examples(2))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       layout=st.sampled_from(LAYOUTS), seed=seeds())
def test_input_grad_is_adjoint(cfg, kind, with_mask, layout, seed):
    """sum(deform_conv2d(v) * g) == sum(v * grad_input(g)) for random v, g (offsets, mask, weight
    fixed, no bias), float64 rtol 1e-12, offsets at integers / borders / outside included
    [oracle: adjoint identity]."""
    rng = np.random.default_rng(seed)
    v, offset, weight, _, mask, gout = make_arrays(rng, cfg, kind, with_mask, False)
    lin = run_forward(v, offset, weight, None, mask, cfg, layout)
    gx = run_backward(gout, v, offset, weight, mask, cfg, layout,
                      needs=(True, False, False, False, False))["grad_input"]
    lhs, rhs = np.vdot(lin, gout), np.vdot(v, gx)
    scale = np.abs(lin).ravel() @ np.abs(gout).ravel() + np.abs(v).ravel() @ np.abs(gx).ravel()
    assert abs(lhs - rhs) <= 1e-12 * scale + 1e-300, (lhs, rhs)


@settings(max_examples=examples(4))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       seed=seeds())
def test_weight_mask_bias_grads_match_naive_columns(cfg, kind, with_mask, seed):
    """grad_weight = grad_out . cols^T, grad_mask = sum_c (W^T grad_out) * cols (cols without
    mask), grad_bias = grad_out.sum((0, 2, 3)), also at integer and border offsets where finite
    differences do not apply (these are linear in the sample values) [oracle: naive loop]."""
    rng = np.random.default_rng(seed)
    x, offset, weight, _, mask, gout = make_arrays(rng, cfg, kind, with_mask, False)
    g = run_backward(gout, x, offset, weight, mask, cfg)
    kw = conv_kwargs(cfg)
    N, Cin, Cout, groups, G = cfg["N"], cfg["Cin"], cfg["Cout"], cfg["groups"], cfg["G"]
    K, Ho, Wo = cfg["kh"] * cfg["kw"], cfg["Ho"], cfg["Wo"]
    cols = ref_columns(x, offset, mask, cfg["kh"], cfg["kw"], **kw)
    cg = cols.reshape(N, groups, Cin // groups, K, Ho, Wo)
    gog = gout.reshape(N, groups, Cout // groups, Ho, Wo)
    gw = np.einsum("ngoyx,ngckyx->gock", gog, cg).reshape(weight.shape)
    np.testing.assert_allclose(g["grad_weight"], gw, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g["grad_bias"], gout.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    if mask is None:
        assert g["grad_mask"] is None
    else:
        cols1 = ref_columns(x, offset, None, cfg["kh"], cfg["kw"], **kw)
        wg = weight.reshape(groups, Cout // groups, Cin // groups, K)
        gcol = np.einsum("gock,ngoyx->ngckyx", wg, gog).reshape(N, Cin, K, Ho, Wo)
        gm = (gcol * cols1).reshape(N, G, Cin // G, K, Ho, Wo).sum(2).reshape(N, G * K, Ho, Wo)
        np.testing.assert_allclose(g["grad_mask"], gm, rtol=1e-10, atol=1e-10)


def test_nonfinite_and_huge_offsets_give_zero_and_zero_grad():
    """NaN / +-Inf / +-1e30 offsets: the sample is 0 and its offset and mask gradients are 0;
    nothing non-finite leaks into any output (DESIGN.md §4) [oracle: naive loop]."""
    rng = np.random.default_rng(5)
    cfg = _cfg(N=2, Cin=4, Cout=4, H=5, W=6, kh=3, kw=2, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg)
    bad = rng.uniform(size=offset.shape) < 0.2
    offset[bad] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], size=int(bad.sum()))
    out = run_forward(x, offset, weight, bias, mask, cfg)
    np.testing.assert_allclose(out, ref_deform_conv2d(x, offset, weight, bias, mask=mask,
                                                      **conv_kwargs(cfg)), rtol=1e-10, atol=1e-10)
    g = run_backward(gout, x, offset, weight, mask, cfg)
    for name, a in g.items():
        assert np.all(np.isfinite(a)), name
    # a pair (dy, dx) with a bad entry samples 0: both offset entries and the mask get 0
    pair_bad = bad.reshape(2, -1, 2, cfg["Ho"], cfg["Wo"]).any(2)
    go = g["grad_offset"].reshape(2, -1, 2, cfg["Ho"], cfg["Wo"]).transpose(0, 1, 3, 4, 2)
    assert np.all(go[pair_bad] == 0)
    assert np.all(g["grad_mask"][pair_bad] == 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_samples_that_read_nothing_pass_no_nonfinite_gradient(layout):
    """Samples with no corner inside the image, or exactly at torchvision's cutoff (y = -1: the
    corner inside has weight 0), read nothing. An Inf grad_out at output pixels all of whose
    samples are such, and NaN masks on such samples, change no input or mask gradient, nor the
    offset gradient of samples with no corner inside (at the cutoff the offset derivative is
    kept and scales with the mask). They once put 0 * Inf = NaN into pixel 0, where their unused
    taps point, and NaN into those offset gradients, unlike the CUDA kernels. [oracle: the same
    call with those grad_out entries 0 and those masks 0.5, bit for bit]"""
    rng = np.random.default_rng(7)
    cfg = _cfg(N=2, Cin=4, Cout=4, H=5, W=6, kh=3, kw=3, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, "mixed")
    N, G, K, Ho, Wo = 2, 2, 9, cfg["Ho"], cfg["Wo"]
    off = offset.reshape(N, G, K, 2, Ho, Wo)  # (dy, dx) of each group and tap
    dead = rng.uniform(size=(N, Ho, Wo)) < 0.3  # output pixels whose samples all read nothing
    dead[:, 0] = False  # (row 0 has cutoff samples, whose offset derivative sees grad_out)
    off[:, :, :, 0][np.broadcast_to(dead[:, None, None], (N, G, K, Ho, Wo))] = 50.0
    off[:, :, 0:3, 0, 0, :] = 0.0  # kernel row 0 at output row 0, padding 1: y = -1 exactly
    far = np.broadcast_to(dead[:, None, None], (N, G, K, Ho, Wo)).copy()
    far[:, :, 0:3, 0, :] = False
    cutoff = np.zeros_like(far)
    cutoff[:, :, 0:3, 0, :] = True
    nan_mask = (far | cutoff) & (rng.uniform(size=far.shape) < 0.5)
    bad_mask, ref_mask = mask.copy(), mask.copy()
    bad_mask.reshape(far.shape)[nan_mask] = np.nan
    ref_mask.reshape(far.shape)[nan_mask] = 0.5
    inf_out = np.broadcast_to(dead[:, None], gout.shape)
    bad_gout, ref_gout = np.where(inf_out, np.inf, gout), np.where(inf_out, 0.0, gout)
    assert (nan_mask & far).sum() > 5 and (nan_mask & cutoff).sum() > 5 and dead.sum() > 5
    needs = (True, True, False, True, False)  # grad_weight: rows of 0 times Inf are NaN (BLAS)
    g = run_backward(bad_gout, x, offset, weight, bad_mask, cfg, layout, needs=needs)
    ref = run_backward(ref_gout, x, offset, weight, ref_mask, cfg, layout, needs=needs)
    for name in ("grad_input", "grad_mask"):
        assert np.isfinite(ref[name]).all(), name
        np.testing.assert_array_equal(g[name], ref[name], err_msg=name)
    scaled = np.repeat((nan_mask & cutoff)[:, :, :, None], 2, axis=3).reshape(offset.shape)
    assert np.isfinite(ref["grad_offset"]).all()
    np.testing.assert_array_equal(g["grad_offset"][~scaled], ref["grad_offset"][~scaled])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
@pytest.mark.parametrize("where", [(0, 0), (2, 3)])
def test_nonfinite_input_pixel_stays_local(bad_value, where):
    """A NaN / Inf pixel of x reaches only the outputs whose samples read it: every output the
    naive loop gives finite is finite and equal, in particular samples outside the image (which
    read nothing, as in torchvision) and padding taps; grad_input never reads x and stays finite
    [oracle: naive loop]."""
    rng = np.random.default_rng(6)
    cfg = _cfg(N=2, Cin=4, Cout=4, H=5, W=6, kh=3, kw=3, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, "mixed")
    x[:, :, where[0], where[1]] = bad_value
    expected = ref_deform_conv2d(x, offset, weight, bias, mask=mask, **conv_kwargs(cfg))
    out = run_forward(x, offset, weight, bias, mask, cfg)
    ok = np.isfinite(expected)
    assert ok.mean() > 0.3  # the test means something
    np.testing.assert_allclose(out[ok], expected[ok], rtol=1e-10, atol=1e-10)
    g = run_backward(gout, x, offset, weight, mask, cfg,
                     needs=(True, False, False, True, False))
    assert np.all(np.isfinite(g["grad_input"]))
    cols1 = ref_columns(x, offset, None, 3, 3, **conv_kwargs(cfg))
    gcol = np.einsum("gock,ngoyx->ngckyx", weight.reshape(2, 2, 2, 9),
                     gout.reshape(2, 2, 2, 5, 6)).reshape(2, 4, 9, 5, 6)
    gm = (gcol * cols1).reshape(2, 2, 2, 9, 5, 6).sum(2).reshape(2, 18, 5, 6)
    ok = np.isfinite(gm)
    np.testing.assert_allclose(g["grad_mask"][ok], gm[ok], rtol=1e-10, atol=1e-10)


@settings(max_examples=examples(4))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       seed=seeds())
def test_float32_grads_match_float64(cfg, kind, with_mask, seed):
    """float32 gradients == float64 gradients of the same float32-representable inputs, within
    1e-4 of the gradients' magnitudes (offset gradients only where no sample point is within
    1e-3 of a cell edge, where the float32 and float64 cells may differ) [oracle: float64 result,
    itself checked against finite differences and torchvision]."""
    rng = np.random.default_rng(seed)
    arrays = make_arrays(rng, cfg, kind, with_mask, False)
    x, offset, weight, _, mask, gout = (None if a is None else
                                        a.astype(np.float32).astype(np.float64) for a in arrays)
    g64 = run_backward(gout, x, offset, weight, mask, cfg)
    g32 = run_backward(gout, x, offset, weight, mask, cfg, dtype=np.float32)
    frac = offset - np.round(offset)
    near_edge = np.abs(frac) < 1e-3
    for name in GRAD_NAMES:
        if g64[name] is None:
            assert g32[name] is None, name
            continue
        a, b = g32[name].astype(np.float64), g64[name]
        if name == "grad_offset":
            keep = ~near_edge.reshape(near_edge.shape[0], -1, 2, *near_edge.shape[2:]).any(2)
            keep = np.repeat(keep, 2, axis=1)
            a, b = a[keep], b[keep]
        scale = max(1.0, np.abs(b).max()) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def _cells_inside(offset, cfg):
    """(N, 2GK, Ho, Wo) bool: the sample point's four corners are all inside the image (the
    derivative there is a difference of neighbouring pixels, not a jump to the padding)."""
    N, G, kh, kw, Ho, Wo = (cfg[k] for k in ("N", "G", "kh", "kw", "Ho", "Wo"))
    (sy, sx), (py, px), (dy, dx) = cfg["stride"], cfg["padding"], cfg["dilation"]
    off = offset.reshape(N, G, kh, kw, 2, Ho, Wo)
    y0 = (np.arange(kh) * dy)[:, None] + np.arange(Ho) * sy - py  # (kh, Ho)
    x0 = (np.arange(kw) * dx)[:, None] + np.arange(Wo) * sx - px  # (kw, Wo)
    y = y0[:, None, :, None] + off[:, :, :, :, 0]  # (N, G, kh, kw, Ho, Wo)
    x = x0[None, :, None, :] + off[:, :, :, :, 1]
    inside = (y >= 0) & (y < cfg["H"] - 1) & (x >= 0) & (x < cfg["W"] - 1)
    return np.repeat(inside[:, :, :, :, None], 2, axis=4).reshape(offset.shape)


def _steep_image(rng, cfg, kind):
    """float64 (N, Cin, H, W): a large mean plus noise of 1, or stripes of 0 and 255 along x or
    y (a steep edge across one derivative) plus noise of 1/64: small differences along the
    derivatives next to large ones."""
    N, Cin, H, W = cfg["N"], cfg["Cin"], cfg["H"], cfg["W"]
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    base = {"large mean": np.full((H, W), 16384.0), "stripes along x": 255.0 * (xx % 2),
            "stripes along y": 255.0 * (yy % 2)}[kind]
    return base + rng.uniform(-1, 1, (N, Cin, H, W)) * (1.0 if kind == "large mean" else 1 / 64)


@settings(max_examples=examples(4))
@given(cfg=conv_configs(), with_mask=st.booleans(), seed=seeds(),
       layout=st.sampled_from(LAYOUTS),
       kind=st.sampled_from(["large mean", "stripes along x", "stripes along y"]))
def test_float32_offset_grad_keeps_its_precision_on_large_and_steep_images(cfg, with_mask, seed,
                                                                          layout, kind):
    """Where the image has a large mean (raw 0-255 pixels, activations after a ReLU) or a steep
    edge across the derivative, the offset gradient is a small difference of large corner
    values: float32 keeps it to about 1e-6 of its own size, as torchvision's per-channel
    differences do. (Sums of the four corners' values over the channels, differenced
    afterwards, lost it: a relative error of 1e-3 to 1e-1 at a mean of 1000; differences
    taken against one corner only lost it next to stripes.) [oracle: the float64 gradient of
    the same float32 inputs]"""
    rng = np.random.default_rng(seed)
    _, offset, weight, _, mask, gout = make_arrays(rng, cfg, with_mask=with_mask, smooth=True)
    x = _steep_image(rng, cfg, kind)
    arrays = [None if a is None else a.astype(np.float32).astype(np.float64)
              for a in (gout, x, offset, weight, mask)]
    needs = (False, True, False, True, False)
    b = run_backward(*arrays, cfg, layout, needs=needs)
    a = run_backward(*arrays, cfg, layout, np.float32, needs=needs)
    inside = _cells_inside(arrays[2], cfg)
    for axis in (0, 1):  # d/dy and d/dx apart: next to stripes one is far larger than the other
        sel = inside.copy()
        sel[:, 1 - axis::2] = False
        ga, gb = a["grad_offset"][sel].astype(np.float64), b["grad_offset"][sel]
        if gb.size:
            np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5 * np.abs(gb).max(),
                                       err_msg=f"d/d{'yx'[axis]}")
    if with_mask:
        np.testing.assert_allclose(a["grad_mask"], b["grad_mask"], rtol=1e-4,
                                   atol=1e-5 * np.abs(b["grad_mask"]).max())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_infinite_pixel_gives_infinite_not_nan_offset_and_mask_grads(dtype):
    """An infinite first corner: the derivatives are -Inf (the value falls from it) and the
    mask gradient +Inf, as torchvision gives, not the NaN of Inf - Inf in the pixels'
    differences [oracle: the bilinear formula by hand]."""
    x = np.arange(36, dtype=dtype).reshape(1, 1, 6, 6)
    x[0, 0, 2, 2] = np.inf
    offset = np.zeros((1, 2, 6, 6), dtype)
    offset[0, :, 2, 2] = 0.3, 0.4  # the sample of output (2, 2): y = 2.3, x = 2.4
    gout = np.zeros((1, 1, 6, 6), dtype)
    gout[0, 0, 2, 2] = 1.0
    mask = np.ones((1, 1, 6, 6), dtype)
    g = dops.deform_conv2d_backward(gout, x, offset, np.ones((1, 1, 1, 1), dtype), mask=mask)
    assert g.grad_offset[0, 0, 2, 2] == -np.inf and g.grad_offset[0, 1, 2, 2] == -np.inf
    assert g.grad_mask[0, 0, 2, 2] == np.inf
    # samples that do not read the pixel: finite (0: grad_out is 0 there)
    assert (g.grad_offset[0, :, 3:] == 0).all() and (g.grad_mask[0, 0, 3:] == 0).all()


# ====================================================================== 4. grouped conv


@settings(max_examples=examples(2))
@given(cfg=conv_configs(), with_bias=st.booleans(), ones_mask=st.booleans(),
       layout=st.sampled_from(LAYOUTS), seed=seeds())
def test_zero_offsets_equal_grouped_conv(cfg, with_bias, ones_mask, layout, seed):
    """Zero offsets and no mask (or mask = 1): forward == plain grouped convolution, and every
    gradient == the einsum-derived one: grad_weight = grad_out . cols^T, grad_input its
    transpose scatter, grad_offset the right-hand difference of the zero-padded image
    (also at y = -1 and y = H - 1), grad_mask the columns [oracle: grouped conv]."""
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, _, gout = make_arrays(rng, cfg, "zero", False, with_bias)
    mask = np.ones((cfg["N"], cfg["G"] * cfg["kh"] * cfg["kw"], cfg["Ho"], cfg["Wo"])) \
        if ones_mask else None
    kw = conv_kwargs(cfg)
    out = run_forward(x, offset, weight, bias, mask, cfg, layout)
    np.testing.assert_allclose(out, einsum_conv2d(x, weight, bias, **kw), rtol=1e-12, atol=1e-12)
    g = run_backward(gout, x, offset, weight, mask, cfg, layout)
    gi, go, gw, gm, gb = einsum_conv2d_grads(gout, x, weight, cfg["G"], **kw)
    np.testing.assert_allclose(g["grad_input"], gi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["grad_offset"], go, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["grad_weight"], gw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["grad_bias"], gb, rtol=1e-12, atol=1e-12)
    if ones_mask:
        np.testing.assert_allclose(g["grad_mask"], gm, rtol=1e-12, atol=1e-12)
    else:
        assert g["grad_mask"] is None


# ====================================================================== 5. layouts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=examples(4))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       seed=seeds())
def test_nhwc_matches_nchw(dtype, cfg, kind, with_mask, seed):
    """NHWC forward and every gradient == the NCHW ones, transposed (float32: within 1e-5 of
    the magnitudes, float64: 1e-12) [oracle: NCHW result]."""
    rng = np.random.default_rng(seed)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, kind, with_mask, True)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    a = run_forward(x, offset, weight, bias, mask, cfg, "NCHW", dtype)
    b = run_forward(x, offset, weight, bias, mask, cfg, "NHWC", dtype)
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * max(1.0, np.abs(a).max()))
    ga = run_backward(gout, x, offset, weight, mask, cfg, "NCHW", dtype)
    gb = run_backward(gout, x, offset, weight, mask, cfg, "NHWC", dtype)
    for name in GRAD_NAMES:
        if ga[name] is None:
            assert gb[name] is None, name
            continue
        np.testing.assert_allclose(gb[name], ga[name], rtol=tol,
                                   atol=tol * max(1.0, np.abs(ga[name]).max()), err_msg=name)


def test_noncontiguous_views_accepted():
    """Transposed / strided views give the same result as contiguous copies
    [oracle: NCHW result on contiguous arrays]."""
    rng = np.random.default_rng(8)
    cfg = _cfg(N=2, Cin=4, Cout=4, H=5, W=6, kh=3, kw=3, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg)
    # NCHW views of NHWC memory, and a weight view with reversed memory order
    xv = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    ov = np.ascontiguousarray(offset.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    mv = np.ascontiguousarray(mask.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    wv = np.asfortranarray(weight)
    gv = np.ascontiguousarray(gout.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    bv = np.stack([bias, -bias], axis=1)[:, 0]
    kw = conv_kwargs(cfg)
    out = dops.deform_conv2d(xv, ov, wv, bv, mask=mv, **kw)
    np.testing.assert_allclose(out, dops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw),
                               rtol=1e-13, atol=1e-13)
    a = dops.deform_conv2d_backward(gv, xv, ov, wv, mask=mv, **kw)
    b = dops.deform_conv2d_backward(gout, x, offset, weight, mask=mask, **kw)
    for u, v, name in zip(a, b, GRAD_NAMES):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13, err_msg=name)
    # channels-last input runs the NHWC kernels: results are NCHW views of NHWC memory
    for r in (out, a.grad_input, a.grad_offset, a.grad_mask):
        assert r.transpose(0, 2, 3, 1).flags.c_contiguous
    # a channels-last x with plain NCHW offset, mask and grad_out gives the same values
    np.testing.assert_allclose(dops.deform_conv2d(xv, offset, weight, bias, mask=mask, **kw),
                               out, rtol=1e-13, atol=1e-13)
    c = dops.deform_conv2d_backward(gout, xv, offset, weight, mask=mask, **kw)
    for u, v, name in zip(c, b, GRAD_NAMES):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13, err_msg=name)


def test_readonly_and_dlpack_inputs():
    """Read-only NumPy arrays and torch CPU tensors (DLPack) give the same results as writable
    arrays [oracle: NCHW result on writable arrays]."""
    rng = np.random.default_rng(14)
    cfg = _cfg(N=2, Cin=4, Cout=4, H=5, W=5, kh=3, kw=3, groups=2, G=2, stride=1, padding=1,
               dilation=1)
    arrays = make_arrays(rng, cfg)
    x, offset, weight, bias, mask, gout = arrays
    kw = conv_kwargs(cfg)
    out = dops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    grads = dops.deform_conv2d_backward(gout, x, offset, weight, mask=mask, **kw)
    ro = [a.copy() for a in arrays]
    for a in ro:
        a.setflags(write=False)
    variants = [ro]
    try:
        import torch
        variants.append([torch.from_numpy(a.copy()) for a in arrays])
    except ImportError:
        pass
    for x_, o_, w_, b_, m_, g_ in variants:
        np.testing.assert_allclose(dops.deform_conv2d(x_, o_, w_, b_, mask=m_, **kw), out,
                                   rtol=1e-13, atol=1e-13)
        res = dops.deform_conv2d_backward(g_, x_, o_, w_, mask=m_, **kw)
        for a, b, name in zip(res, grads, GRAD_NAMES):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13, err_msg=name)


# ====================================================================== 6. determinism


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", ["small", "several row blocks", "depthwise"])
def test_bit_identical_across_runs_and_thread_counts(dtype, size, layout):
    """Two runs, and 1 vs 2 Numba threads, give bit-identical forward and gradients; the larger
    cases have several row blocks per tile (matmul and store split among threads), the last
    one a depthwise conv (channel multiplier 2, its own kernels) [oracle: first run]."""
    rng = np.random.default_rng(9)
    if size == "small":
        cfg = _cfg(N=5, Cin=8, Cout=6, H=11, W=9, kh=3, kw=2, groups=2, G=4, stride=(1, 2),
                   padding=1, dilation=(2, 1))
    elif size == "depthwise":
        cfg = _cfg(N=3, Cin=16, Cout=32, H=29, W=27, kh=3, kw=3, groups=16, G=4, stride=1,
                   padding=1, dilation=1)
    else:
        cfg = _cfg(N=3, Cin=16, Cout=24, H=29, W=27, kh=3, kw=3, groups=1, G=2, stride=1,
                   padding=1, dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, "mixed")

    def both():
        f = run_forward(x, offset, weight, bias, mask, cfg, layout, dtype)
        g = run_backward(gout, x, offset, weight, mask, cfg, layout, dtype)
        return [f] + [g[n] for n in GRAD_NAMES]

    first = both()
    for a, b in zip(first, both()):
        np.testing.assert_array_equal(a, b)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread")
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = both()
        numba.set_num_threads(2)
        two = both()
    finally:
        numba.set_num_threads(saved)
    for a, b, c in zip(first, one, two):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


# ====================================================================== 7. needs_input_grad


@pytest.mark.parametrize("with_mask", [False, True])
def test_needs_input_grad_subsets(with_mask):
    """Every subset of needs_input_grad: unrequested entries are None (grad_mask also None
    without a mask), requested ones equal the full backward [oracle: full backward]."""
    rng = np.random.default_rng(10)
    cfg = _cfg(N=2, Cin=6, Cout=4, H=5, W=7, kh=2, kw=3, groups=2, G=3, stride=(2, 1),
               padding=(1, 0), dilation=1)
    x, offset, weight, _, mask, gout = make_arrays(rng, cfg, "mixed", with_mask)
    full = run_backward(gout, x, offset, weight, mask, cfg)
    for needs in itertools.product([False, True], repeat=5):
        g = run_backward(gout, x, offset, weight, mask, cfg, needs=needs)
        for need, name in zip(needs, GRAD_NAMES):
            if not need or (name == "grad_mask" and mask is None):
                assert g[name] is None, (needs, name)
            else:
                np.testing.assert_allclose(g[name], full[name], rtol=1e-13, atol=1e-13,
                                           err_msg=f"{needs} {name}")


def test_needs_input_grad_validated():
    """needs_input_grad must have 5 entries [oracle: DESIGN.md §5]."""
    rng = np.random.default_rng(0)
    cfg = _cfg(N=1, Cin=2, Cout=2, H=3, W=3, kh=1, kw=1, groups=1, G=1, stride=1, padding=0,
               dilation=1)
    x, offset, weight, _, _, gout = make_arrays(rng, cfg)
    with pytest.raises(ValueError, match="needs_input_grad"):
        dops.deform_conv2d_backward(gout, x, offset, weight, needs_input_grad=(True,) * 4)
    with pytest.raises(TypeError, match="needs_input_grad"):
        dops.deform_conv2d_backward(gout, x, offset, weight, needs_input_grad=True)
    # not their truthiness: a string, None or float entries are a TypeError
    for bad in ("TTTTT", (True, None, True, True, True), (1.0,) * 5):
        with pytest.raises(TypeError, match="needs_input_grad"):
            dops.deform_conv2d_backward(gout, x, offset, weight, needs_input_grad=bad)
    # bools of NumPy and integer truth values are fine
    g = dops.deform_conv2d_backward(gout, x, offset, weight,
                                    needs_input_grad=(np.True_, 0, 1, False, True))
    assert g.grad_input is not None and g.grad_offset is None and g.grad_mask is None


# ====================================================================== 8. errors, N = 0


def _good(N=2, Cin=4, Cout=6, H=6, W=7, kh=3, kw=2, groups=2, G=2, **hyper):
    """Valid NCHW float64 arguments; ``hyper`` overrides stride/padding/dilation."""
    kw_ = dict(stride=1, padding=1, dilation=1)
    kw_.update(hyper)
    Ho, Wo = out_size(H, W, kh, kw, **kw_)
    K = kh * kw
    return dict(x=np.zeros((N, Cin, H, W)), offset=np.zeros((N, 2 * G * K, Ho, Wo)),
                weight=np.zeros((Cout, Cin // groups, kh, kw)), bias=np.zeros(Cout),
                mask=np.zeros((N, G * K, Ho, Wo)), grad_out=np.zeros((N, Cout, Ho, Wo)),
                **kw_)


def _call(which, a, layout="NCHW"):
    hyper = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], layout=layout)
    if which == "forward":
        return dops.deform_conv2d(a["x"], a["offset"], a["weight"], a["bias"], mask=a["mask"],
                                  **hyper)
    return dops.deform_conv2d_backward(a["grad_out"], a["x"], a["offset"], a["weight"],
                                       mask=a["mask"], **hyper)


def _set(**changes):
    def apply(a):
        a.update(changes)
        return a
    return apply


def _shape(name, shape):
    return lambda a: {**a, name: np.zeros(shape, a[name].dtype if hasattr(a[name], "dtype")
                                          else np.float64)}


BAD_VALUES = [
    # (id, mutation of _good(), exception, match)
    ("cin_not_multiple", _shape("weight", (6, 3, 3, 2)), ValueError, "weight"),
    ("cout_not_divisible", _shape("weight", (5, 2, 3, 2)), ValueError, "weight|groups"),
    ("offset_channels_not_2K", _shape("offset", (2, 13, 6, 8)), ValueError, "offset"),
    ("offset_groups_not_dividing", _shape("offset", (2, 36, 6, 8)), ValueError, "offset"),
    ("offset_spatial", _shape("offset", (2, 24, 6, 7)), ValueError, "offset"),
    ("offset_batch", _shape("offset", (1, 24, 6, 8)), ValueError, "offset"),
    ("mask_spatial", _shape("mask", (2, 12, 5, 8)), ValueError, "mask"),
    ("mask_channels", _shape("mask", (2, 6, 6, 8)), ValueError, "mask"),
    ("mask_batch", _shape("mask", (3, 12, 6, 8)), ValueError, "mask"),
    ("negative_padding", _set(padding=-1), ValueError, "padding"),
    ("negative_padding_pair", _set(padding=(1, -1)), ValueError, "padding"),
    ("stride_zero", _set(stride=0), ValueError, "stride"),
    ("stride_pair_zero", _set(stride=(1, 0)), ValueError, "stride"),
    ("dilation_zero", _set(dilation=0), ValueError, "dilation"),
    ("dilation_negative", _set(dilation=(-1, 1)), ValueError, "dilation"),
    ("stride_triple", _set(stride=(1, 1, 1)), ValueError, "stride"),
    ("stride_over_int32", _set(stride=(1, 2**31)), ValueError, "stride"),
    ("padding_over_int32", _set(padding=2**31), ValueError, "padding"),
    ("dilation_over_int32", _set(dilation=(2**40, 1)), ValueError, "dilation"),
    ("kernel_larger_than_padded", _shape("weight", (6, 2, 9, 2)), ValueError,
     "kernel|weight|padded"),
    ("bias_shape", _shape("bias", (5,)), ValueError, "bias"),
    ("bias_2d", _shape("bias", (6, 1)), ValueError, "bias"),
    ("x_3d", _shape("x", (4, 6, 7)), ValueError, "x"),
    ("x_no_channels", _shape("x", (2, 0, 6, 7)), ValueError, r"\bx\b.*channel"),
    ("offset_3d", _shape("offset", (24, 6, 8)), ValueError, "offset"),
    ("weight_3d", _shape("weight", (6, 2, 6)), ValueError, "weight"),
    ("mask_5d", _shape("mask", (2, 12, 6, 8, 1)), ValueError, "mask"),
    ("layout", _set(), ValueError, "layout"),
    ("x_float32", lambda a: {**a, "x": a["x"].astype(np.float32)}, TypeError, "x|dtype"),
    ("weight_float32", lambda a: {**a, "weight": a["weight"].astype(np.float32)}, TypeError,
     "weight"),
    ("offset_float32", lambda a: {**a, "offset": a["offset"].astype(np.float32)}, TypeError,
     "offset"),
    ("mask_float32", lambda a: {**a, "mask": a["mask"].astype(np.float32)}, TypeError, "mask"),
    ("bias_float32", lambda a: {**a, "bias": a["bias"].astype(np.float32)}, TypeError, "bias"),
    ("x_int", lambda a: {**a, "x": a["x"].astype(np.int64)}, TypeError, "x"),
    ("offset_int", lambda a: {**a, "offset": a["offset"].astype(np.int32)}, TypeError, "offset"),
    ("all_float16", lambda a: {**a, **{k: a[k].astype(np.float16) for k in
                                       ("x", "offset", "weight", "bias", "mask", "grad_out")}},
     TypeError, "x"),
    ("x_list", lambda a: {**a, "x": a["x"].tolist()}, TypeError, "x"),
    ("weight_none", _set(weight=None), TypeError, "weight"),
    ("offset_scalar", _set(offset=0.0), TypeError, "offset"),
    ("padding_float", _set(padding=1.5), TypeError, "padding"),
    ("stride_bool", _set(stride=True), TypeError, "stride"),
    ("dilation_float_in_pair", _set(dilation=(1, 1.0)), TypeError, "dilation"),
]


# the backward takes no bias
BAD_CASES = [pytest.param(case, which, id=f"{which}-{case[0]}") for which in ("forward", "backward")
             for case in BAD_VALUES if not (which == "backward" and case[0].startswith("bias"))]


@pytest.mark.parametrize("case, which", BAD_CASES)
def test_bad_inputs_raise_naming_the_argument(case, which):
    """Each invalid input raises ValueError (shapes, values) or TypeError (dtypes, array types)
    whose message names the argument [oracle: DESIGN.md §5]."""
    name, mutate, exc, match = case
    # offsets/masks sized for the good output (6, 8) of a 6x7 input, 3x2 kernel, padding 1
    a = mutate(_good())
    layout = "NCWH" if name == "layout" else "NCHW"
    with pytest.raises(exc, match=match):
        _call(which, a, layout)


@pytest.mark.parametrize("case", [
    ("grad_out_shape", (2, 6, 6, 7)), ("grad_out_channels", (2, 5, 6, 8)),
    ("grad_out_3d", (6, 6, 8)),
])
def test_bad_grad_out_shape(case):
    """grad_out must have the output's shape [oracle: DESIGN.md §5]."""
    a = _good()
    a["grad_out"] = np.zeros(case[1])
    with pytest.raises(ValueError, match="grad_out"):
        _call("backward", a)


def test_grad_out_dtype_must_match():
    """grad_out of another dtype: TypeError [oracle: DESIGN.md §5]."""
    a = _good()
    a["grad_out"] = a["grad_out"].astype(np.float32)
    with pytest.raises(TypeError, match="grad_out"):
        _call("backward", a)


def test_nhwc_shape_errors_use_nhwc_shapes():
    """In NHWC an NCHW-shaped offset is rejected, naming offset [oracle: DESIGN.md §3/§5]."""
    a = _good()
    a["x"] = to_layout(a["x"], "NHWC")
    a["mask"] = to_layout(a["mask"], "NHWC")
    a["grad_out"] = to_layout(a["grad_out"], "NHWC")
    with pytest.raises(ValueError, match="offset"):
        _call("forward", a, "NHWC")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_batch(layout, dtype, with_mask):
    """N = 0 returns empty arrays of the right shapes and dtype, forward and backward
    [oracle: DESIGN.md §5]."""
    a = _good(N=0)
    for k in ("x", "offset", "weight", "bias", "mask", "grad_out"):
        a[k] = a[k].astype(dtype)
    if not with_mask:
        a["mask"] = None
    nchw = dict(a)
    for k in ("x", "offset", "mask", "grad_out"):
        if a[k] is not None:
            a[k] = to_layout(a[k], layout)
    out = _call("forward", a, layout)
    assert out.dtype == dtype
    assert out.shape == to_layout(nchw["grad_out"], layout).shape
    g = _call("backward", a, layout)
    for name, ref in zip(GRAD_NAMES, ("x", "offset", "weight", "mask", "bias")):
        if ref == "mask" and not with_mask:
            assert g.grad_mask is None
            continue
        got = getattr(g, name)
        assert got is not None and got.dtype == dtype and got.shape == a[ref].shape, name
    assert np.all(g.grad_weight == 0) and np.all(g.grad_bias == 0)


# ====================================================================== 9. torchvision


def _torchvision_case(cfg, rng, kind, with_mask, with_bias):
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg, kind, with_mask, with_bias)
    t = {k: (None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True))
         for k, v in dict(x=x, offset=offset, weight=weight, bias=bias, mask=mask).items()}
    out = tv_ops.deform_conv2d(t["x"], t["offset"], t["weight"], t["bias"],
                               stride=cfg["stride"], padding=cfg["padding"],
                               dilation=cfg["dilation"], mask=t["mask"])
    out.backward(torch.tensor(gout))
    tv_grads = {f"grad_{'input' if k == 'x' else k}": (None if v is None else
                                                        v.grad.numpy()) for k, v in t.items()}
    ours_out = run_forward(x, offset, weight, bias, mask, cfg)
    ours = run_backward(gout, x, offset, weight, mask, cfg)
    np.testing.assert_allclose(ours_out, out.detach().numpy(), rtol=1e-10, atol=1e-10)
    for name in GRAD_NAMES:
        if name == "grad_bias" and bias is None:
            continue
        if tv_grads[name] is None:
            assert ours[name] is None, name
            continue
        np.testing.assert_allclose(ours[name], tv_grads[name], rtol=1e-10, atol=1e-10,
                                   err_msg=name)


@settings(max_examples=examples(2))
@given(cfg=conv_configs(), kind=st.sampled_from(OFFSET_KINDS), with_mask=st.booleans(),
       with_bias=st.booleans(), seed=seeds())
def test_matches_torchvision(cfg, kind, with_mask, with_bias, seed):
    """Forward and every gradient (autograd of torchvision.ops.deform_conv2d, with and without
    bias and mask, groups and offset groups 1-4, offsets uniform / integer (border taps, where
    the offset gradient is the right-hand derivative) / zero) == deformops in float64 within
    1e-10 [oracle: torchvision]."""
    pytest.importorskip("torchvision")
    _torchvision_case(cfg, np.random.default_rng(seed), kind, with_mask, with_bias)


def test_matches_torchvision_prime_batch():
    """N = 37 > 32 (torchvision's n_parallel_imgs) [oracle: torchvision]."""
    pytest.importorskip("torchvision")
    cfg = _cfg(N=37, Cin=6, Cout=4, H=4, W=5, kh=3, kw=3, groups=2, G=3, stride=1, padding=1,
               dilation=1)
    _torchvision_case(cfg, np.random.default_rng(17), "mixed", True, True)


def test_results_start_on_a_cache_line():
    """NumPy results of deform_conv2d and sample (outputs and gradients, both layouts) start on
    a 64-byte boundary, which TensorFlow needs to share them without a copy
    [oracle: the buffer address]."""
    rng = np.random.default_rng(3)
    cfg = _cfg(N=2, Cin=4, Cout=6, H=7, W=5, kh=3, kw=3, groups=1, G=2, stride=1, padding=1,
               dilation=1)
    x, offset, weight, bias, mask, gout = make_arrays(rng, cfg)
    kw = conv_kwargs(cfg)
    for layout in LAYOUTS:
        cl = lambda a: to_layout(a, layout)  # noqa: E731
        out = dops.deform_conv2d(cl(x), cl(offset), weight, bias, mask=cl(mask), layout=layout,
                                 **kw)
        grads = dops.deform_conv2d_backward(cl(gout), cl(x), cl(offset), weight, mask=cl(mask),
                                            layout=layout, **kw)
        coords = rng.uniform(-1, 6, (2, 4, 3, 3)) if layout == "NCHW" else \
            rng.uniform(-1, 6, (2, 3, 3, 4))
        s = dops.sample(cl(x), coords, layout=layout)
        sg = dops.sample_backward(np.ones_like(s), cl(x), coords, layout=layout)
        for r in (out, *grads[:4], s, *sg):
            assert r.__array_interface__["data"][0] % 64 == 0
