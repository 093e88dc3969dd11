"""deformops kernels as PyTorch operators with autograd, fake (meta) kernels and torch.compile
support.

Each op is a ``torch.library.custom_op`` in the ``deformops`` namespace, so it runs eagerly and
under ``torch.compile(fullgraph=True)`` without a graph break:

=====================================  =========================================================
operator                               what it does
=====================================  =========================================================
``deformops::deform_conv2d``           :func:`deformops.deform_conv2d` (NCHW)
``deformops::deform_conv2d_backward``  :func:`deformops.deform_conv2d_backward`
``deformops::sample``                  :func:`deformops.sample`
``deformops::sample_backward``         :func:`deformops.sample_backward`
``deformops::deform_sample``           :func:`deformops.deform_sample`
``deformops::deform_sample_backward``  :func:`deformops.deform_sample_backward`
=====================================  =========================================================

Tensors are detached and handed to deformops as NumPy views (CPU, ``Tensor.numpy``) or CuPy
views (CUDA, DLPack), with no copy; on CUDA the kernels run on torch's current stream. Backward
operators return an empty tensor for a gradient that is not needed (autograd turns it into
None). Under ``torch.autocast`` the public functions compute in float32 and return the input's
dtype (torchvision's autocast rule for ``deform_conv2d``).

Plain eager calls (not compiling or tracing, no torch function or dispatch mode, no functorch
transform, plain CPU/CUDA tensors) skip the dispatcher: the public functions run the same
kernels through a ``torch.autograd.Function``. The registered operators' Python autograd and
dispatch layers cost about 70 us per call on tiny inputs, the Function about 35 us, against a
budget of 50 us (``python -m deformops.bench torch``); both paths give bit-identical results.
Under torch.func's reverse-mode transforms (``grad``, ``vjp``, ``jacrev`` and what is composed
with them, outside ``torch.compile``) the public functions call the operators through
``torch.autograd.Function``s that functorch supports: the operators' own autograd fails there
in torch 2.14 (pytorch/pytorch#170834). Every operator, and each such Function, has a vmap
batching rule (:mod:`deformops_torch._vmap`): a mapped dimension folds into the batch, one
kernel call. Everything else (``vmap`` alone, ``functionalize``, ``torch.compile``,
``torch.export``, FakeTensor, dispatch modes such as FlopCounterMode) goes through the
operators.
"""

import numbers
import operator
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

import deformops
from deformops.backends import cuda as deformops_cuda
from deformops._modes import check_order, mode_code
from deformops.backends.cpu import limit_threads

from . import _vmap
from ._dlpack import is_channels_last, on_stream, to_array, to_tensor

# torch.use_deterministic_algorithms(True) also makes the CUDA input gradients deterministic
deformops_cuda.register_framework_switch(torch.are_deterministic_algorithms_enabled)

_EMPTY = (0,)


def _pair(value, name, minimum=0):
    """An int or a pair of ints, each >= ``minimum``, as a list of two ints. Like the core, and
    torchvision, a float, string or bool (also inside the pair) is a ``TypeError``: never
    truncated."""
    if type(value) is int and value >= minimum:  # the common cases first (per-call cost)
        return [value, value]
    if (type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and min(value) >= minimum):
        return list(value)
    pair = list(value) if isinstance(value, (tuple, list)) else [value, value]
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        if any(isinstance(v, bool) for v in pair):
            raise TypeError
        pair = [operator.index(v) for v in pair]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_tensors(**named):
    """``TypeError`` naming the argument for anything but a tensor (None allowed where optional).

    Without it a NumPy array or a list would reach the operator's schema check, which raises a
    ``RuntimeError``; a wrong array type is a ``TypeError``, as the core gives.
    """
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


_PLAIN = (Tensor, torch.nn.Parameter)
try:  # private switches, present since torch 2.0; without them every call takes the operator
    from torch._C import (_get_tracing_state, _is_torch_function_mode_enabled,
                          _len_torch_dispatch_stack)
    from torch._C._functorch import peek_interpreter_stack
    from torch.compiler import is_compiling
except ImportError:  # pragma: no cover
    _is_torch_function_mode_enabled = None
try:  # private too; without it forward-mode transforms are not refused
    from torch._C._functorch import TransformType, get_unwrapped, maybe_get_level
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover
    retrieve_all_functorch_interpreters = None


def _refuse_forward_mode(*tensors):
    """``NotImplementedError`` when a forward-mode tangent reaches the op: one of
    ``torch.func.jvp`` (also ``jacfwd``, ``hessian``), or of ``torch.autograd.forward_ad``
    (also ``torch.func.linearize``). The operators have no forward-mode derivative, and under
    transforms, ``make_fx`` and ``functionalize`` torch's custom operators drop the tangent
    without a word (a Jacobian of zeros). Inputs without a tangent (constants, a frozen layer's
    inside ``jvp``) run. Not while compiling: dynamo cannot trace these queries
    (``torch.compile`` of a ``jvp`` still drops the tangent)."""
    if retrieve_all_functorch_interpreters is None or is_compiling():
        return
    if not _dual_level_open() and (
            peek_interpreter_stack() is None
            or all(i.key() != TransformType.Jvp for i in retrieve_all_functorch_interpreters())):
        return
    if any(_dual(t) for t in tensors):
        raise NotImplementedError(
            "deformops_torch ops have no forward-mode derivative (torch.func.jvp, jacfwd, "
            "hessian, linearize, torch.autograd.forward_ad): use reverse mode "
            "(torch.autograd.grad, Tensor.backward)")


def _dual_level_open():
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (a private attribute: False
    where a torch version lacks it)."""
    return getattr(fwAD, "_current_level", -1) >= 0


def _dual(t):
    """Whether ``t``, or a tensor that torch.func transforms wrapped into it (``jvp``,
    ``vmap``, ``grad``, ``functionalize``), carries a forward-mode tangent: a ``jvp``'s, at its
    level, or a ``torch.autograd.forward_ad`` one (also ``linearize``'s)."""
    while t is not None:
        try:
            if fwAD.unpack_dual(t).tangent is not None:
                return True
        except RuntimeError:  # vmap's wrappers: unpack_dual has no batching rule
            pass
        t = get_unwrapped(t) if maybe_get_level(t) >= 0 else None
    return False


def _eager(*tensors):
    """True when a call may skip the registered operator (see the module docstring): plain
    eager execution (not compiling, not under ``torch.jit.trace``, no torch function or
    dispatch mode such as FakeTensorMode, no functorch transform) of plain CPU/CUDA tensors,
    where the operator would do nothing but dispatch to the same kernels."""
    if _is_torch_function_mode_enabled is None or is_compiling() \
            or _is_torch_function_mode_enabled() or _len_torch_dispatch_stack() \
            or peek_interpreter_stack() is not None or _get_tracing_state() is not None:
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or not (t.is_cpu or t.is_cuda)):
            return False
    return True


def _transformed():
    """True under a torch.func reverse-mode transform (``grad``, ``vjp``, ``jacrev``), outside
    ``torch.compile``: calls there go through the Functions that support them
    (``_DeformConv2dTransformed``). Under ``vmap`` alone the operators run, with their batching
    rules. Combined with ``functionalize``: ``NotImplementedError``."""
    if (_is_torch_function_mode_enabled is None or retrieve_all_functorch_interpreters is None
            or is_compiling() or peek_interpreter_stack() is None):  # private imports failed
        return False
    keys = {i.key() for i in retrieve_all_functorch_interpreters()}
    if TransformType.Grad not in keys:
        return False
    if TransformType.Functionalize in keys:
        # torch's custom operators and autograd.Functions both fail there, with internal errors
        raise NotImplementedError(
            "deformops_torch ops do not support torch.func.grad / vjp / jacrev combined with "
            "torch.func.functionalize (torch supports neither for custom operators); use "
            "either transform alone")
    return True


def _running(t):
    """The context of a kernel call on ``t``'s device: on the CPU, at most torch's intra-op
    thread count (``torch.set_num_threads``; 1 in ``DataLoader`` workers, ``OMP_NUM_THREADS``
    under ``torchrun``), so that the kernels never oversubscribe what torch was given; on CUDA,
    torch's current stream."""
    if t.device.type == "cpu":
        return limit_threads(torch.get_num_threads())
    return on_stream(t)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_float32(device, tensors):
    """Under ``torch.autocast`` for ``device``'s type: ``tensors`` with every floating one but
    float64 cast to float32 (differentiably), as torchvision's autocast rule for
    ``deform_conv2d`` does; the caller casts the result back to the input's dtype. None when
    autocast is off (the common case, one cheap check) and for devices autocast does not know
    (``meta``: FakeTensor and shape inference go to the operators' fake kernels)."""
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return tuple(t.float() if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


# ----------------------------------------------------------------------------------------------
# deform_conv2d


@torch.library.custom_op("deformops::deform_conv2d", mutates_args=(), device_types=("cpu", "cuda"))
def _deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                   mask: Optional[Tensor], stride: list[int], padding: list[int],
                   dilation: list[int]) -> Tensor:
    return _conv_forward_kernel(input, offset, weight, bias, mask, stride, padding, dilation)


def _conv_forward_kernel(input, offset, weight, bias, mask, stride, padding, dilation):
    with _running(input):
        out = deformops.deform_conv._forward(  # the core's, naming the input as torch does
            to_array(input, "input"), to_array(offset, "offset"), to_array(weight, "weight"),
            to_array(bias, "bias"), stride, padding, dilation, to_array(mask, "mask"), "NCHW",
            x_name="input")
    return to_tensor(out)


def _conv_backward_kernel(grad_out, input, offset, weight, mask, stride, padding, dilation,
                          needs_input_grad):
    """(grad_input, grad_offset, grad_weight, grad_mask, grad_bias) as tensors, None where
    not needed."""
    with _running(input):
        grads = deformops.deform_conv._backward(
            to_array(grad_out, "grad_out"), to_array(input, "input"), to_array(offset, "offset"),
            to_array(weight, "weight"), stride, padding, dilation, to_array(mask, "mask"),
            "NCHW", needs_input_grad, x_name="input")
    return tuple(None if g is None else to_tensor(g) for g in grads)


def _conv_format(input):
    """Memory format of the results: a CPU channels_last input runs the core's NHWC kernels,
    whose results are channels_last (CUDA converts to NCHW)."""
    return (torch.channels_last if input.device.type == "cpu" and is_channels_last(input)
            else torch.contiguous_format)


def _conv_shapes(input, offset, weight, bias, mask, stride, padding, dilation):
    """The core's shape checks on (possibly symbolic) shapes: the fake kernels raise the eager
    calls' ValueErrors, instead of returning a tensor of a wrong shape (meta tensors,
    FakeTensorMode) or failing somewhere later (torch.compile)."""
    return deformops.deform_conv.check_shapes(
        input.shape, offset.shape, weight.shape, None if bias is None else bias.shape,
        None if mask is None else mask.shape, stride, padding, dilation, x_name="input")


@_deform_conv2d.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation):
    N, Cout, Ho, Wo, _, _ = _conv_shapes(input, offset, weight, bias, mask, stride, padding,
                                         dilation)
    return torch.empty((N, Cout, Ho, Wo), dtype=input.dtype, device=input.device,
                       memory_format=_conv_format(input))


@torch.library.custom_op("deformops::deform_conv2d_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _deform_conv2d_backward(grad_out: Tensor, input: Tensor, offset: Tensor, weight: Tensor,
                            mask: Optional[Tensor], stride: list[int], padding: list[int],
                            dilation: list[int], needs_input_grad: list[bool]
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _conv_backward_kernel(grad_out, input, offset, weight, mask, stride, padding,
                                  dilation, needs_input_grad)
    return tuple(input.new_empty(_EMPTY) if g is None else g for g in grads)


@_deform_conv2d_backward.register_fake
def _(grad_out, input, offset, weight, mask, stride, padding, dilation, needs_input_grad):
    _conv_shapes(input, offset, weight, None, mask, stride, padding, dilation)
    likes = (input, offset, weight, mask, grad_out.new_empty((weight.shape[0],)))
    fmt = _conv_format(input)  # input, offset and mask gradients; weight and bias contiguous
    formats = (fmt, fmt, torch.contiguous_format, fmt, torch.contiguous_format)
    return tuple(
        torch.empty_like(t, memory_format=f) if need and t is not None
        else input.new_empty(_EMPTY)
        for t, need, f in zip(likes, needs_input_grad, formats))


def _conv_setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias, ctx.has_mask = bias is not None, mask is not None


def _conv_backward(ctx, grad_out, backward_op=None):
    input, offset, weight, mask = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[4] and ctx.has_mask, n[3] and ctx.has_bias]
    backward_op = backward_op or torch.ops.deformops.deform_conv2d_backward
    gi, go, gw, gm, gb = backward_op(grad_out, input, offset, weight, mask, *ctx.conv_args,
                                     needs)
    g = [gi, go, gw, gm, gb]
    # inputs: input, offset, weight, bias, mask, stride, padding, dilation
    return (g[0] if needs[0] else None, g[1] if needs[1] else None, g[2] if needs[2] else None,
            g[4] if needs[4] else None, g[3] if needs[3] else None, None, None, None)


def _check_conv_shapes(input, offset, weight, bias, mask, stride, padding, dilation):
    deformops.deform_conv.check_shapes(input, offset, weight, bias, mask, stride, padding,
                                       dilation, x_name="input")


_deform_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup_context)
_deform_conv2d.register_vmap(_vmap.conv_forward_rule(_deform_conv2d, _check_conv_shapes))
_deform_conv2d_backward.register_vmap(_vmap.conv_backward_rule(_deform_conv2d_backward))


def _first_order_only(backward_op):
    """An autograd.Function that runs ``backward_op`` (a backward operator) under torch.func
    transforms, and refuses to be differentiated: the kernels have first derivatives only."""

    class Backward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return backward_op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(
                f"deformops_torch ops have first derivatives only: there is no autograd formula "
                f"for {backward_op._qualname} (second-order derivatives: grad of grad, jacrev of "
                "jacrev, a gradient penalty)")

    Backward.__name__ = Backward.__qualname__ = f"_{backward_op._name}_transformed"
    return Backward


class _DeformConv2dTransformed(torch.autograd.Function):
    """The path of :func:`deform_conv2d` under torch.func's reverse-mode transforms (``grad``,
    ``vjp``, ``jacrev``, and ``vmap`` composed with them, such as per-sample gradients).

    The registered operator's own autograd cannot run there in torch 2.14 (its generated
    Function has no ``setup_context``: pytorch/pytorch#170834). This Function calls the same
    operators and backward rule. Its vmap rule is the operator's, folding into one call of
    this Function: a rule derived by torch (``generate_vmap_rule``) would run the backward
    under vmap, one call per element for a shared weight's gradient."""

    _backward_op = _first_order_only(_deform_conv2d_backward)

    @staticmethod
    def forward(input, offset, weight, bias, mask, stride, padding, dilation):
        return _deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation)

    setup_context = staticmethod(_conv_setup_context)
    vmap = staticmethod(_vmap.conv_forward_rule(
        lambda *args: _DeformConv2dTransformed.apply(*args), _check_conv_shapes))

    @staticmethod
    def backward(ctx, grad_out):
        return _conv_backward(ctx, grad_out, _DeformConv2dTransformed._backward_op.apply)


class _DeformConv2dFunction(torch.autograd.Function):
    """The eager path of :func:`deform_conv2d`: the same kernels without the dispatcher.

    With ``create_graph=True`` its backward runs the registered backward operator, as the
    operator path does: the gradients it returns then raise if they are differentiated again
    (the operator has no derivative). ``once_differentiable`` would not do: its error node hangs
    on ``grad_out`` only, so a second derivative taken with respect to the inputs (a gradient
    penalty, an input that also reaches the loss another way) silently left the op's
    second-order term out.
    """

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation):
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.conv_args = (stride, padding, dilation)
        ctx.has_bias, ctx.has_mask = bias is not None, mask is not None
        return _conv_forward_kernel(input, offset, weight, bias, mask, stride, padding,
                                    dilation)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: see the class docstring
            return _conv_backward(ctx, grad_out)
        input, offset, weight, mask = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2], n[4] and ctx.has_mask, n[3] and ctx.has_bias)
        gi, go, gw, gm, gb = _conv_backward_kernel(grad_out, input, offset, weight, mask,
                                                   *ctx.conv_args, needs)
        return gi, go, gw, gb, gm, None, None, None


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """Deformable convolution v1 (``mask=None``) or v2, a drop-in for
    ``torchvision.ops.deform_conv2d`` (same arguments, same order, same results).

    Parameters
    ----------
    input : Tensor, (N, Cin, H, W)
    offset : Tensor, (N, 2*G*kh*kw, Ho, Wo)
        Channel ``g*2*kh*kw + 2*k`` is Δy of offset group g and tap k = i*kw + j, ``+1`` is Δx.
    weight : Tensor, (Cout, Cin/groups, kh, kw)
    bias : Tensor, (Cout,), optional
    stride, padding, dilation : int or (int, int)
    mask : Tensor, (N, G*kh*kw, Ho, Wo), optional
        DCNv2 modulation, channel ``g*kh*kw + k``.

    Returns
    -------
    Tensor, (N, Cout, Ho, Wo)
        Differentiable with respect to input, offset, weight, bias and mask.
    """
    _check_tensors(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    conv = (_pair(stride, "stride", 1), _pair(padding, "padding"), _pair(dilation, "dilation", 1))
    tensors = (input, offset, weight, bias, mask)
    cast = _autocast_float32(input.device, tensors)
    if cast is not None:
        return _conv_call(*cast, *conv).to(input.dtype)
    return _conv_call(*tensors, *conv)


def _conv_call(*args):
    if _eager(*args[:5]):
        if _dual_level_open():
            _refuse_forward_mode(*args[:5])
        return _DeformConv2dFunction.apply(*args)
    _refuse_forward_mode(*args[:5])
    if _transformed():
        return _DeformConv2dTransformed.apply(*args)
    return _deform_conv2d(*args)


# ----------------------------------------------------------------------------------------------
# sample and deform_sample: one pair of operators each, same semantics as deformops


def _sampling_fake(x, coords, order, mode, cval):
    N, C = x.shape[:2]
    Ho, Wo = coords.shape[2:]
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)


def _sampling_backward_fake(grad_out, x, coords, order, mode, cval, needs_input_grad):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=fmt) if need else x.new_empty(_EMPTY)
                 for t, need in zip((x, coords), needs_input_grad))


def _define_sampling(name, forward, backward, coords_name):
    """Register ``deformops::<name>`` and its backward; return the forward operator."""

    def forward_kernel(x, coords, order, mode, cval):
        with _running(x):
            out = forward(to_array(x, "x"), to_array(coords, coords_name), order=order,
                          mode=mode, cval=cval)
        return to_tensor(out)

    def backward_kernel(grad_out, x, coords, order, mode, cval, needs_input_grad):
        with _running(x):
            grads = backward(to_array(grad_out, "grad_out"), to_array(x, "x"),
                             to_array(coords, coords_name), order=order, mode=mode, cval=cval,
                             needs_input_grad=needs_input_grad)
        return tuple(None if g is None else to_tensor(g) for g in grads)

    @torch.library.custom_op(f"deformops::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    def op(x: Tensor, coords: Tensor, order: int, mode: str, cval: float) -> Tensor:
        return forward_kernel(x, coords, order, mode, cval)

    @torch.library.custom_op(f"deformops::{name}_backward", mutates_args=(),
                             device_types=("cpu", "cuda"))
    def op_backward(grad_out: Tensor, x: Tensor, coords: Tensor, order: int, mode: str,
                    cval: float, needs_input_grad: list[bool]) -> tuple[Tensor, Tensor]:
        grads = backward_kernel(grad_out, x, coords, order, mode, cval, needs_input_grad)
        return tuple(x.new_empty(_EMPTY) if g is None else g for g in grads)

    def check_shapes(x_shape, coords_shape):  # the core's checks, as _conv_shapes
        deformops.sampling.check_shapes(x_shape, coords_shape, coords_name,
                                        relative=name == "deform_sample")

    @op.register_fake
    def _(x, coords, order, mode, cval):
        check_shapes(x.shape, coords.shape)
        return _sampling_fake(x, coords, order, mode, cval)

    @op_backward.register_fake
    def _(grad_out, x, coords, order, mode, cval, needs_input_grad):
        check_shapes(x.shape, coords.shape)
        return _sampling_backward_fake(grad_out, x, coords, order, mode, cval, needs_input_grad)

    def setup_context(ctx, inputs, output):
        x, coords, order, mode, cval = inputs
        ctx.save_for_backward(x, coords)
        ctx.sampling_args = (order, mode, cval)

    def backward_rule(ctx, grad_out, backward_op=op_backward):
        x, coords = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:2])
        grad_x, grad_coords = backward_op(grad_out, x, coords, *ctx.sampling_args, needs)
        return (grad_x if needs[0] else None, grad_coords if needs[1] else None,
                None, None, None)

    op.register_autograd(backward_rule, setup_context=setup_context)
    op.register_vmap(_vmap.sampling_forward_rule(op, check_shapes))
    op_backward.register_vmap(_vmap.sampling_backward_rule(op_backward))

    context_rule = setup_context  # a class body cannot read a name that it assigns
    transformed_backward = _first_order_only(op_backward)

    class Transformed(torch.autograd.Function):
        """The path under reverse-mode torch.func transforms (``_DeformConv2dTransformed``)."""

        @staticmethod
        def forward(x, coords, order, mode, cval):
            return op(x, coords, order, mode, cval)

        setup_context = staticmethod(context_rule)
        vmap = staticmethod(_vmap.sampling_forward_rule(lambda *a: Transformed.apply(*a),
                                                        check_shapes))

        @staticmethod
        def backward(ctx, grad_out):
            return backward_rule(ctx, grad_out, transformed_backward.apply)

    class Function(torch.autograd.Function):
        """The eager path: the same kernels without the dispatcher."""

        @staticmethod
        def forward(ctx, x, coords, order, mode, cval):
            ctx.save_for_backward(x, coords)
            ctx.sampling_args = (order, mode, cval)
            return forward_kernel(x, coords, order, mode, cval)

        @staticmethod
        def backward(ctx, grad_out):
            if torch.is_grad_enabled():  # create_graph=True: see _DeformConv2dFunction
                return backward_rule(ctx, grad_out)
            x, coords = ctx.saved_tensors
            grad_x, grad_coords = backward_kernel(grad_out, x, coords, *ctx.sampling_args,
                                                  ctx.needs_input_grad[:2])
            return grad_x, grad_coords, None, None, None

    title = name.title().replace("_", "")
    Function.__name__ = Function.__qualname__ = f"_{title}Function"
    Transformed.__name__ = Transformed.__qualname__ = f"_{title}Transformed"
    return op, Function, Transformed


_sample, _SampleFunction, _SampleTransformed = _define_sampling(
    "sample", deformops.sample, deformops.sample_backward, "coords")
_deform_sample, _DeformSampleFunction, _DeformSampleTransformed = _define_sampling(
    "deform_sample", deformops.deform_sample, deformops.deform_sample_backward, "offset")
_SAMPLING_TRANSFORMED = {_sample: _SampleTransformed, _deform_sample: _DeformSampleTransformed}


def _check_sampling_args(order, mode, cval):
    """The operator schema's (int, str, float), and their values by deformops' own rules and
    messages (order 0/1, mode names): now, so that a traced or exported program does not hold
    an option that fails only when it runs. Integer and real NumPy scalars are accepted, as by
    the core."""
    if isinstance(order, bool):
        raise TypeError(f"order must be an integer, got {type(order).__name__}")
    try:
        order = operator.index(order)
    except TypeError:
        raise TypeError(f"order must be an integer, got {type(order).__name__}") from None
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, got {type(mode).__name__}")
    check_order(order)
    mode_code(mode)
    if isinstance(cval, bool) or not isinstance(cval, numbers.Real):
        raise TypeError(f"cval must be a real number, got {type(cval).__name__}")
    return order, mode, deformops._arrays.check_cval(cval)  # an int beyond float: ValueError


def _sampling_call(op, function, x, coords, *options):
    if _eager(x, coords):
        if _dual_level_open():
            _refuse_forward_mode(x, coords)
        return function.apply(x, coords, *options)
    _refuse_forward_mode(x, coords)
    if _transformed():
        return _SAMPLING_TRANSFORMED[op].apply(x, coords, *options)
    return op(x, coords, *options)


def sample(x, coords, *, order=1, mode="grid-constant", cval=0.0):
    """Sample ``x`` at absolute (y, x) pixel coordinates, differentiably.

    Parameters
    ----------
    x : Tensor, (N, C, H, W)
        channels_last tensors run the NHWC kernel without a copy and give a channels_last output.
    coords : Tensor, (N, 2G, Ho, Wo)
        Channel ``2g`` is y and ``2g+1`` is x of offset group g, which covers channels
        ``[g*C/G, (g+1)*C/G)``.
    order : {0, 1}
        Nearest or bilinear.
    mode : str
        Any mode of :func:`deformops.sample` ('grid-constant', 'constant', 'nearest', 'reflect',
        'mirror', 'wrap', 'grid-wrap', ...), identical to ``scipy.ndimage.map_coordinates``.
    cval : float
        Value outside the image for the constant modes.

    Returns
    -------
    Tensor, (N, C, Ho, Wo)
        Differentiable with respect to ``x`` and ``coords``.
    """
    _check_tensors(x=x, coords=coords)
    options = _check_sampling_args(order, mode, cval)
    cast = _autocast_float32(x.device, (x, coords))
    if cast is not None:
        return _sampling_call(_sample, _SampleFunction, *cast, *options).to(x.dtype)
    return _sampling_call(_sample, _SampleFunction, x, coords, *options)


def deform_sample(x, offset, *, order=1, mode="grid-constant", cval=0.0):
    """Sample ``x`` at the regular grid plus ``offset``: output (i, j) reads ``(i + dy, j + dx)``.

    Parameters
    ----------
    x : Tensor, (N, C, H, W)
    offset : Tensor, (N, 2G, H, W)
        Channel ``2g`` is dy and ``2g+1`` is dx of offset group g (channels
        ``[g*C/G, (g+1)*C/G)``).
    order, mode, cval
        As :func:`sample`.

    Returns
    -------
    Tensor, (N, C, H, W)
        Differentiable with respect to ``x`` and ``offset``.
    """
    _check_tensors(x=x, offset=offset)
    options = _check_sampling_args(order, mode, cval)
    cast = _autocast_float32(x.device, (x, offset))
    if cast is not None:
        return _sampling_call(_deform_sample, _DeformSampleFunction, *cast, *options).to(x.dtype)
    return _sampling_call(_deform_sample, _DeformSampleFunction, x, offset, *options)
