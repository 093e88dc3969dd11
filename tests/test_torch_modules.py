"""deformops_torch modules: DeformConv2d, DeformConv2dPack, ConvOffset2D.

Oracles (each test names its own):

- [torchvision]: ``torchvision.ops.DeformConv2d`` / ``deform_conv2d`` (skipped without it);
- [conv2d]: ``torch.nn.functional.conv2d``, what a deformable convolution with zero offsets is;
- [identity]: sampling at zero offsets returns the input;
- [deform_sample]: ``deformops_torch.deform_sample`` called with offsets built by hand;
- [state_dict]: the module that saved it; [literal]: the expected text written out.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformops_torch as dt  # noqa: E402
from torch import nn  # noqa: E402

F64 = torch.float64


# tiny inputs: one Numba and one torch thread (see conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def rand(seed, *shape, lo=-1.0, hi=1.0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(lo, hi, size=shape))


def perturb(module, seed, scale=0.1):
    """Give every parameter (zero-initialised ones included) distinct non-zero values."""
    with torch.no_grad():
        for k, p in enumerate(module.parameters()):
            p.add_(scale * rand(seed + k, *p.shape).to(p.dtype))
    return module


# ====================================================================== DeformConv2d

TV_CONFIGS = {
    "3x3 pad1": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "2x3 stride2 dil2 groups2 no bias": dict(in_channels=4, out_channels=4, kernel_size=(2, 3),
                                             stride=2, padding=(1, 0), dilation=2, groups=2,
                                             bias=False),
}


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", list(TV_CONFIGS))
def test_deform_conv2d_module_is_torchvision_drop_in(name, with_mask):
    """Same seed -> identical parameters; identical output and gradients (input, offset, mask,
    weight, bias) for the same inputs; the same repr [oracle: torchvision]."""
    tvops = pytest.importorskip("torchvision.ops")
    cfg = TV_CONFIGS[name]
    torch.manual_seed(123)
    ours = dt.DeformConv2d(**cfg).double()
    torch.manual_seed(123)
    ref = tvops.DeformConv2d(**cfg).double()
    assert repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for (n, p), (n_ref, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n == n_ref
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0)

    kh, kw = ours.kernel_size
    x = rand(1, 2, 4, 7, 6).requires_grad_()
    Ho, Wo = _out_size(ours, 7, 6)
    off = rand(2, 2, 2 * kh * kw, Ho, Wo, lo=-2, hi=2).requires_grad_()
    mask = rand(3, 2, kh * kw, Ho, Wo, lo=0, hi=1).requires_grad_() if with_mask else None
    out, out_ref = ours(x, off, mask), ref(x, off, mask)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    go = torch.randn_like(out)
    inputs = [x, off] + ([mask] if with_mask else [])
    leaves = inputs + list(ours.parameters())
    leaves_ref = inputs + list(ref.parameters())
    for a, r in zip(torch.autograd.grad(out, leaves, go),
                    torch.autograd.grad(out_ref, leaves_ref, go)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def _out_size(m, H, W):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    return ((H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def test_deform_conv2d_module_rejects_bad_groups():
    """Channel counts not divisible by groups: ValueError, as torchvision [oracle: torchvision's
    documented behaviour]."""
    with pytest.raises(ValueError, match="groups"):
        dt.DeformConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        dt.DeformConv2d(4, 3, 3, groups=2)


@pytest.mark.parametrize("kwargs, error", [
    (dict(stride=1.5), TypeError), (dict(stride=(2, 2.0)), TypeError),
    (dict(padding="1"), TypeError), (dict(dilation=True), TypeError),
    (dict(kernel_size=(3,)), ValueError), (dict(stride=0), ValueError),
    (dict(padding=-1), ValueError), (dict(groups=0), ValueError), (dict(groups=2.0), TypeError),
])
@pytest.mark.parametrize("cls", ["DeformConv2d", "DeformConv2dPack"])
def test_modules_reject_bad_arguments_when_built(cls, kwargs, error):
    """A float, string or bool size is a TypeError naming the argument when the module is built,
    never truncated (torch's _pair would keep stride=1.5 and the op run with stride 1); values
    out of range are ValueErrors [oracle: the core's rules, DESIGN §5]."""
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        getattr(dt, cls)(**args)


# ====================================================================== DeformConv2dPack


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_starts_as_regular_conv(modulated):
    """Zero-initialised predictor: offsets 0 and mask 0.5, so the pack is conv2d (times 0.5
    without its bias when modulated) [oracle: conv2d]."""
    torch.manual_seed(0)
    m = dt.DeformConv2dPack(4, 6, 3, stride=2, padding=1, modulated=True if modulated else False)
    m = m.double()
    assert not m.conv_offset.weight.any() and not m.conv_offset.bias.any()
    assert m.conv_offset.out_channels == (27 if modulated else 18)
    x = rand(4, 2, 4, 9, 8)
    conv = nn.functional.conv2d(x, m.weight, None, stride=2, padding=1)
    want = (0.5 * conv if modulated else conv) + m.bias[:, None, None]
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_matches_torchvision_with_its_offsets(modulated):
    """With a trained (non-zero) predictor, output and every parameter gradient equal
    torchvision's deform_conv2d fed by the same predictor output, channels [offsets, mask
    logits] (sigmoid on the mask), two offset groups [oracle: torchvision]."""
    tvops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(1)
    m = perturb(dt.DeformConv2dPack(4, 4, 3, padding=1, groups=2, offset_groups=2,
                                    modulated=modulated).double(), seed=10, scale=0.3)
    x = rand(5, 2, 4, 6, 7)
    out = m(x)
    pred = m.conv_offset(x)
    mask = torch.sigmoid(pred[:, 36:]) if modulated else None
    ref = tvops.deform_conv2d(x, pred[:, :36], m.weight, m.bias, padding=1, mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    go = torch.randn_like(out)
    params = list(m.parameters())
    for a, r in zip(torch.autograd.grad(out, params, go), torch.autograd.grad(ref, params, go)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_pack_rejects_bad_offset_groups():
    """offset_groups must divide in_channels: ValueError [oracle: DESIGN §3]."""
    with pytest.raises(ValueError, match="offset_groups"):
        dt.DeformConv2dPack(4, 4, 3, offset_groups=3)


# ====================================================================== ConvOffset2D


@pytest.mark.parametrize("mode", ["nearest", "reflect", "grid-constant"])
def test_conv_offset_shape_and_zero_init_identity(mode):
    """Output shape = input shape; with init_normal_stddev=0 the offsets are 0 and the layer is
    the identity, for any mode and order [oracle: identity]."""
    x = rand(6, 2, 3, 5, 7)
    for order in (0, 1):
        layer = dt.ConvOffset2D(3, init_normal_stddev=0, order=order, mode=mode).double()
        assert not layer.conv.weight.any() and layer.conv.bias is None
        out = layer(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, x, rtol=0, atol=0)
    layer = dt.ConvOffset2D(3).double()  # default N(0, 0.01)
    assert layer(x).shape == x.shape and layer.conv.weight.std() > 0


def test_conv_offset_gradient_at_zero_offsets():
    """At zero offsets (integer sample points) the predictor still gets a gradient: the
    right-hand derivative of the bilinear interpolant (the original project's floor/ceil
    corners gave exactly zero there, so zero-initialised offsets never moved). The value is the
    forward difference of x, computed by hand [oracle: deform_sample]."""
    layer = dt.ConvOffset2D(2, init_normal_stddev=0).double()
    x = rand(7, 1, 2, 6, 6)
    g = rand(8, 1, 2, 6, 6)
    (gw,) = torch.autograd.grad((layer(x) * g).sum(), layer.conv.weight)
    assert gw.abs().max() > 1e-3
    # dL/d(offset) at 0 is g times the right-hand difference of x (clamped at the last row)
    xp = nn.functional.pad(x, (0, 0, 0, 1), mode="replicate")
    dy = xp[:, :, 1:] - xp[:, :, :-1]
    off = torch.zeros(1, 4, 6, 6, dtype=F64, requires_grad=True)
    (goff,) = torch.autograd.grad((dt.deform_sample(x, off, mode="nearest") * g).sum(), off)
    torch.testing.assert_close(goff[:, 0::2], g * dy, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channel", [0, 2])
@pytest.mark.parametrize("component", [0, 1])
def test_conv_offset_per_channel_split(channel, component):
    """Predictor output 2c (dy) / 2c+1 (dx) moves channel c only, and matches deform_sample
    with that offset channel alone set [oracle: deform_sample]."""
    C = 4
    layer = dt.ConvOffset2D(C, init_normal_stddev=0, mode="reflect").double()
    x = rand(9, 2, C, 6, 7)
    with torch.no_grad():
        layer.conv.weight[2 * channel + component, channel, 1, 1] = 0.7
    out = layer(x)
    changed = (out != x).flatten(2).any(-1).any(0)
    assert changed.tolist() == [c == channel for c in range(C)]
    off = torch.zeros(2, 2 * C, 6, 7, dtype=F64)
    off[:, 2 * channel + component] = 0.7 * x[:, channel]
    torch.testing.assert_close(out, dt.deform_sample(x, off, mode="reflect"), rtol=0, atol=0)


# ====================================================================== state_dict and repr


def _modules():
    return {
        "DeformConv2d": (lambda: dt.DeformConv2d(4, 6, 3, padding=1),
                         lambda m, x: m(x, 0.5 * torch.sin(x.sum(1, keepdim=True)).expand(
                             -1, 18, -1, -1)),
                         {"weight", "bias"}),
        "DeformConv2dPack": (lambda: dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2,
                                                         modulated=True),
                             lambda m, x: m(x),
                             {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}),
        "ConvOffset2D": (lambda: dt.ConvOffset2D(4, mode="wrap"), lambda m, x: m(x),
                         {"conv.weight"}),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_state_dict_round_trip(name, tmp_path):
    """A fresh module (another seed) that loads the saved state_dict (through torch.save /
    torch.load) gives the same outputs [oracle: state_dict]."""
    make, call, keys = _modules()[name]
    torch.manual_seed(0)
    a = perturb(make().double(), seed=20)
    torch.manual_seed(1)
    b = make().double()
    assert set(a.state_dict()) == keys
    x = rand(21, 2, 4, 6, 6)
    assert not torch.equal(call(a, x), call(b, x))
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(call(b, x), call(a, x), rtol=0, atol=0)


def test_state_dict_interchangeable_with_torchvision():
    """torchvision.ops.DeformConv2d loads a deformops_torch.DeformConv2d checkpoint and vice
    versa [oracle: torchvision]."""
    tvops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(2)
    ours, ref = dt.DeformConv2d(2, 3, 3), tvops.DeformConv2d(2, 3, 3)
    ref.load_state_dict(ours.state_dict())
    ours2 = dt.DeformConv2d(2, 3, 3)
    ours2.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours2.weight, ours.weight, rtol=0, atol=0)


def test_reprs():
    """Module reprs: torchvision's format for DeformConv2d, the extra options of the pack, the
    settings of ConvOffset2D and its predictor [oracle: literal]."""
    assert repr(dt.DeformConv2d(4, 6, 3)) == \
        "DeformConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1))"
    assert repr(dt.DeformConv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(2, 1), groups=2,
                                bias=False)) == \
        ("DeformConv2d(4, 6, kernel_size=(3, 2), stride=(2, 2), padding=(1, 1), "
         "dilation=(2, 1), groups=2, bias=False)")
    assert repr(dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2, modulated=True)) == (
        "DeformConv2dPack(\n"
        "  4, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), offset_groups=2, "
        "modulated=True\n"
        "  (conv_offset): Conv2d(4, 54, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))\n"
        ")")
    assert repr(dt.ConvOffset2D(3, init_normal_stddev=0, order=0)) == (
        "ConvOffset2D(\n"
        "  3, init_normal_stddev=0, order=0, mode='nearest'\n"
        "  (conv): Conv2d(3, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)\n"
        ")")


@pytest.mark.parametrize("make, error, match", [
    (lambda: dt.ConvOffset2D(0), ValueError, "channels"),
    (lambda: dt.ConvOffset2D(2.0), TypeError, "channels"),
    (lambda: dt.ConvOffset2D(2, init_normal_stddev=-1), ValueError, "init_normal_stddev"),
    (lambda: dt.ConvOffset2D(2, init_normal_stddev="0.1"), TypeError, "init_normal_stddev"),
    (lambda: dt.ConvOffset2D(2, init_normal_stddev=float("inf")), ValueError,
     "init_normal_stddev"),
    (lambda: dt.DeformConv2dPack(4, 4, 3, modulated="yes"), TypeError, "modulated"),
    (lambda: dt.ConvOffset2D(2, mode="clamp"), ValueError, "mode"),
    (lambda: dt.ConvOffset2D(2, order=3), NotImplementedError, "order"),
    (lambda: dt.DeformConv2dPack(4, 4, 3, offset_groups=2.0), TypeError, "offset_groups"),
    (lambda: dt.DeformConv2dPack(4, 4, 3, offset_groups=True), TypeError, "offset_groups"),
    (lambda: dt.DeformConv2dPack(4, 4, 3, offset_groups=0), ValueError, "offset_groups"),
    (lambda: dt.DeformConv2dPack(4, 4, 3, offset_groups=3), ValueError, "offset_groups"),
], ids=["channels 0", "channels float", "negative stddev", "string stddev", "infinite stddev",
        "string modulated", "mode", "order",
        "float offset_groups", "bool offset_groups", "zero offset_groups", "3 offset_groups"])
def test_modules_that_predict_offsets_reject_bad_arguments_when_built(make, error, match):
    """Bad arguments raise when the module is built, naming the argument [oracle: DESIGN §5;
    order and mode by the core's rules]."""
    with pytest.raises(error, match=match):
        make()


def test_modules_that_predict_offsets_reject_another_channel_count():
    """An input with other channels than the module was built for: ValueError naming input,
    not the predictor conv's bare RuntimeError [oracle: DESIGN §5]."""
    x = torch.zeros(1, 6, 5, 5)
    for m, name in ((dt.ConvOffset2D(4), "x"), (dt.DeformConv2dPack(4, 4, 3, padding=1), "input")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            m(x)
        with pytest.raises(ValueError, match=f"{name} must be"):
            m(x[0])


def test_modules_that_predict_offsets_check_their_input_first():
    """What the predictor conv would refuse with a bare RuntimeError (or an AttributeError):
    a TypeError for a NumPy array, an integer tensor, another dtype than the module's
    (float64 into a float32 module), a ValueError for an input smaller than the kernel, each
    naming the forward's argument [oracle: DESIGN §5]. Under autocast another dtype runs."""
    for m, name in ((dt.ConvOffset2D(4), "x"), (dt.DeformConv2dPack(4, 4, 3), "input")):
        for bad in (np.zeros((1, 4, 5, 5), np.float32), torch.zeros(1, 4, 5, 5, dtype=torch.int64),
                    torch.zeros(1, 4, 5, 5, dtype=torch.float64)):
            with pytest.raises(TypeError, match=f"{name} must"):
                m(bad)
    with pytest.raises(ValueError, match="input of shape .* is smaller than"):
        dt.DeformConv2dPack(4, 4, 3, dilation=2, padding=1)(torch.zeros(1, 4, 2, 6))
    assert dt.DeformConv2dPack(4, 4, 3, dilation=2, padding=1)(torch.zeros(1, 4, 3, 3)).shape \
        == (1, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dt.DeformConv2dPack(4, 4, 3, padding=1)(torch.zeros(1, 4, 5, 5, dtype=torch.bfloat16))
    assert out.shape == (1, 4, 5, 5)


def test_numpy_integer_arguments_are_stored_as_ints():
    """NumPy integers are taken, and stored as Python ints: torch.compile(fullgraph=True)
    traced stored NumPy integers as tensors, and failed on the channel check [oracle: the same
    module built with ints, compiled and eager]."""
    torch.manual_seed(0)
    pack = dt.DeformConv2dPack(np.int64(4), np.int32(6), 3, groups=np.int64(2),
                               offset_groups=np.int64(2), padding=1, modulated=np.bool_(True))
    conv = dt.ConvOffset2D(np.int64(4))
    for m, names in ((pack, ("in_channels", "out_channels", "groups", "offset_groups")),
                     (conv, ("channels",))):
        assert all(type(getattr(m, n)) is int for n in names)
    x = torch.rand(2, 4, 6, 5)
    for m in (pack, conv):
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reset_parameters_of_every_submodule_keeps_the_predictors_initialisation():
    """torch's idiom for modules built on the meta device (also FSDP's): to_empty, then
    reset_parameters on every submodule. The predictors keep their initialisation (zeros for
    DeformConv2dPack, normal with the given stddev for ConvOffset2D), not nn.Conv2d's Kaiming
    one; DeformConv2dPack.reset_parameters resets its predictor too [oracle: the documented
    initialisation]."""
    with torch.device("meta"):
        pack, conv = dt.DeformConv2dPack(8, 8, 3, modulated=True), dt.ConvOffset2D(64)
    for m in (pack, conv):
        m.to_empty(device="cpu")
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    assert not pack.conv_offset.weight.any() and not pack.conv_offset.bias.any()
    assert pack.weight.abs().max() > 0
    assert 0.009 < conv.conv.weight.std().item() < 0.011
    pack.conv_offset.weight.data.fill_(1.0)
    pack.reset_parameters()
    assert not pack.conv_offset.weight.any()
