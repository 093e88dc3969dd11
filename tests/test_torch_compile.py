"""deformops_torch under ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.

Oracles (each test names its own):

- [eager]: the same function run eagerly (forward and gradients, bit for bit);
- [opcheck]: ``torch.library.opcheck``, torch's own checks of a custom operator's registration
  (schema, fake kernel vs real kernel, autograd registration, AOT dispatch);
- [NumPy core]: the exception type deformops raises for the same invalid call.

Most cases use the ``aot_eager`` backend (AOT autograd and the fake kernels, no code generation:
fast on a small shared machine); one module runs through ``inductor``.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformops_torch as dt  # noqa: E402

F64 = torch.float64


# tiny inputs: one Numba and one torch thread (see conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def rand(seed, *shape, lo=-1.0, hi=1.0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(lo, hi, size=shape))


def _conv_inputs(seed, channels_last=False):
    x, off = rand(seed, 2, 4, 5, 6), rand(seed + 1, 2, 36, 5, 6, lo=-2, hi=2)
    w, b, m = rand(seed + 2, 3, 4, 3, 3), rand(seed + 3, 3), rand(seed + 4, 2, 18, 5, 6, lo=0, hi=1)
    if channels_last:
        x, off, m = (t.to(memory_format=torch.channels_last) for t in (x, off, m))
    return x, off, w, b, m


def _sample_inputs(seed, channels_last=False):
    x = rand(seed, 2, 4, 5, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, rand(seed + 1, 2, 4, 5, 6, lo=-2, hi=2)


OPS = {
    "deform_conv2d": (lambda x, off, w, b, m: dt.deform_conv2d(x, off, w, b, padding=1, mask=m),
                      _conv_inputs),
    "deform_conv2d stride2 no mask": (
        lambda x, off, w, b, m: dt.deform_conv2d(x, off[..., ::2, ::2], w, None, stride=2,
                                                 padding=(1, 1)),
        _conv_inputs),
    "sample": (lambda x, c: dt.sample(x, c + 2.0, mode="reflect", order=1), _sample_inputs),
    "deform_sample": (lambda x, c: dt.deform_sample(x, c, mode="wrap", cval=0.5),
                      _sample_inputs),
    "deform_sample order 0": (lambda x, c: dt.deform_sample(x, c, order=0), _sample_inputs),
}


def _run(fn, inputs):
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
              for t in inputs]
    out = fn(*leaves)
    go = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
    return out, grads


def _assert_same(a, b):
    out, grads = a
    out_ref, grads_ref = b
    assert out.stride() == out_ref.stride()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for g, r in zip(grads, grads_ref):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(OPS))
def test_op_compiled_equals_eager(name, channels_last):
    """fullgraph=True (no graph break), aot_eager: forward (values and strides, channels_last
    kept) and all gradients [oracle: eager]."""
    fn, make = OPS[name]
    inputs = make(0, channels_last)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, inputs), _run(fn, inputs))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_pack_module_compiled_equals_eager(backend):
    """DeformConv2dPack(modulated=True) inside a small model (predictor conv, sigmoid mask,
    ReLU), fullgraph: output and every parameter gradient [oracle: eager]."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        dt.DeformConv2dPack(4, 6, 3, padding=1, modulated=True), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 2, 1)).double()
    with torch.no_grad():
        model[0].conv_offset.weight.normal_(0, 0.1)
        model[0].conv_offset.bias.normal_(0, 0.1)
    x = rand(1, 2, 4, 6, 5)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    params = list(model.parameters())

    def run(m):
        out = m(x)
        return out, torch.autograd.grad((out * out).sum(), params)

    out, grads = run(compiled)
    out_ref, grads_ref = run(model)
    tol = 0 if backend == "aot_eager" else 1e-12  # inductor may fuse the pointwise ops
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_conv_offset_module_compiled_equals_eager():
    """ConvOffset2D (per-channel offsets, mode 'nearest'), fullgraph, aot_eager: output and the
    gradients of its input and predictor weight [oracle: eager]."""
    torch.manual_seed(0)
    layer = dt.ConvOffset2D(3, init_normal_stddev=0.3).double()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = rand(2, 2, 3, 7, 6)

    def run(m):
        xs = x.clone().requires_grad_()
        out = m(xs)
        return out, torch.autograd.grad(out.square().sum(), (xs, layer.conv.weight))

    _assert_same(run(compiled), run(layer))


def test_pack_module_compiled_under_autocast_equals_eager():
    """DeformConv2dPack(modulated=True) after a Conv2d under ``torch.autocast("cpu",
    bfloat16)``, fullgraph, aot_eager: the autocast casts are traced with the ops; bfloat16
    output and float32 parameter gradients [oracle: eager under autocast]."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                dt.DeformConv2dPack(4, 6, 3, padding=1, modulated=True))
    with torch.no_grad():
        model[1].conv_offset.weight.normal_(0, 0.1)
    x = rand(6, 2, 3, 7, 6).float()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    params = list(model.parameters())

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        return out, torch.autograd.grad(out.float().square().sum(), params)

    _assert_same(run(compiled), run(model))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["deform_conv2d", "sample", "deform_sample"])
def test_opcheck(name, channels_last):
    """Registration of the operator and its backward: schema, fake kernel against the real one
    (strides included: channels_last inputs give channels_last results), autograd
    registration, AOT dispatch [oracle: opcheck]."""
    fn, make = OPS[name]
    inputs = make(3)
    if channels_last:
        inputs = [t.to(memory_format=torch.channels_last) if t is not None and t.dim() == 4
                  else t for t in inputs]
    inputs = [t.requires_grad_() for t in inputs]
    op = getattr(torch.ops.deformops, name)
    if name == "deform_conv2d":
        x, off, w, b, m = inputs
        args = (x, off, w, b, m, [1, 1], [1, 1], [1, 1])
    else:
        args = (*inputs, 1, "reflect", 0.0)
    torch.library.opcheck(op, args)


def test_error_under_compile():
    """A float32 offset with float64 input raises the core's TypeError from compiled code too
    [oracle: NumPy core]."""
    x, off, w, b, m = _conv_inputs(5)
    fn = OPS["deform_conv2d"][0]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(TypeError, match="dtype"):
        compiled(x, off.float(), w, b, m)


def test_export_refuses_bad_sampling_options_when_traced():
    """An unknown mode or unsupported order raises when torch.export traces the call, with the
    core's error, not only when the exported program runs [oracle: NumPy core]."""
    import deformops

    x, c = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
    for options, error in ((dict(mode="bogus"), ValueError), (dict(order=3), NotImplementedError),
                           (dict(order=-1), ValueError)):
        with pytest.raises(error) as core:
            deformops.sample(x.numpy(), c.numpy(), **options)

        class M(torch.nn.Module):
            def forward(self, a, b, options=options):
                return dt.sample(a, b, **options)

        with pytest.raises(error, match=re.escape(str(core.value)[:20])):
            torch.export.export(M(), (x, c))
