"""deformops_torch under torch.func transforms: vmap batching rules, grad / vjp / jacrev, and
their compositions (per-sample gradients).

Oracles (each test names its own):

- [loop]: the same public op called on each mapped element in turn, on plain tensors;
- [autograd]: ``torch.autograd.grad`` of the same function on plain tensors;
- [finite differences]: ``torch.autograd.gradcheck`` in float64 of a vmapped function, at
  offsets whose fractional parts stay 0.1-0.3 px away from the kinks of the interpolant.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import deformops_torch as dt  # noqa: E402
from _torch_inputs import rand, smooth  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)  # folding images into one call may change BLAS blocking


def conv_tensors(rng, lead, N, mask=True, bias=True, C=2, Cout=3, H=4, W=5):
    """input, offset, weight, bias, mask of a 3x3 padding-1 deform_conv2d, each per-image
    tensor with the leading dims ``lead`` before N (the mapped ones), float64."""
    x = rand(rng, *lead, N, C, H, W)
    off = smooth(rng, (*lead, N, 18, H, W))
    w = rand(rng, Cout, C, 3, 3)
    b = rand(rng, Cout) if bias else None
    m = rand(rng, *lead, N, 9, H, W, lo=0.0, hi=1.0) if mask else None
    return x, off, w, b, m


def conv(x, off, w, b=None, m=None):
    return dt.deform_conv2d(x, off, w, b, padding=1, mask=m)


def sampling_tensors(rng, op, lead, N, C=2, H=4, W=5):
    x = rand(rng, *lead, N, C, H, W)
    if op == "deform_sample":
        return x, smooth(rng, (*lead, N, 2, H, W))
    return x, smooth(rng, (*lead, N, 2, 3, 4), span=3) + 2  # around the image, outside too


SAMPLING = {"sample": dt.sample, "deform_sample": dt.deform_sample}


def looped(f, args, in_dims, size):
    """[loop] oracle: f on each mapped element, stacked along dim 0."""
    def element(b):
        return [a.select(d, b) if d is not None and a is not None else a
                for a, d in zip(args, in_dims)]

    return torch.stack([f(*element(b)) for b in range(size)])


def mapped(rng, t, size, dim):
    """``t`` (one element) with ``size`` different elements stacked at ``dim``."""
    return torch.stack([t + rand(rng, *t.shape) * 0.1 for _ in range(size)], dim=dim)


def vmapped(f, in_dims, args):
    """torch.func.vmap(f) on args, failing on torch's per-element fallback warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        return torch.func.vmap(f, in_dims=tuple(in_dims))(*args)


# ====================================================================== vmap


@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 3), N=st.integers(0, 2),
       which=st.lists(st.booleans(), min_size=3, max_size=3).filter(any),
       last=st.booleans(), mask=st.booleans(), bias=st.booleans())
def test_vmap_deform_conv2d_matches_loop(seed, size, N, which, last, mask, bias):
    """Any of input, offset, mask mapped (at dim 0 or the last dim), the others shared, N = 0
    included: one folded call equals the op on each element [oracle: loop]."""
    rng = np.random.default_rng(seed)
    x, off, w, b, m = conv_tensors(rng, (), N, mask=mask, bias=bias)
    args, dims = [x, off, m], []
    for i, (t, on) in enumerate(zip(args, which)):
        on = on and t is not None
        dim = (t.dim() if last else 0) if on else None
        if on:
            args[i] = mapped(rng, t, size, dim)
        dims.append(dim)
    if all(d is None for d in dims):
        dims[0], args[0] = 0, mapped(rng, x, size, 0)
    f = lambda a, o, mm: conv(a, o, w, b, mm)  # noqa: E731
    got = vmapped(f, dims, args)
    torch.testing.assert_close(got, looped(f, args, dims, size), **TIGHT)


@pytest.mark.parametrize("mapped_args", ["weight", "bias", "weight+input"])
def test_vmap_deform_conv2d_ensemble(mapped_args):
    """A mapped weight or bias (an ensemble of layers) runs one call per element
    [oracle: loop]."""
    rng = np.random.default_rng(1)
    x, off, w, b, m = conv_tensors(rng, (), 2)
    args = [x, off, w, b, m]
    dims = [None] * 5
    for name in mapped_args.split("+"):
        i = ("input", "offset", "weight", "bias", "mask").index(name)
        args[i], dims[i] = mapped(rng, args[i], 3, 0), 0
    got = vmapped(conv, dims, args)
    torch.testing.assert_close(got, looped(conv, args, dims, 3), **TIGHT)


@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 3), N=st.integers(0, 2),
       op=st.sampled_from(sorted(SAMPLING)), which=st.sampled_from([(0, 0), (0, None),
                                                                    (None, 0), (4, 1)]))
def test_vmap_sampling_matches_loop(seed, size, N, op, which):
    """sample / deform_sample with x, the coordinates or both mapped [oracle: loop]."""
    rng = np.random.default_rng(seed)
    x, c = sampling_tensors(rng, op, (), N)
    args = [x if d is None else mapped(rng, x, size, d) for x, d in zip((x, c), which)]
    f = lambda a, cc: SAMPLING[op](a, cc, mode="nearest")  # noqa: E731
    got = vmapped(f, which, args)
    torch.testing.assert_close(got, looped(f, args, which, size), **TIGHT)


def test_nested_vmap():
    """vmap of vmap folds both mapped dimensions [oracle: loop over both]."""
    rng = np.random.default_rng(2)
    x, off, w, b, m = conv_tensors(rng, (2, 3), 1)
    f = lambda a, o, mm: conv(a, o, w, b, mm)  # noqa: E731
    got = torch.func.vmap(torch.func.vmap(f))(x, off, m)
    want = torch.stack([looped(f, (x[i], off[i], m[i]), (0, 0, 0), 3) for i in range(2)])
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("needs", [(True, True, True, True, True), (False, True, False, True,
                                                                     False)])
@pytest.mark.parametrize("dims", [(0, 0, 0, None, 0), (0, None, None, None, None),
                                  (None, 0, 0, 0, None)])
def test_vmap_raw_conv_backward_operator(dims, needs):
    """The backward operator's own rule, folded (per-image gradients) or looped (a mapped
    weight, or the weight and bias gradients, which sum over the images): the gradients each
    element needs [oracle: loop]."""
    rng = np.random.default_rng(3)
    x, off, w, _, m = conv_tensors(rng, (), 2)
    go = rand(rng, 2, 3, 4, 5)
    args = [go, x, off, w, m]
    args = [mapped(rng, a, 2, 0) if d is not None else a for a, d in zip(args, dims)]
    op = torch.ops.deformops.deform_conv2d_backward

    def f(*a):
        outs = op(*a, [1, 1], [1, 1], [1, 1], list(needs))
        return torch.cat([o.flatten() for o, n in zip(outs, needs) if n])

    got = vmapped(f, dims, args)
    torch.testing.assert_close(got, looped(f, args, dims, 2), **TIGHT)


@pytest.mark.parametrize("op", sorted(SAMPLING))
def test_vmap_raw_sampling_backward_operator(op):
    rng = np.random.default_rng(4)
    x, c = sampling_tensors(rng, op, (2,), 1)
    go = rand(rng, *x.shape[:3], *c.shape[-2:])
    raw = getattr(torch.ops.deformops, f"{op}_backward")

    def f(g, a, cc):
        gx, gc = raw(g, a, cc, 1, "reflect", 0.0, [True, True])
        return torch.cat([gx.flatten(), gc.flatten()])

    for dims in [(0, 0, 0), (0, None, 0), (None, 0, None)]:
        args = [t if d is not None else t[0] for t, d in zip((go, x, c), dims)]
        got = vmapped(f, dims, args)
        torch.testing.assert_close(got, looped(f, args, dims, 2), **TIGHT)


# ====================================================================== grad, vjp, jacrev


def _conv_all(rng):
    x, off, w, b, m = conv_tensors(rng, (), 2)
    return (x, off, w, b, m), conv


def _sampling_all(op):
    def make(rng):
        return sampling_tensors(rng, op, (), 2), SAMPLING[op]
    return make


CASES = {"deform_conv2d": _conv_all, "sample": _sampling_all("sample"),
         "deform_sample": _sampling_all("deform_sample")}


def _autograd(f, inputs, go):
    leaves = [t.clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(f(*leaves), leaves, go)


@pytest.mark.parametrize("case", sorted(CASES))
def test_func_grad_vjp_jacrev(case):
    """torch.func.grad, vjp and jacrev, with respect to every input [oracle: autograd]."""
    rng = np.random.default_rng(5)
    inputs, f = CASES[case](rng)
    out = f(*inputs)
    go = rand(rng, *out.shape)
    want = _autograd(f, inputs, go)
    argnums = tuple(range(len(inputs)))
    got = torch.func.grad(lambda *a: (f(*a) * go).sum(), argnums=argnums)(*inputs)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TIGHT)
    value, pullback = torch.func.vjp(f, *inputs)
    torch.testing.assert_close(value, out, rtol=0, atol=0)
    for g, r in zip(pullback(go), want):
        torch.testing.assert_close(g, r, **TIGHT)
    jac = torch.func.jacrev(f, argnums=1)(*inputs)  # d out / d offset or coords
    torch.testing.assert_close(torch.tensordot(go, jac, dims=go.dim()), want[1], **TIGHT)


@pytest.mark.parametrize("argnums", [(0, 1, 2, 3, 4), (1, 4)])
def test_per_sample_gradients(argnums):
    """vmap(grad) over a batch of single images, the layer's weight and bias shared: each
    image's own gradients, those of the weight and bias included (the backward rule loops)
    or not (it folds) [oracle: autograd per image]."""
    rng = np.random.default_rng(6)
    x, off, w, b, m = conv_tensors(rng, (), 4)

    def loss(xi, oi, w_, b_, mi):
        return (conv(xi[None], oi[None], w_, b_, mi[None]) ** 2).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=argnums),
                            in_dims=(0, 0, None, None, 0))(x, off, w, b, m)
    for i in range(4):
        inputs = (x[i], off[i], w, b, m[i])
        want = _autograd(loss, inputs, None)
        for g, a in zip(grads, argnums):
            torch.testing.assert_close(g[i], want[a], **TIGHT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck_through_vmap(case):
    """Gradients of a vmapped op: the Functions' backward under the vmap rules
    [oracle: finite differences]."""
    rng = np.random.default_rng(7)
    inputs, f = CASES[case](rng)
    inputs = [t.requires_grad_() for t in inputs]
    dims = (0, 0, None, None, 0)[:len(inputs)]  # the per-image ones, mapped over their batch
    assert torch.autograd.gradcheck(
        lambda *a: torch.func.vmap(lambda *e: f(*(t[None] if d == 0 else t
                                                 for t, d in zip(e, dims))),
                                   in_dims=dims)(*a), inputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_order_raises_under_transforms(case):
    """grad of grad: the kernels have first derivatives only, and say so rather than return
    a second derivative without the op's term [oracle: the error itself]."""
    rng = np.random.default_rng(8)
    inputs, f = CASES[case](rng)

    def first(a):
        return torch.func.grad(lambda t: (f(t, *inputs[1:]) ** 2).sum())(a).sum()

    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.grad(first)(inputs[0])


# ================================================================ kernel calls, other transforms


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the core's deform_conv2d forward and backward calls."""
    import deformops.deform_conv as core

    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(core, "_forward", counted("forward", core._forward))
    monkeypatch.setattr(core, "_backward", counted("backward", core._backward))
    return calls


@pytest.mark.parametrize("how", ["vmap, then backward", "grad of vmap", "per-sample grad"])
def test_vmapped_calls_fold_into_one_kernel_call(kernel_calls, how):
    """A vmapped layer with a shared weight runs one forward and one backward kernel call, its
    weight gradient summed over all images, under plain autograd and under torch.func.grad;
    per-sample gradients run one backward call per element [oracle: the calls counted, and
    the gradient of the same images as one batch]."""
    rng = np.random.default_rng(9)
    x, off, w, b, m = conv_tensors(rng, (4,), 1)
    f = lambda a, o, mm, w_: conv(a, o, w_, b, mm)  # noqa: E731

    def loss(w_):
        return (torch.func.vmap(f, in_dims=(0, 0, 0, None))(x, off, m, w_) ** 2).sum()

    want = _autograd(lambda w_: (conv(x.flatten(0, 1), off.flatten(0, 1), w_, b,
                                      m.flatten(0, 1)) ** 2).sum(), (w,), None)[0]
    kernel_calls.update(forward=0, backward=0)
    if how == "vmap, then backward":
        got = _autograd(loss, (w,), None)[0]
    elif how == "grad of vmap":
        got = torch.func.grad(loss)(w)
    else:
        per = torch.func.vmap(torch.func.grad(lambda w_, a, o, mm: (f(a, o, mm, w_) ** 2).sum()),
                              in_dims=(None, 0, 0, 0))(w, x, off, m)
        got = per.sum(0)
    torch.testing.assert_close(got, want, **TIGHT)
    assert kernel_calls == {"forward": 1, "backward": 4 if how == "per-sample grad" else 1}


def test_functionalize_and_make_fx():
    """torch.func.functionalize runs the operators (no Function: it cannot functionalize
    one), and make_fx of it records them [oracle: the eager call]."""
    from torch.fx.experimental.proxy_tensor import make_fx

    rng = np.random.default_rng(10)
    x, off, w, b, m = conv_tensors(rng, (), 1)
    for f in (lambda a: conv(a, off, w, b, m), lambda a: dt.sample(a, off[:, :2] + 1)):
        torch.testing.assert_close(torch.func.functionalize(f)(x), f(x), rtol=0, atol=0)
        graph = make_fx(torch.func.functionalize(f))(x).graph
        assert any(str(n.target).startswith("deformops.") for n in graph.nodes)


@pytest.mark.parametrize("order", ["grad(functionalize)", "functionalize(grad)"])
def test_reverse_mode_with_functionalize_raises(order):
    """grad composed with functionalize: torch supports it for no custom operator (its own
    autograd of them and autograd.Functions both fail with internal errors); the public
    functions say so [oracle: the error itself]."""
    rng = np.random.default_rng(11)
    x, off, w, b, m = conv_tensors(rng, (), 1)
    for f in (lambda a: conv(a, off, w, b, m).sum(), lambda a: dt.sample(a, off[:, :2]).sum()):
        fn = (torch.func.grad(torch.func.functionalize(f)) if order == "grad(functionalize)"
              else torch.func.functionalize(torch.func.grad(f)))
        with pytest.raises(NotImplementedError, match="functionalize"):
            fn(x)


def test_vmap_errors_name_the_element_shapes():
    """A wrong shape under vmap is reported as one mapped element has it, not as folded; a
    mapped dimension of size 0 where each element needs a call of its own is a ValueError
    [oracle: the messages]."""
    rng = np.random.default_rng(11)
    x, off, w, b, m = conv_tensors(rng, (3,), 2)
    with pytest.raises(ValueError, match=r"offset must .*got shape \(1, 18, 4, 5\)"):
        torch.func.vmap(lambda a, o: conv(a, o, w))(x, off[:, :1])
    with pytest.raises(ValueError, match=r"offset has batch size 1 but x has 2"):
        torch.func.vmap(lambda a, o: dt.deform_sample(a, o))(x, off[:, :1, :2])
    with pytest.raises(ValueError, match="size 0"):
        torch.func.vmap(lambda w_: conv(x[0], off[0], w_))(w[None][:0])
