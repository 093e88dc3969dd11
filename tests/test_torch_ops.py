"""deformops_torch operators: autograd, torchvision parity, layouts, zero copies, errors, edge
cases.

Oracles (each test names its own):

- [finite differences]: ``torch.autograd.gradcheck`` in float64 (central differences of the
  forward), at offsets whose fractional parts stay 0.1-0.3 px away from the integers and
  half-integers where the interpolant (or a border mode) has kinks;
- [torchvision]: ``torchvision.ops.deform_conv2d`` forward and autograd (skipped without it);
- [contiguous run]: the same op on contiguous copies of the inputs;
- [NumPy core]: ``deformops`` called directly on the NumPy views of the tensors (results, and the
  exception type of invalid calls);
- [data_ptr]: the addresses of the buffers that cross between torch and NumPy.
"""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import deformops  # noqa: E402
import deformops_torch as dt  # noqa: E402
from _torch_inputs import rand, smooth  # noqa: E402
import deformops_torch.ops as dt_ops  # noqa: E402

F64 = torch.float64


# tiny inputs: one Numba and one torch thread (see conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("grid-constant", "constant", "nearest", "reflect", "mirror", "wrap", "grid-wrap")


def conv_case(rng, N=1, Cin=2, Cout=2, H=4, W=4, k=(3, 3), stride=1, padding=1, dilation=1,
              groups=1, G=1, mask=False, bias=False):
    """float64 inputs of deform_conv2d: (input, offset, weight, bias, mask) and the conv kwargs."""
    kh, kw = k
    s, p, d = (torch.nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    Ho = (H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    x = rand(rng, N, Cin, H, W)
    off = smooth(rng, (N, 2 * G * kh * kw, Ho, Wo))
    w = rand(rng, Cout, Cin // groups, kh, kw)
    b = rand(rng, Cout) if bias else None
    m = rand(rng, N, G * kh * kw, Ho, Wo, lo=0.0, hi=1.0) if mask else None
    return (x, off, w, b, m), dict(stride=stride, padding=padding, dilation=dilation)


def call_conv(x, off, w, b, m, kw):
    return dt.deform_conv2d(x, off, w, b, mask=m, **kw)


# ====================================================================== gradcheck

CONV_GRADCHECK = {
    "v1": dict(),
    "v1+bias": dict(bias=True),
    "v2": dict(mask=True),
    "v2+bias": dict(mask=True, bias=True),
    "groups2": dict(Cin=4, Cout=4, groups=2, bias=True, mask=True),
    "offset_groups2": dict(Cin=4, G=2, mask=True),
    "stride2_dilation2": dict(H=6, W=7, k=(2, 3), stride=2, padding=(1, 2), dilation=2,
                              mask=True, bias=True),
    "batch2_stride(1,2)": dict(N=2, H=5, W=5, k=(3, 2), stride=(1, 2), padding=(0, 1)),
}


@pytest.mark.parametrize("name", list(CONV_GRADCHECK))
def test_deform_conv2d_gradcheck(name):
    """Gradients of input, offset, weight, bias and mask [oracle: finite differences]."""
    rng = np.random.default_rng(1)
    tensors, kw = conv_case(rng, **CONV_GRADCHECK[name])
    tensors = tuple(None if t is None else t.requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(lambda *a: call_conv(*a, kw), tensors)


@pytest.mark.parametrize("wrt", ["input", "offset", "weight", "bias", "mask", "offset+mask"])
def test_deform_conv2d_gradcheck_subsets(wrt):
    """Only some inputs require grad (the backward computes only those) [oracle: finite
    differences]."""
    rng = np.random.default_rng(2)
    tensors, kw = conv_case(rng, mask=True, bias=True)
    names = ("input", "offset", "weight", "bias", "mask")
    tensors = tuple(t.requires_grad_(n in wrt.split("+")) for n, t in zip(names, tensors))
    assert torch.autograd.gradcheck(lambda *a: call_conv(*a, kw), tensors)


def _sampling_inputs(rng, op, N=1, C=2, H=4, W=5, G=1, Ho=3, Wo=4, span=1):
    x = rand(rng, N, C, H, W)
    if op == "deform_sample":
        coords = smooth(rng, (N, 2 * G, H, W), span)
    else:  # absolute coordinates around the image, a band of 1.5 px outside included
        y = torch.from_numpy(rng.integers(-2, H + 1, size=(N, G, Ho, Wo))) + \
            smooth(rng, (N, G, Ho, Wo), 0)
        x_ = torch.from_numpy(rng.integers(-2, W + 1, size=(N, G, Ho, Wo))) + \
            smooth(rng, (N, G, Ho, Wo), 0)
        coords = torch.stack([y, x_], dim=2).reshape(N, 2 * G, Ho, Wo)
    return x, coords


SAMPLING_OPS = {"sample": dt.sample, "deform_sample": dt.deform_sample}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
def test_sampling_gradcheck_order1(op, mode):
    """Bilinear sampling, every mode, cval 0.25, two offset groups: gradients of x and of the
    coordinates/offsets [oracle: finite differences]."""
    rng = np.random.default_rng(3)
    x, coords = _sampling_inputs(rng, op, C=4, G=2)
    f = SAMPLING_OPS[op]
    assert torch.autograd.gradcheck(
        lambda a, c: f(a, c, order=1, mode=mode, cval=0.25),
        (x.requires_grad_(), coords.requires_grad_()))


@pytest.mark.parametrize("mode", ["grid-constant", "constant", "nearest", "reflect", "wrap"])
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
def test_sampling_gradcheck_order0(op, mode):
    """Nearest sampling: gradient of x [oracle: finite differences]; the coordinate gradient is
    exactly zero (order 0 is piecewise constant) [oracle: DESIGN §4]."""
    rng = np.random.default_rng(4)
    x, coords = _sampling_inputs(rng, op)
    f = SAMPLING_OPS[op]
    assert torch.autograd.gradcheck(lambda a: f(a, coords, order=0, mode=mode, cval=-0.5),
                                    (x.requires_grad_(),))
    coords.requires_grad_()
    out = f(x, coords, order=0, mode=mode, cval=-0.5)
    (g,) = torch.autograd.grad(out, coords, torch.randn_like(out))
    assert g.shape == coords.shape and not g.any()


@pytest.mark.parametrize("wrt", ["x", "coords"])
def test_sampling_gradcheck_one_input(wrt):
    """Only x or only the offsets require grad [oracle: finite differences]."""
    rng = np.random.default_rng(5)
    x, off = _sampling_inputs(rng, "deform_sample")
    x.requires_grad_(wrt == "x")
    off.requires_grad_(wrt == "coords")
    assert torch.autograd.gradcheck(lambda a, c: dt.deform_sample(a, c, mode="nearest"), (x, off))


# ====================================================================== torchvision


@st.composite
def tv_configs(draw):
    groups = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    H = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 7))
    W = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 7))
    return dict(N=draw(st.integers(1, 3)), Cin=2 * groups * G // min(groups, G),
                Cout=2 * groups, H=H, W=W, k=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, groups=groups, G=G, mask=draw(st.booleans()),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed")
@settings(max_examples=10)
@given(cfg=tv_configs())
def test_deform_conv2d_matches_torchvision(cfg):
    """Forward and every gradient (random grad_out; offsets anywhere in [-2.5, 2.5] px,
    borders included), float64, within 1e-10 [oracle: torchvision]."""
    import torchvision.ops as tvops

    cfg = dict(cfg)
    rng = np.random.default_rng(cfg.pop("seed"))
    tensors, kw = conv_case(rng, **cfg)
    tensors[1].copy_(rand(rng, *tensors[1].shape, lo=-2.5, hi=2.5))
    leaves = [t.requires_grad_() for t in tensors if t is not None]
    ours = call_conv(*tensors, kw)
    x, off, w, b, m = tensors
    ref = tvops.deform_conv2d(x, off, w, b, mask=m, **kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    go = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, leaves, go)
    g_ref = torch.autograd.grad(ref, leaves, go)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


# ====================================================================== layouts and strides


def _grads(out, leaves, go=None):
    return torch.autograd.grad(out, leaves, torch.ones_like(out) if go is None else go)


@pytest.mark.parametrize("mode", ["grid-constant", "reflect"])
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampling_channels_last(op, mode, dtype):
    """channels_last x gives a channels_last output (the NHWC kernel's, not copied) equal to the
    NCHW result, and equal gradients [oracle: contiguous run]."""
    rng = np.random.default_rng(6)
    x, coords = (t.to(dtype) for t in _sampling_inputs(rng, op, N=2, C=6, G=3))
    f = SAMPLING_OPS[op]
    xc = x.to(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    leaves = [x.requires_grad_(), coords.requires_grad_()]
    leaves_cl = [xc.requires_grad_(), coords.detach().clone().requires_grad_()]
    ref = f(*leaves, mode=mode)
    out = f(*leaves_cl, mode=mode)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.randn_like(ref)
    tol = 1e-12 if dtype == F64 else 1e-5
    for a, r in zip(_grads(out, leaves_cl, go), _grads(ref, leaves, go)):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def test_deform_conv2d_channels_last():
    """channels_last input, offset and mask give the NCHW results, in channels_last (the core's
    NHWC kernels, no copy) [oracle: contiguous run]."""
    rng = np.random.default_rng(7)
    tensors, kw = conv_case(rng, N=2, Cin=4, Cout=3, H=5, W=6, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in tensors]
    cl = [t.detach().to(memory_format=torch.channels_last) if t.dim() == 4 else t.detach()
          for t in tensors]
    cl = [t.clone().requires_grad_() if t.dim() != 4 else t.requires_grad_() for t in cl]
    assert not cl[0].is_contiguous()
    ref, out = call_conv(*leaves, kw), call_conv(*cl, kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    go = torch.randn_like(ref)
    for a, r in zip(_grads(out, cl, go), _grads(ref, leaves, go)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_noncontiguous_inputs():
    """Sliced and transposed views (every input of every op) give the results of their
    contiguous copies [oracle: contiguous run]."""
    rng = np.random.default_rng(8)
    big = rand(rng, 3, 6, 7, 9)
    x = big[::2, 1::2, :, 1:8].transpose(2, 3)             # (2, 3, 7, 7), strided view
    off = smooth(rng, (2, 7, 7, 18)).permute(0, 3, 2, 1)    # (2, 18, 7, 7), transposed
    w = rand(rng, 3, 4, 3, 5)[:, ::2, :, 1:4]               # (3, 2, 3, 3)... Cin/groups
    w = torch.cat([w, w], dim=1)[:, :3]                     # (3, 3, 3, 3) non-contiguous
    m = rand(rng, 2, 9, 7, 14, lo=0, hi=1)[..., ::2]
    for t in (x, off, m):
        assert not t.is_contiguous()
    views = [x, off, w, m]
    copies = [t.contiguous() for t in views]
    for t in views + copies:
        t.requires_grad_()
    out = dt.deform_conv2d(views[0], views[1], views[2], mask=views[3], padding=1)
    ref = dt.deform_conv2d(copies[0], copies[1], copies[2], mask=copies[3], padding=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(_grads(out, views), _grads(ref, copies)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)

    coords = smooth(rng, (2, 7, 7, 2)).permute(0, 3, 2, 1).requires_grad_()  # transposed
    xs = x.detach().requires_grad_()
    for f in SAMPLING_OPS.values():
        out = f(xs, coords, mode="mirror")
        xc = xs.detach().contiguous().requires_grad_()
        cc = coords.detach().contiguous().requires_grad_()
        ref = f(xc, cc, mode="mirror")
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for a, r in zip(_grads(out, [xs, coords]), _grads(ref, [xc, cc])):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_lazily_negated_views():
    """A view with torch's negative bit (the imaginary part of a conjugated complex tensor)
    reads as its negated values, for every input [oracle: the same values materialised]."""
    rng = np.random.default_rng(21)
    (x, off, w, b, m), kw = conv_case(rng, N=2, mask=True, bias=True)

    def negated(t):
        v = torch.complex(torch.zeros_like(t), -t).conj().imag  # == t, with the negative bit
        assert v.is_neg()
        return v

    ref = call_conv(x, off, w, b, m, kw)
    for i in range(5):
        args = [negated(t) if j == i else t for j, t in enumerate((x, off, w, b, m))]
        torch.testing.assert_close(call_conv(*args, kw), ref, rtol=0, atol=0)
    xs, cs = _sampling_inputs(rng, "deform_sample", N=2)
    for f in SAMPLING_OPS.values():
        torch.testing.assert_close(f(negated(xs), negated(cs)), f(xs, cs), rtol=0, atol=0)


def test_expanded_grad_out():
    """``out.sum().backward()`` hands the backward a stride-0 (expanded) grad_out: gradients
    equal those of an explicit ones tensor [oracle: contiguous run]."""
    rng = np.random.default_rng(9)
    tensors, kw = conv_case(rng, N=2, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in tensors]
    call_conv(*leaves, kw).sum().backward()
    got = [t.grad.clone() for t in leaves]
    ref = _grads(call_conv(*leaves, kw), leaves, None)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)

    x, coords = _sampling_inputs(rng, "deform_sample", N=2)
    for f in SAMPLING_OPS.values():
        xs, cs = x.clone().requires_grad_(), coords.clone().requires_grad_()
        f(xs, cs).sum().backward()
        ref = _grads(f(xs, cs), [xs, cs], None)
        torch.testing.assert_close(xs.grad, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(cs.grad, ref[1], rtol=0, atol=0)


def test_empty_batch():
    """N = 0: outputs and gradients are empty tensors of the right shapes, the weight and bias
    gradients zeros [oracle: DESIGN §5]."""
    rng = np.random.default_rng(10)
    tensors, kw = conv_case(rng, N=0, Cin=2, Cout=3, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in tensors]
    out = call_conv(*leaves, kw)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape and not t.grad.any()
    for f in SAMPLING_OPS.values():
        x = torch.zeros(0, 2, 4, 5, dtype=F64, requires_grad=True)
        c = torch.zeros(0, 2, 4, 5, dtype=F64, requires_grad=True)
        out = f(x, c)
        assert out.shape == (0, 2, 4, 5)
        out.sum().backward()
        assert x.grad.shape == x.shape and c.grad.shape == c.shape


def test_matches_numpy_core():
    """The adapter returns what deformops returns for the NumPy views, bit for bit, forward and
    backward [oracle: NumPy core]."""
    rng = np.random.default_rng(11)
    (x, off, w, b, m), kw = conv_case(rng, N=2, Cin=4, Cout=2, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in (x, off, w, b, m)]
    out = call_conv(*leaves, kw)
    go = torch.randn_like(out)
    grads = _grads(out, leaves, go)
    n = [t.detach().numpy() for t in (x, off, w, b, m)]
    np.testing.assert_array_equal(out.detach().numpy(),
                                  deformops.deform_conv2d(*n[:4], mask=n[4], **kw))
    ref = deformops.deform_conv2d_backward(go.numpy(), *n[:3], mask=n[4], **kw)
    for g, r in zip(grads, (ref.grad_input, ref.grad_offset, ref.grad_weight, ref.grad_bias,
                            ref.grad_mask)):
        np.testing.assert_array_equal(g.numpy(), r)


# ====================================================================== zero copies


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture
def crossings(monkeypatch):
    """Record every tensor -> array and array -> tensor crossing of the adapter (the functions
    that ops.py calls, looked up in its namespace at call time)."""
    log = {"in": [], "out": []}
    to_array, to_tensor = dt_ops.to_array, dt_ops.to_tensor

    def spy_to_array(t, name):
        a = to_array(t, name)
        if a is not None:
            log["in"].append((name, t.data_ptr(), _address(a)))
        return a

    def spy_to_tensor(a):
        t = to_tensor(a)
        log["out"].append((_address(a), t.data_ptr()))
        return t

    monkeypatch.setattr(dt_ops, "to_array", spy_to_array)
    monkeypatch.setattr(dt_ops, "to_tensor", spy_to_tensor)
    return log


def _assert_shared(log, result_ptrs):
    assert log["in"] and log["out"]
    for name, tptr, aptr in log["in"]:
        assert tptr == aptr, f"{name} was copied on its way into deformops"
    for aptr, tptr in log["out"]:
        assert aptr == tptr, "a deformops result was copied on its way back"
    returned = {tptr for _, tptr in log["out"]}
    for ptr in result_ptrs:
        assert ptr in returned


def test_zero_copy_deform_conv2d(crossings):
    """Every input (requiring grad, hence detached) reaches deformops as a view of the tensor's
    buffer, and the output and gradients are deformops' own arrays [oracle: data_ptr]."""
    rng = np.random.default_rng(12)
    tensors, kw = conv_case(rng, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in tensors]
    out = call_conv(*leaves, kw)
    go = torch.randn_like(out)
    grads = _grads(out, leaves, go)
    names = [n for n, _, _ in crossings["in"]]
    assert names == ["input", "offset", "weight", "bias", "mask",  # forward
                     "grad_out", "input", "offset", "weight", "mask"]  # backward
    _assert_shared(crossings, [out.data_ptr()] + [g.data_ptr() for g in grads])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
def test_zero_copy_sampling(crossings, monkeypatch, op, channels_last):
    """x, coords, grad_out reach deformops as views; outputs and gradients come back without a
    copy; a channels_last x is not copied inside deformops either (it runs the NHWC kernel)
    [oracle: data_ptr]."""
    kernel_inputs = []
    to_kernel_order = deformops._arrays.to_kernel_order

    def spy(a, cl):
        k = to_kernel_order(a, cl)
        kernel_inputs.append((_address(a), _address(k), cl))
        return k

    monkeypatch.setattr(deformops._arrays, "to_kernel_order", spy)
    rng = np.random.default_rng(13)
    x, coords = _sampling_inputs(rng, op, N=2, C=4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [x.requires_grad_(), coords.requires_grad_()]
    out = SAMPLING_OPS[op](*leaves)
    grads = _grads(out, leaves, torch.randn_like(out))
    _assert_shared(crossings, [out.data_ptr()] + [g.data_ptr() for g in grads])
    # the first conversion of each call is x's
    x_calls = [kernel_inputs[0], kernel_inputs[2]]
    for a_ptr, k_ptr, cl in x_calls:
        assert cl == channels_last and a_ptr == k_ptr


# ====================================================================== errors


def _core_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e)
    return None


def _error_cases():
    rng = np.random.default_rng(14)
    (x, off, w, b, m), kw = conv_case(rng, Cin=2, mask=True, bias=True)
    xs, cs = _sampling_inputs(rng, "deform_sample")
    n = lambda t: t.numpy()  # noqa: E731
    return {
        # name: (adapter call, core call with the NumPy views or None, expected type)
        "conv offset of wrong size": (
            lambda: dt.deform_conv2d(x, off[:, :10], w, padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off[:, :10]), n(w), padding=1), ValueError),
        "conv offset of wrong spatial size": (
            lambda: dt.deform_conv2d(x, off[..., :3], w, padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off[..., :3]), n(w), padding=1), ValueError),
        "conv mask of wrong size": (
            lambda: dt.deform_conv2d(x, off, w, mask=m[:, :4], padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), mask=n(m[:, :4]), padding=1),
            ValueError),
        "conv bias of wrong size": (
            lambda: dt.deform_conv2d(x, off, w, b[:1], padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), n(b[:1]), padding=1),
            ValueError),
        "conv float32/float64 mix": (
            lambda: dt.deform_conv2d(x, off.float(), w, padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off.float()), n(w), padding=1), TypeError),
        "conv bfloat16": (
            lambda: dt.deform_conv2d(x.bfloat16(), off.bfloat16(), w.bfloat16(), padding=1),
            None, TypeError),
        "conv float16": (
            lambda: dt.deform_conv2d(x.half(), off.half(), w.half(), padding=1),
            lambda: deformops.deform_conv2d(n(x.half()), n(off.half()), n(w.half()), padding=1),
            TypeError),
        "conv non-tensor input": (
            lambda: dt.deform_conv2d(n(x), off, w, padding=1),
            lambda: deformops.deform_conv2d(x.tolist(), n(off), n(w), padding=1), TypeError),
        "conv non-tensor mask": (
            lambda: dt.deform_conv2d(x, off, w, mask=m.tolist(), padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), mask=m.tolist(), padding=1),
            TypeError),
        "conv negative padding": (
            lambda: dt.deform_conv2d(x, off, w, padding=-1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), padding=-1), ValueError),
        "conv zero stride": (
            lambda: dt.deform_conv2d(x, off, w, stride=0, padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), stride=0, padding=1),
            ValueError),
        "conv float stride pair": (
            lambda: dt.deform_conv2d(x, off, w, stride=(1.0, 1), padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), stride=(1.0, 1), padding=1),
            TypeError),
        "conv float padding": (
            lambda: dt.deform_conv2d(x, off, w, padding=1.5),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), padding=1.5), TypeError),
        "conv string dilation pair": (
            lambda: dt.deform_conv2d(x, off, w, padding=1, dilation=("1", "1")),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), padding=1, dilation=("1", "1")),
            TypeError),
        "conv bool stride": (
            lambda: dt.deform_conv2d(x, off, w, stride=True, padding=1),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), stride=True, padding=1),
            TypeError),
        "conv bool in a padding pair": (
            lambda: dt.deform_conv2d(x, off, w, padding=(1, True)),
            lambda: deformops.deform_conv2d(n(x), n(off), n(w), padding=(1, True)), TypeError),
        "conv 3-D input": (
            lambda: dt.deform_conv2d(x[0], off, w, padding=1),
            lambda: deformops.deform_conv2d(n(x[0]), n(off), n(w), padding=1), ValueError),
        "sample float32/float64 mix": (
            lambda: dt.sample(xs, cs.float()),
            lambda: deformops.sample(n(xs), n(cs.float())), TypeError),
        "sample bfloat16": (lambda: dt.sample(xs.bfloat16(), cs.bfloat16()), None, TypeError),
        "deform_sample float16": (
            lambda: dt.deform_sample(xs.half(), cs.half()),
            lambda: deformops.deform_sample(n(xs.half()), n(cs.half())), TypeError),
        "deform_sample integer offset": (
            lambda: dt.deform_sample(xs, cs.long()),
            lambda: deformops.deform_sample(n(xs), n(cs.long())), TypeError),
        "deform_sample offset of wrong size": (
            lambda: dt.deform_sample(xs, cs[..., :3]),
            lambda: deformops.deform_sample(n(xs), n(cs[..., :3])), ValueError),
        "sample odd coordinate channels": (
            lambda: dt.sample(xs, cs[:, :1]),
            lambda: deformops.sample(n(xs), n(cs[:, :1])), ValueError),
        "deform_sample non-tensor x": (
            lambda: dt.deform_sample(n(xs), cs),
            lambda: deformops.deform_sample(xs.tolist(), n(cs)), TypeError),
        "sample non-tensor coords": (
            lambda: dt.sample(xs, 1.5),
            lambda: deformops.sample(n(xs), 1.5), TypeError),
        "deform_sample bad mode": (
            lambda: dt.deform_sample(xs, cs, mode="bogus"),
            lambda: deformops.deform_sample(n(xs), n(cs), mode="bogus"), ValueError),
        "deform_sample negative order": (
            lambda: dt.deform_sample(xs, cs, order=-1),
            lambda: deformops.deform_sample(n(xs), n(cs), order=-1), ValueError),
        "sample spline order": (
            lambda: dt.sample(xs, cs, order=3),
            lambda: deformops.sample(n(xs), n(cs), order=3), NotImplementedError),
        "sample float order": (
            lambda: dt.sample(xs, cs, order=1.0),
            lambda: deformops.sample(n(xs), n(cs), order=1.0), TypeError),
        "sample string cval": (
            lambda: dt.sample(xs, cs, cval="zero"),
            lambda: deformops.sample(n(xs), n(cs), cval="zero"), TypeError),
        "sample int cval beyond float": (
            lambda: dt.sample(xs, cs, cval=10 ** 400),
            lambda: deformops.sample(n(xs), n(cs), cval=10 ** 400), ValueError),
    }


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_errors_match_core(name):
    """Invalid calls raise the exception type of the NumPy core (DESIGN §5: ValueError for
    shapes and values, TypeError for dtypes and types), with a message naming the argument
    [oracle: NumPy core]."""
    call, core_call, expected = ERROR_CASES[name]
    if core_call is not None:
        assert _core_error(core_call) is expected
    with pytest.raises(expected) as info:
        call()
    assert type(info.value) is expected  # not a subclass such as a bare RuntimeError
    assert len(str(info.value)) > 10


def test_errors_with_grad():
    """Tensors requiring grad raise the same errors (validation happens before autograd
    records anything) [oracle: NumPy core]."""
    rng = np.random.default_rng(15)
    (x, off, w, _, _), _ = conv_case(rng)
    x.requires_grad_()
    with pytest.raises(ValueError, match="offset"):
        dt.deform_conv2d(x, off[:, :10], w, padding=1)
    with pytest.raises(TypeError, match="offset has dtype float32 but input has dtype float64"):
        dt.deform_conv2d(x, off.float(), w, padding=1)


def test_backward_operator_names_the_input_as_torch():
    """The backward operator, called directly, checks shapes with torch's name for the input
    (``input``, not the core's ``x``) [oracle: the core's rule, DESIGN §5]."""
    z = torch.zeros
    with pytest.raises(ValueError, match=r"^input has 6 channels, not a multiple"):
        torch.ops.deformops.deform_conv2d_backward(
            z(2, 3, 3, 3, dtype=F64), z(2, 6, 5, 5, dtype=F64), z(2, 18, 3, 3, dtype=F64),
            z(3, 4, 3, 3, dtype=F64), None, [1, 1], [0, 0], [1, 1], [True] * 5)


# ====================================================================== the two paths


def test_operator_path_equals_eager_path():
    """Plain eager calls run the kernels through an autograd.Function, everything else through
    the registered operators ``torch.ops.deformops.*``: both give the same output and gradients,
    bit for bit [oracle: the operator path]."""
    rng = np.random.default_rng(16)
    tensors, kw = conv_case(rng, N=2, Cin=4, mask=True, bias=True)
    leaves = [t.requires_grad_() for t in tensors]
    out = call_conv(*leaves, kw)
    ref = torch.ops.deformops.deform_conv2d(*leaves, [1, 1], [1, 1], [1, 1])
    go = torch.randn_like(out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(_grads(out, leaves, go), _grads(ref, leaves, go)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    x, coords = _sampling_inputs(rng, "deform_sample", N=2, C=4, G=2)
    leaves = [x.requires_grad_(), coords.requires_grad_()]
    for name, f in SAMPLING_OPS.items():
        out = f(*leaves, order=1, mode="mirror", cval=0.5)
        ref = getattr(torch.ops.deformops, name)(*leaves, 1, "mirror", 0.5)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        go = torch.randn_like(out)
        for a, r in zip(_grads(out, leaves, go), _grads(ref, leaves, go)):
            torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["eager", "operator"])
@pytest.mark.parametrize("op", ["deform_conv2d", "sample", "deform_sample"])
def test_second_derivatives_raise_also_through_the_inputs(op, path):
    """The kernels have first derivatives only. A second derivative that passes through an op
    raises, on both paths, also when it is taken with respect to an input that reaches the
    loss another way too (x**2 here), where a once_differentiable backward silently dropped
    the op's second-order term; gradients taken with create_graph=True are the plain ones
    [oracle: the first-order gradients without create_graph]."""
    rng = np.random.default_rng(22)
    if op == "deform_conv2d":
        (x, off, w, _, _), kw = conv_case(rng, N=1, Cin=2)
        inputs = [x.requires_grad_(), off.requires_grad_(), w.requires_grad_()]
        f = ((lambda a, b, c: dt.deform_conv2d(a, b, c, **kw)) if path == "eager" else
             (lambda a, b, c: torch.ops.deformops.deform_conv2d(a, b, c, None, None, [1, 1],
                                                               [1, 1], [1, 1])))
    else:
        xs, cs = _sampling_inputs(rng, op)
        inputs = [xs.requires_grad_(), cs.requires_grad_()]
        f = (SAMPLING_OPS[op] if path == "eager" else
             (lambda a, b: getattr(torch.ops.deformops, op)(a, b, 1, "grid-constant", 0.0)))
    x = inputs[0]
    loss = (f(*inputs).sum() + (x ** 2).sum()) ** 2
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.norm(), x)
    with_graph = torch.autograd.grad(f(*inputs).sum(), inputs, create_graph=True)
    plain = torch.autograd.grad(f(*inputs).sum(), inputs)
    for a, b in zip(with_graph, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


FORWARD_MODES = ["jvp", "jacfwd", "jvp of vmap", "dual tensors", "linearize", "dual under vmap",
                 "dual under functionalize", "dual under grad"]


@pytest.mark.parametrize("transform", FORWARD_MODES)
@pytest.mark.parametrize("op", ["deform_conv2d", "sample", "deform_sample"])
def test_forward_mode_derivatives_raise(op, transform):
    """The kernels have no forward-mode derivative. Under torch.func.jvp / jacfwd / linearize,
    and with ``torch.autograd.forward_ad`` dual tensors under vmap or functionalize, torch's
    custom operators dropped the tangent without a word (a Jacobian of zeros); the public
    functions must refuse, as torch does for dual tensors in plain eager calls [oracle: the
    error itself]."""
    rng = np.random.default_rng(25)
    if op == "deform_conv2d":
        (x, off, w, _, _), kw = conv_case(rng, N=1, Cin=2)
        f = lambda a: dt.deform_conv2d(a, off, w, **kw)  # noqa: E731
    else:
        x, c = _sampling_inputs(rng, op)
        f = lambda a: SAMPLING_OPS[op](a, c)  # noqa: E731
    with pytest.raises(NotImplementedError):
        if transform == "jvp":
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        elif transform == "jacfwd":
            torch.func.jacfwd(f)(x)
        elif transform == "jvp of vmap":
            torch.func.jvp(torch.func.vmap(f), (x[None],), (torch.ones_like(x[None]),))
        elif transform == "linearize":
            torch.func.linearize(f, x)[1](torch.ones_like(x))
        else:
            import torch.autograd.forward_ad as fwad

            with fwad.dual_level():
                dual = fwad.make_dual(x, torch.ones_like(x))
                if transform == "dual tensors":
                    f(dual)
                elif transform == "dual under vmap":
                    torch.func.vmap(f)(dual[None])
                elif transform == "dual under functionalize":
                    torch.func.functionalize(f)(dual)
                else:
                    torch.func.grad(lambda a: f(a).sum())(dual)


def test_ops_run_inside_a_dual_level_without_tangents():
    """Inside ``torch.autograd.forward_ad.dual_level`` (another tensor dual), ops whose inputs
    carry no tangent run, eagerly and under vmap and functionalize [oracle: the call outside]."""
    import torch.autograd.forward_ad as fwad

    rng = np.random.default_rng(27)
    (x, off, w, _, _), kw = conv_case(rng, N=1, Cin=2)
    f = lambda a: dt.deform_conv2d(a, off, w, **kw)  # noqa: E731
    want = f(x)
    with fwad.dual_level():
        fwad.make_dual(torch.ones(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype))
        for got in (f(x), torch.func.vmap(f)(x[None])[0], torch.func.functionalize(f)(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("vmapped", [False, True])
def test_ops_on_constants_run_inside_jvp(vmapped):
    """Inside torch.func.jvp an op whose inputs carry no tangent (a frozen deformable layer
    before the differentiated parameters) runs, also under a vmap inside the jvp: the refusal
    is for tangents that reach it [oracle: the eager value; the tangent of s * value is
    value]."""
    rng = np.random.default_rng(26)
    x, c = _sampling_inputs(rng, "sample")
    value = dt.sample(x, c).sum()
    total = ((lambda: torch.func.vmap(lambda a: dt.sample(a, c))(x[None]).sum()) if vmapped
             else (lambda: dt.sample(x, c).sum()))
    out, tangent = torch.func.jvp(lambda s: total() * s, (torch.tensor(2.0, dtype=x.dtype),),
                                  (torch.tensor(1.0, dtype=x.dtype),))
    torch.testing.assert_close(out, 2 * value, rtol=0, atol=0)
    torch.testing.assert_close(tangent, value, rtol=0, atol=0)


@pytest.mark.parametrize("wanted", ["bias", "mask", "weight", "input", "offset"])
def test_operator_path_gradients_of_one_input(wanted):
    """The operators' autograd with a single input requiring grad (the others constants): that
    input's gradient is the NumPy core's, and no other input gets one [oracle: NumPy core]."""
    rng = np.random.default_rng(23)
    (x, off, w, b, m), _ = conv_case(rng, N=2, Cin=2, mask=True, bias=True)
    names = ("input", "offset", "weight", "bias", "mask")
    tensors = dict(zip(names, (x, off, w, b, m)))
    tensors[wanted].requires_grad_()
    out = torch.ops.deformops.deform_conv2d(*tensors.values(), [1, 1], [1, 1], [1, 1])
    go = torch.randn_like(out)
    out.backward(go)
    n = lambda t: t.detach().numpy()  # noqa: E731
    ref = deformops.deform_conv2d_backward(n(go), n(x), n(off), n(w), padding=1, mask=n(m))
    field = {"input": "grad_input", "offset": "grad_offset", "weight": "grad_weight",
             "bias": "grad_bias", "mask": "grad_mask"}[wanted]
    np.testing.assert_allclose(tensors[wanted].grad.numpy(), getattr(ref, field), rtol=0,
                               atol=1e-12)
    assert all(t.grad is None for n, t in tensors.items() if n != wanted)


@pytest.mark.parametrize("wanted", [0, 1])
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
def test_operator_path_sampling_gradient_of_one_input(op, wanted):
    """The sampling operators' autograd with only x (or only the coordinates) requiring grad:
    its gradient is the core's [oracle: NumPy core]."""
    rng = np.random.default_rng(24)
    x, c = _sampling_inputs(rng, op, N=2, C=2)
    leaves = [x, c]
    leaves[wanted].requires_grad_()
    out = getattr(torch.ops.deformops, op)(x, c, 1, "reflect", 0.0)
    go = torch.randn_like(out)
    out.backward(go)
    ref = getattr(deformops, f"{op}_backward")(go.numpy(), x.detach().numpy(),
                                               c.detach().numpy(), mode="reflect")
    np.testing.assert_allclose(leaves[wanted].grad.numpy(), ref[wanted], rtol=0, atol=1e-12)
    assert leaves[1 - wanted].grad is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_kernels_agree_with_the_real_ones(channels_last):
    """``torch.library.opcheck``'s FakeTensor check on every operator, forward and backward,
    with contiguous and channels-last tensors: the fake kernels' shapes, dtypes and strides are
    the real kernels' [oracle: the real kernels]."""
    rng = np.random.default_rng(25)
    (x, off, w, b, m), _ = conv_case(rng, N=2, Cin=2, mask=True, bias=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, off, m = (t.contiguous(memory_format=fmt) for t in (x, off, m))
    go = torch.randn(2, 2, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    ops = torch.ops.deformops
    hyper = ([1, 1], [1, 1], [1, 1])
    checks = [(ops.deform_conv2d, (x, off, w, b, m, *hyper))]
    for needs in ([True] * 5, [True, True, True, False, False], [False, True, False, True, True]):
        checks.append((ops.deform_conv2d_backward, (go, x, off, w, m, *hyper, needs)))
    for name in SAMPLING_OPS:
        xs, cs = _sampling_inputs(rng, name, N=2, C=2)
        xs, cs = xs.contiguous(memory_format=fmt), cs.contiguous(memory_format=fmt)
        out = getattr(ops, name)(xs, cs, 1, "reflect", 0.0)
        checks.append((getattr(ops, name), (xs, cs, 1, "reflect", 0.0)))
        gs = torch.randn_like(out)
        for needs in ([True, True], [False, True], [True, False]):
            checks.append((getattr(ops, f"{name}_backward"),
                           (gs, xs, cs, 1, "reflect", 0.0, needs)))
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_operator_path_gradcheck():
    """The registered operators' own autograd (used under torch.compile and dispatch modes)
    [oracle: finite differences]."""
    rng = np.random.default_rng(17)
    tensors, _ = conv_case(rng, mask=True, bias=True)
    tensors = tuple(t.requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.deformops.deform_conv2d(*a, [1, 1], [1, 1], [1, 1]), tensors)
    for name in SAMPLING_OPS:
        x, coords = _sampling_inputs(rng, name)
        assert torch.autograd.gradcheck(
            lambda a, c: getattr(torch.ops.deformops, name)(a, c, 1, "reflect", 0.0),
            (x.requires_grad_(), coords.requires_grad_()))


def test_fake_tensor_mode_takes_the_operator():
    """Under FakeTensorMode (what torch.export and compilers trace with) the public functions
    dispatch to the operators' fake kernels: right shapes, no data touched [oracle: DESIGN §3
    shapes]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 9, 8, dtype=F64)
        out = dt.deform_conv2d(x, torch.empty(2, 36, 5, 4, dtype=F64),
                               torch.empty(6, 2, 3, 3, dtype=F64), stride=2, padding=1)
        assert out.shape == (2, 6, 5, 4)
        xc = x.to(memory_format=torch.channels_last)
        out = dt.deform_sample(xc, torch.empty(2, 4, 9, 8, dtype=F64))
        assert out.shape == (2, 4, 9, 8)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert dt.sample(x, torch.empty(2, 2, 3, 5, dtype=F64)).shape == (2, 4, 3, 5)


# ====================================================================== torch.autocast

HALF = [torch.bfloat16, torch.float16]


def _autocast_conv_inputs(dtype):
    """A half-precision input, offset and mask (as a model's earlier layers give them under
    autocast) and float32 parameters, all leaves."""
    rng = np.random.default_rng(3)
    tensors, kw = conv_case(rng, N=2, Cin=4, Cout=6, H=6, W=5, G=2, mask=True, bias=True)
    x, off, w, b, m = tensors
    return [x.to(dtype), off.to(dtype), w.float(), b.float(), m.to(dtype)], kw


@pytest.mark.parametrize("dtype", HALF)
def test_deform_conv2d_under_autocast_computes_in_float32(dtype):
    """Under ``torch.autocast("cpu", dtype)`` half-precision inputs are cast to float32 and the
    result back to the input's dtype, as torchvision's autocast rule does: output and every
    gradient equal, bit for bit, those of the same casts written out [oracle: explicit casts
    outside autocast]."""
    leaves = [t.requires_grad_() for t in _autocast_conv_inputs(dtype)[0]]
    kw = _autocast_conv_inputs(dtype)[1]
    with torch.autocast("cpu", dtype=dtype):
        out = call_conv(*leaves, kw)
    assert out.dtype == dtype
    x, off, w, b, m = leaves
    ref = call_conv(x.float(), off.float(), w, b, m.float(), kw).to(dtype)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype)
    for g, r in zip(_grads(out, leaves, go), _grads(ref, leaves, go)):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed")
@pytest.mark.parametrize("dtype", HALF)
def test_deform_conv2d_under_autocast_matches_torchvision(dtype):
    """The value torchvision's autocast rule defines: its float32 result cast to the input's
    dtype, within the half type's rounding [oracle: torchvision on the float32 casts; its own
    CPU autocast kernel fails in torchvision 0.29 ("aten::mm ... API call failed")]."""
    import torchvision.ops as tvops

    (x, off, w, b, m), kw = _autocast_conv_inputs(dtype)
    with torch.autocast("cpu", dtype=dtype):
        ours = call_conv(x, off, w, b, m, kw)
    ref = tvops.deform_conv2d(x.float(), off.float(), w, b, mask=m.float(), **kw).to(dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("op", list(SAMPLING_OPS))
def test_sampling_under_autocast_computes_in_float32(op, dtype):
    """The sampling ops under autocast: a half-precision ``x`` with float32 coordinates gives
    ``x``'s dtype, output and gradients equal to the explicit float32 computation [oracle:
    explicit casts outside autocast]."""
    rng = np.random.default_rng(4)
    x = rand(rng, 2, 4, 6, 7).to(dtype).requires_grad_()
    coords = (rand(rng, 2, 4, 6, 7, lo=-1.5, hi=7.5) if op == "sample"
              else rand(rng, 2, 4, 6, 7, lo=-1.5, hi=1.5)).float().requires_grad_()
    fn = SAMPLING_OPS[op]
    with torch.autocast("cpu", dtype=dtype):
        out = fn(x, coords, mode="reflect")
    ref = fn(x.float(), coords, mode="reflect").to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    go = torch.ones_like(out)
    for g, r in zip(_grads(out, [x, coords], go), _grads(ref, [x, coords], go)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_float64_under_autocast_is_left_alone():
    """float64 tensors are not autocast (torch's rule): the result is the float64 one, bit for
    bit [oracle: the call outside autocast]."""
    rng = np.random.default_rng(5)
    tensors, kw = conv_case(rng, mask=True, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_conv(*tensors, kw)
        sampled = dt.deform_sample(tensors[0], tensors[1][:, :2, :4, :4])
    assert out.dtype == sampled.dtype == F64
    torch.testing.assert_close(out, call_conv(*tensors, kw), rtol=0, atol=0)
    torch.testing.assert_close(sampled, dt.deform_sample(tensors[0], tensors[1][:, :2, :4, :4]),
                               rtol=0, atol=0)


BAD_SHAPES = {
    # name: (call with a tensor factory t(*shape), regex the core's message matches)
    "deform_sample offset of another size": (
        lambda t: dt.deform_sample(t(2, 4, 5, 5), t(2, 2, 9, 9)), r"offset.*spatial"),
    "sample coords batch": (lambda t: dt.sample(t(2, 4, 5, 5), t(7, 2, 3, 3)), r"coords"),
    "sample coords odd channels": (lambda t: dt.sample(t(2, 4, 5, 5), t(2, 3, 3, 3)),
                                   r"coords.*2G"),
    "sample coords 3-D": (lambda t: dt.sample(t(2, 4, 5, 5), t(2, 2, 3)), r"coords.*4-D"),
    "deform_conv2d offset channels": (
        lambda t: dt.deform_conv2d(t(2, 4, 5, 5), t(2, 17, 5, 5), t(3, 4, 3, 3), padding=1),
        r"offset.*2\*G\*K"),
    "deform_conv2d offset size": (
        lambda t: dt.deform_conv2d(t(2, 4, 5, 5), t(2, 18, 5, 5), t(3, 4, 3, 3)),
        r"offset.*spatial size \(3, 3\)"),
    "deform_conv2d mask": (
        lambda t: dt.deform_conv2d(t(2, 4, 5, 5), t(2, 18, 3, 3), t(3, 4, 3, 3),
                                   mask=t(2, 8, 3, 3)), r"mask"),
    "deform_conv2d weight channels": (
        lambda t: dt.deform_conv2d(t(2, 4, 5, 5), t(2, 18, 3, 3), t(3, 3, 3, 3)),
        r"weight.shape\[1\]"),
    "deform_conv2d bias": (
        lambda t: dt.deform_conv2d(t(2, 4, 5, 5), t(2, 18, 3, 3), t(3, 4, 3, 3), t(4)),
        r"bias"),
    # torch's name for the input, not the core's x
    "deform_conv2d input 3-D": (
        lambda t: dt.deform_conv2d(t(4, 5, 5), t(2, 18, 3, 3), t(3, 4, 3, 3)),
        r"^input must be 4-D \(N, Cin, H, W\)"),
    "deform_conv2d input channels": (
        lambda t: dt.deform_conv2d(t(2, 6, 5, 5), t(2, 18, 3, 3), t(3, 4, 3, 3)),
        r"^input has 6 channels, not a multiple of weight.shape\[1\] = 4"),
    "deform_conv2d input empty": (
        lambda t: dt.deform_conv2d(t(2, 4, 0, 5), t(2, 18, 1, 3), t(3, 4, 3, 3), padding=2),
        r"^input has an empty spatial size"),
}


@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_fake_kernels_check_shapes_as_the_core(name):
    """The fake kernels (meta tensors, FakeTensorMode, torch.compile) raise the core's
    ValueError for shapes it refuses, instead of returning a tensor of some shape (they
    checked nothing) [oracle: the same call on CPU tensors of these shapes, eagerly]. Both
    name the input ``input``, torch's name for it, not the core's ``x``."""
    call, message = BAD_SHAPES[name]
    with pytest.raises(ValueError, match=message):
        call(lambda *shape: torch.zeros(*shape, dtype=F64))
    with pytest.raises(ValueError, match=message):
        call(lambda *shape: torch.empty(*shape, dtype=F64, device="meta"))


def test_fake_kernels_check_shapes_under_compile():
    """Under torch.compile a wrong shape used to fail in the fake kernel's unpacking (a
    RuntimeError naming nothing); now the core's message names the argument."""
    compiled = torch.compile(lambda x, c: dt.sample(x, c), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"coords must be 4-D"):
        compiled(torch.randn(2, 4, 5, 5), torch.randn(2, 2, 3))


def test_meta_tensors_take_the_fake_kernels():
    """Tensors on the meta device (models built under ``torch.device("meta")``, shape
    inference) reach the operators' fake kernels: shapes, no data, also with autocast checks in
    the way (``torch.is_autocast_enabled("meta")`` raises) [oracle: DESIGN §3 shapes]."""
    x = torch.empty(2, 4, 9, 8, dtype=F64, device="meta")
    out = dt.deform_conv2d(x, torch.empty(2, 36, 5, 4, dtype=F64, device="meta"),
                           torch.empty(6, 2, 3, 3, dtype=F64, device="meta"), stride=2, padding=1)
    assert out.shape == (2, 6, 5, 4) and out.is_meta
    assert dt.deform_sample(x, torch.empty(2, 4, 9, 8, dtype=F64, device="meta")).shape == x.shape
    assert dt.sample(x, torch.empty(2, 2, 3, 5, dtype=F64, device="meta")).shape == (2, 4, 3, 5)
    with torch.device("meta"):
        layer = dt.DeformConv2dPack(4, 6, 3, padding=1, modulated=True)
    assert layer(torch.empty(2, 4, 9, 8, device="meta")).shape == (2, 6, 9, 8)

