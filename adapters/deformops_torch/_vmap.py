"""Batching rules of the deformops operators for ``torch.func.vmap``.

Without them torch runs an operator once per element of the mapped dimension (its "batching
rule" fallback, with a performance warning). Every operator here works image by image along
its batch dimension N, so a mapped dimension of size B folds into it: one call on B*N images,
whose per-image results unfold to (B, N, ...). Unmapped per-image inputs (an ``offset`` shared
by every mapped element) are expanded to B first. Two cases are looped instead, one call per
mapped element: a mapped ``weight`` or ``bias`` (an ensemble of layers), whose images do not
share one convolution; and a ``deform_conv2d_backward`` asked for the weight or bias gradient,
which sums over the images and must give each mapped element its own sum (per-sample
gradients).

A rule is ``rule(info, in_dims, *args) -> (output, out_dims)``, as
``torch.library.register_vmap`` and ``torch.autograd.Function.vmap`` take it: ``in_dims`` holds
the mapped dimension of each argument (None where unmapped, or not a tensor). The forward rules
check the shapes of one mapped element first (``check``), so that a wrong shape is reported as
the caller passed it, not as folded.
"""

import torch

__all__ = ["conv_forward_rule", "conv_backward_rule", "sampling_forward_rule",
           "sampling_backward_rule"]


def _front(t, dim, size):
    """``t`` with its mapped dimension first (expanded to ``size`` where unmapped)."""
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


def _fold(t, dim, size):
    """(B, N, ...) of ``t`` as (B*N, ...); None stays None."""
    return None if t is None else _front(t, dim, size).flatten(0, 1)


def _element_shape(t, dim):
    """The shape of one mapped element of ``t`` (None for None)."""
    if t is None:
        return None
    shape = list(t.shape)
    if dim is not None:
        del shape[dim]
    return torch.Size(shape)


def _loop(op, size, args, in_dims):
    """``op`` on each mapped element: a list of its results."""
    if size == 0:
        raise ValueError("vmap over a dimension of size 0 is not supported where each mapped "
                         "element needs a call of its own (a mapped weight or bias, or the "
                         "weight or bias gradient of each element)")

    def element(b):
        return [a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                for a, d in zip(args, in_dims)]

    return [op(*element(b)) for b in range(size)]


def _stacked(results, needed):
    """Per output index of tuple results: stacked along a new dimension 0 where ``needed``,
    else the first element's (an empty placeholder, unmapped)."""
    outs = tuple(torch.stack(parts) if need else parts[0]
                 for parts, need in zip(zip(*results), needed))
    return outs, tuple(0 if need else None for need in needed)


def _unfolded(outs, needed, size, images):
    outs = tuple(o.unflatten(0, (size, images)) if need else o
                 for o, need in zip(outs, needed))
    return outs, tuple(0 if need else None for need in needed)


def conv_forward_rule(op, check):
    """The rule of ``op``, ``deformops::deform_conv2d`` or a Function around it; ``check`` takes
    the (input, offset, weight, bias, mask) shapes of one element and the conv arguments."""

    def rule(info, in_dims, input, offset, weight, bias, mask, stride, padding, dilation):
        B = info.batch_size
        d_in, d_off, d_w, d_b, d_m = in_dims[:5]
        check(*(_element_shape(t, d) for t, d in zip((input, offset, weight, bias, mask),
                                                      in_dims)), stride, padding, dilation)
        if d_w is None and d_b is None:
            N = _element_shape(input, d_in)[0]
            out = op(_fold(input, d_in, B), _fold(offset, d_off, B), weight, bias,
                     _fold(mask, d_m, B), stride, padding, dilation)
            return out.unflatten(0, (B, N)), 0
        args = (input, offset, weight, bias, mask, stride, padding, dilation)
        return torch.stack(_loop(op, B, args, in_dims)), 0

    return rule


def conv_backward_rule(op):
    """The rule of ``deformops::deform_conv2d_backward`` (outputs: input, offset, weight, mask
    and bias gradients; an empty placeholder for one not needed)."""

    def rule(info, in_dims, grad_out, input, offset, weight, mask, stride, padding, dilation,
             needs_input_grad):
        B = info.batch_size
        d_go, d_in, d_off, d_w, d_m = in_dims[:5]
        needed = tuple(bool(n) for n in needs_input_grad)
        if d_w is None and not needed[2] and not needed[4]:  # per-image gradients only
            outs = op(_fold(grad_out, d_go, B), _fold(input, d_in, B), _fold(offset, d_off, B),
                      weight, _fold(mask, d_m, B), stride, padding, dilation, needs_input_grad)
            return _unfolded(outs, needed, B, _element_shape(input, d_in)[0])
        args = (grad_out, input, offset, weight, mask, stride, padding, dilation,
                needs_input_grad)
        return _stacked(_loop(op, B, args, in_dims), needed)

    return rule


def sampling_forward_rule(op, check):
    """The rule of ``op``, ``deformops::sample`` / ``deform_sample`` or a Function around it;
    ``check`` takes the (x, coords) shapes of one element."""

    def rule(info, in_dims, x, coords, order, mode, cval):
        B = info.batch_size
        d_x, d_c = in_dims[:2]
        check(_element_shape(x, d_x), _element_shape(coords, d_c))
        out = op(_fold(x, d_x, B), _fold(coords, d_c, B), order, mode, cval)
        return out.unflatten(0, (B, _element_shape(x, d_x)[0])), 0

    return rule


def sampling_backward_rule(op):
    """The rule of ``deformops::sample_backward`` and ``deformops::deform_sample_backward``
    (outputs: x and coordinate gradients, both per image)."""

    def rule(info, in_dims, grad_out, x, coords, order, mode, cval, needs_input_grad):
        B = info.batch_size
        d_go, d_x, d_c = in_dims[:3]
        outs = op(_fold(grad_out, d_go, B), _fold(x, d_x, B), _fold(coords, d_c, B), order,
                  mode, cval, needs_input_grad)
        return _unfolded(outs, tuple(bool(n) for n in needs_input_grad), B,
                         _element_shape(x, d_x)[0])

    return rule
