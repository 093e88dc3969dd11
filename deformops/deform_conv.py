"""Deformable convolution v1 (``mask=None``) and v2 (``mask`` given), torchvision semantics.

Shapes (K = kh * kw taps, G offset groups, ``groups`` conv groups):

=========  ========================  ========================
array      layout="NCHW"             layout="NHWC"
=========  ========================  ========================
x          (N, Cin, H, W)            (N, H, W, Cin)
offset     (N, 2*G*K, Ho, Wo)        (N, Ho, Wo, 2*G*K)
mask       (N, G*K, Ho, Wo)          (N, Ho, Wo, G*K)
weight     (Cout, Cin/groups, kh, kw) in both layouts
bias       (Cout,)
output     (N, Cout, Ho, Wo)         (N, Ho, Wo, Cout)
=========  ========================  ========================

Offset channel of group g, tap (i, j), k = i*kw + j: ``g*2*K + 2*k`` is Δy and ``+1`` is Δx;
mask channel ``g*K + k`` (torchvision and mmcv order). ``groups = Cin // weight.shape[1]`` and
``G = offset.shape[1] // (2*K)`` are inferred. ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h
+ 1`` (likewise Wo). Output (oy, ox), tap (i, j) samples
``y = oy*stride_h - pad_h + i*dil_h + Δy``, ``x = ox*stride_w - pad_w + j*dil_w + Δx`` with the
zero-padding bilinear rule (0 if y <= -1, y >= H, x <= -1 or x >= W, else bilinear with outside
corners 0), and ``out[n, o] = Σ_{c,i,j} weight[o, c, i, j] * mask * sample + bias[o]``.
"""

import operator
from typing import NamedTuple, Optional

import numpy as np

from . import _arrays

INT32_MAX = 2**31 - 1


class DeformConv2dGrads(NamedTuple):
    """Gradients of :func:`deform_conv2d`; an entry is None when not requested (or no input)."""

    grad_input: Optional[object]
    grad_offset: Optional[object]
    grad_weight: Optional[object]
    grad_mask: Optional[object]
    grad_bias: Optional[object]


def _pair(value, name, minimum):
    """An int or a pair of ints, each >= minimum (ValueError / TypeError naming ``name``)."""
    try:
        pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
        if any(isinstance(v, bool) for v in pair):  # an int to operator.index, a flag to a user
            raise TypeError
        pair = tuple(operator.index(v) for v in pair)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > INT32_MAX:  # the CUDA kernels take them as 32-bit ints
        raise ValueError(f"{name} must be <= {INT32_MAX}, got {value!r}")
    return pair


def check_shapes(x_shape, offset_shape, weight_shape, bias_shape, mask_shape, stride, padding,
                 dilation, nhwc=False, x_name="x"):
    """Check the shapes of a ``deform_conv2d`` call, given as (N, Cin, H, W), (N, 2*G*K, Ho, Wo),
    (Cout, Cin/groups, kh, kw), (Cout,) and (N, G*K, Ho, Wo) whatever the layout (``nhwc`` only
    words the messages; bias and mask None when absent), and stride, padding and dilation (ints
    or pairs): a ``ValueError`` naming the argument (the input as ``x_name``, e.g. torch's
    ``input``). Returns (N, Cout, Ho, Wo, G, K).

    Shapes only, so that frameworks can check symbolic shapes before any data exists (torch's
    fake kernels); the functions below call it too."""
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    x_doc = "(N, H, W, Cin)" if nhwc else "(N, Cin, H, W)"
    o_doc = "(N, Ho, Wo, 2*G*K)" if nhwc else "(N, 2*G*K, Ho, Wo)"
    m_doc = "(N, Ho, Wo, G*K)" if nhwc else "(N, G*K, Ho, Wo)"
    for shape, name, ndim, doc in ((x_shape, x_name, 4, x_doc),
                                   (offset_shape, "offset", 4, o_doc),
                                   (weight_shape, "weight", 4, "(Cout, Cin/groups, kh, kw)"),
                                   (mask_shape, "mask", 4, m_doc),
                                   (bias_shape, "bias", 1, "(Cout,)")):
        if shape is not None and len(shape) != ndim:
            raise ValueError(f"{name} must be {ndim}-D {doc}; got shape {tuple(shape)}")
    N, Cin, H, W = x_shape
    Cout, cpg_w, kh, kw = weight_shape
    K = kh * kw
    if cpg_w == 0 or kh == 0 or kw == 0:
        raise ValueError("weight must have non-empty (Cin/groups, kh, kw); got shape "
                         f"{tuple(weight_shape)}")
    if (H == 0 or W == 0) and N * Cin:
        raise ValueError(f"{x_name} has an empty spatial size {(H, W)}: there is nothing to "
                         "sample")
    if Cin == 0:
        raise ValueError(f"{x_name} must have at least one channel (Cin = 0)")
    if Cin % cpg_w:
        raise ValueError(f"{x_name} has {Cin} channels, not a multiple of weight.shape[1] = "
                         f"{cpg_w}")
    groups = Cin // cpg_w
    if groups == 0 or Cout % groups:
        raise ValueError(f"weight has {Cout} output channels, not divisible by groups = {groups} "
                         f"(= Cin {Cin} // weight.shape[1] {cpg_w})")
    if bias_shape is not None and tuple(bias_shape) != (Cout,):
        raise ValueError(f"bias must have shape ({Cout},); got {tuple(bias_shape)}")
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"the kernel ({kh}, {kw}) with dilation {dilation} is larger than the padded input "
            f"({H + 2 * padding[0]}, {W + 2 * padding[1]}): the output would be empty"
        )
    G2K = offset_shape[1]
    if offset_shape[0] != N or G2K == 0 or G2K % (2 * K) or Cin % (G2K // (2 * K)):
        raise ValueError(
            f"offset must have 2*G*K channels for K = {K} taps and G offset groups dividing "
            f"Cin = {Cin}, batch {N} and spatial size {(Ho, Wo)}; got shape "
            f"{_given(offset_shape, nhwc)}"
        )
    if tuple(offset_shape[2:]) != (Ho, Wo):
        raise ValueError(f"offset must have the output's spatial size {(Ho, Wo)}; "
                         f"got shape {_given(offset_shape, nhwc)}")
    G = G2K // (2 * K)
    if mask_shape is not None and tuple(mask_shape) != (N, G * K, Ho, Wo):
        want = (N, G * K, Ho, Wo) if not nhwc else (N, Ho, Wo, G * K)
        raise ValueError(f"mask must have shape {want} (G*K = {G * K} channels); "
                         f"got {_given(mask_shape, nhwc)}")
    return N, Cout, Ho, Wo, G, K


def _given(shape, nhwc):
    """An NCHW-indexed shape as the caller gave it (NHWC when ``nhwc``), a tuple."""
    shape = tuple(shape)
    return (shape[0], shape[2], shape[3], shape[1]) if nhwc else shape


def _prepare(x, offset, weight, bias, mask, stride, padding, dilation, layout, grad_out=None,
             backward=False, x_name="x"):
    """Validate and convert to contiguous arrays for the backend: NCHW, or NHWC as given
    (``native``) for a backend whose kernels read NHWC (offset and mask then (N, Ho*Wo, .)).
    Messages name the input ``x_name`` (an adapter's name for it, such as torch's ``input``)."""
    layout = _arrays.check_layout(layout)
    arrays, device = _arrays.as_arrays(
        optional=("bias", "mask") + (() if backward else ("grad_out",)),
        **{x_name: x}, offset=offset, weight=weight, bias=bias, mask=mask, grad_out=grad_out,
    )
    x, offset, weight = arrays[x_name], arrays["offset"], arrays["weight"]
    bias, mask, grad_out = arrays["bias"], arrays["mask"], arrays["grad_out"]
    backend = _arrays.backend(device)
    nhwc = layout == "NHWC"
    _arrays.check_ndim(x, x_name, 4, "(N, H, W, Cin)" if nhwc else "(N, Cin, H, W)")
    _arrays.check_ndim(offset, "offset", 4, "(N, Ho, Wo, 2*G*K)" if nhwc else "(N, 2*G*K, Ho, Wo)")
    _arrays.check_ndim(weight, "weight", 4, "(Cout, Cin/groups, kh, kw)")
    if mask is not None:
        _arrays.check_ndim(mask, "mask", 4, "(N, Ho, Wo, G*K)" if nhwc else "(N, G*K, Ho, Wo)")
    if bias is not None:
        _arrays.check_ndim(bias, "bias", 1, "(Cout,)")
    if backward:
        _arrays.check_ndim(grad_out, "grad_out", 4,
                           "(N, Ho, Wo, Cout)" if nhwc else "(N, Cout, Ho, Wo)")
    _arrays.check_dtypes({x_name: x, "offset": offset, "weight": weight, "bias": bias,
                          "mask": mask, "grad_out": grad_out}, device=device)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    # Kernels that read NHWC as it is get NHWC arrays: for layout NHWC, and for NCHW views of
    # channels-last memory (whose results are then NCHW views of NHWC arrays, as the sampling
    # ops give).
    native = getattr(backend, "NATIVE_NHWC", False) and (nhwc or _arrays.is_channels_last(x))
    if nhwc:
        x, offset = x.transpose(0, 3, 1, 2), offset.transpose(0, 3, 1, 2)
        mask = None if mask is None else mask.transpose(0, 3, 1, 2)
        grad_out = None if grad_out is None else grad_out.transpose(0, 3, 1, 2)
    N, Cout, Ho, Wo, G, K = check_shapes(
        x.shape, offset.shape, weight.shape, None if bias is None else bias.shape,
        None if mask is None else mask.shape, stride, padding, dilation, nhwc, x_name)
    G2K = 2 * G * K
    if grad_out is not None and grad_out.shape != (N, Cout, Ho, Wo):
        want = (N, Cout, Ho, Wo) if not nhwc else (N, Ho, Wo, Cout)
        raise ValueError(f"grad_out must have the output's shape {want}; got {_given(grad_out.shape, nhwc)}")
    c = _arrays.xp_of(x).ascontiguousarray
    if native:
        # the NCHW-indexed arrays checked above, back as NHWC views (the given arrays for NHWC)
        x, offset, mask, grad_out = (None if a is None else a.transpose(0, 2, 3, 1)
                                     for a in (x, offset, mask, grad_out))
        shape, mask_shape = (N, Ho * Wo, G2K), (N, Ho * Wo, G * K)
    else:
        shape, mask_shape = (N, G2K, Ho * Wo), (N, G * K, Ho * Wo)
    return dict(
        backend=backend, x=c(x), weight=c(weight), bias=bias, layout=layout, native=native,
        offset=c(offset).reshape(shape),
        mask=None if mask is None else c(mask).reshape(mask_shape),
        grad_out=None if grad_out is None else c(grad_out),
        stride=stride, padding=padding, dilation=dilation, out_shape=(N, Cout, Ho, Wo),
    )


def _to_layout(a, layout):
    return a.transpose(0, 2, 3, 1) if layout == "NHWC" else a


def deform_conv2d(x, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None,
                  layout="NCHW"):
    """Deformable convolution (DCNv1 without ``mask``, DCNv2 with it), as
    ``torchvision.ops.deform_conv2d``.

    Parameters
    ----------
    x : array, (N, Cin, H, W) or (N, H, W, Cin)
        Input, float32 or float64.
    offset : array, (N, 2*G*K, Ho, Wo) or (N, Ho, Wo, 2*G*K)
        Per-tap (Δy, Δx) in pixels: channel ``g*2*K + 2*k`` is Δy of group g, tap
        k = i*kw + j, and ``+1`` is Δx. G offset groups split Cin into contiguous blocks.
    weight : array, (Cout, Cin/groups, kh, kw)
        Convolution filters; ``groups = Cin // weight.shape[1]``.
    bias : array, (Cout,), optional
    stride, padding, dilation : int or (int, int)
        As in ``torch.nn.functional.conv2d``; padding is explicit zero padding.
    mask : array, (N, G*K, Ho, Wo) or (N, Ho, Wo, G*K), optional
        Modulation of each sample (DCNv2), channel ``g*K + k``.
    layout : {'NCHW', 'NHWC'}
        Layout of x, offset, mask and the output (weight is (Cout, Cin/groups, kh, kw) in both).

    Returns
    -------
    out : array, (N, Cout, Ho, Wo) or (N, Ho, Wo, Cout)
        ``Ho = (H + 2*pad_h - dil_h*(kh-1) - 1) // stride_h + 1``, likewise Wo.

    Notes
    -----
    Samples outside the image follow the zero-padding rule of torchvision, mmcv and DCNv3/v4:
    0 when ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W``, else bilinear with outside
    corners 0 (``mode='grid-constant', cval=0`` of :func:`deformops.sample`). The CPU kernel
    builds im2col columns tile by tile (never for the whole batch) and multiplies them with BLAS;
    its workspace is bounded independently of N (see ``deformops.backends.cpu.deform_conv``).
    The CPU kernels read and write NHWC as it is, also for NCHW views of channels-last memory
    (the result is then an NCHW view of channels-last memory too); the CUDA backend converts
    NHWC to NCHW once per call.
    """
    return _forward(x, offset, weight, bias, stride, padding, dilation, mask, layout)


def _forward(x, offset, weight, bias, stride, padding, dilation, mask, layout, x_name="x"):
    """:func:`deform_conv2d`, its messages naming the input ``x_name`` (for the adapters)."""
    a = _prepare(x, offset, weight, bias, mask, stride, padding, dilation, layout,
                 x_name=x_name)
    native = a["native"]
    with _arrays.device_of(a["x"]):
        shape = _given(a["out_shape"], native)
        out = _arrays.empty(_arrays.xp_of(a["x"]), shape, a["x"].dtype)
        if out.size:
            a["backend"].deform_conv2d_forward(a["x"], a["offset"], a["weight"], a["bias"],
                                               a["mask"], a["stride"], a["padding"],
                                               a["dilation"], out,
                                               **({"channels_last": True} if native else {}))
    if native:
        return out if a["layout"] == "NHWC" else out.transpose(0, 3, 1, 2)
    return _to_layout(out, a["layout"])


def deform_conv2d_backward(grad_out, x, offset, weight, *, stride=1, padding=0, dilation=1,
                           mask=None, layout="NCHW",
                           needs_input_grad=(True, True, True, True, True)):
    """Gradients of :func:`deform_conv2d`.

    Parameters
    ----------
    grad_out : array, the output's shape
        Gradient of the loss with respect to the output.
    x, offset, weight, stride, padding, dilation, mask, layout
        As given to :func:`deform_conv2d` (the bias value is not needed).
    needs_input_grad : 5 bools
        Which of (input, offset, weight, mask, bias) to compute.

    Returns
    -------
    DeformConv2dGrads
        ``(grad_input, grad_offset, grad_weight, grad_mask, grad_bias)`` with the shapes of
        the inputs (grad_bias (Cout,)); None where not requested, and grad_mask None when
        ``mask`` is None. The offset gradient is the derivative of the bilinear interpolant
        of each sample's cell from its four corners (right-hand at integer positions, also at
        -1: torchvision's convention), times the mask.
    """
    return _backward(grad_out, x, offset, weight, stride, padding, dilation, mask, layout,
                     needs_input_grad)


def _backward(grad_out, x, offset, weight, stride, padding, dilation, mask, layout,
              needs_input_grad, x_name="x"):
    """:func:`deform_conv2d_backward`, its messages naming the input ``x_name``."""
    need = _arrays.check_needs(needs_input_grad, 5)
    a = _prepare(x, offset, weight, None, mask, stride, padding, dilation, layout,
                 grad_out=grad_out, backward=True, x_name=x_name)
    xk, off, wk, mk, go = a["x"], a["offset"], a["weight"], a["mask"], a["grad_out"]
    native = a["native"]
    with _arrays.device_of(xk):
        xp = _arrays.xp_of(xk)
        grad_x = _arrays.empty_like(xp, xk) if need[0] else None
        grad_offset = _arrays.empty_like(xp, off) if need[1] else None
        grad_weight = _arrays.empty_like(xp, wk) if need[2] else None
        grad_mask = _arrays.empty_like(xp, mk) if need[3] and mk is not None else None
        grad_bias = None
        if need[4] and go.dtype.itemsize < 4:  # half types (CUDA): accumulate in float32
            grad_bias = go.sum(axis=(0, 2, 3), dtype=np.float32).astype(go.dtype)
        elif need[4]:
            grad_bias = go.sum(axis=(0, 1, 2) if native else (0, 2, 3))
        if go.size and any(g is not None for g in (grad_x, grad_offset, grad_weight, grad_mask)):
            a["backend"].deform_conv2d_backward(go, xk, off, wk, mk, a["stride"], a["padding"],
                                                a["dilation"], grad_x, grad_offset, grad_weight,
                                                grad_mask,
                                                **({"channels_last": True} if native else {}))
        else:
            for g in (grad_x, grad_offset, grad_weight, grad_mask):
                if g is not None:
                    g[...] = 0
    N, _, Ho, Wo = a["out_shape"]
    if native:  # NHWC; offset and mask gradients (N, Ho*Wo, .); NCHW views for layout NCHW
        back = (lambda g: g) if a["layout"] == "NHWC" else (lambda g: g.transpose(0, 3, 1, 2))
        return DeformConv2dGrads(
            None if grad_x is None else back(grad_x),
            None if grad_offset is None else back(grad_offset.reshape(N, Ho, Wo, off.shape[2])),
            grad_weight,
            None if grad_mask is None else back(grad_mask.reshape(N, Ho, Wo, mk.shape[2])),
            grad_bias,
        )
    layout = a["layout"]
    return DeformConv2dGrads(
        None if grad_x is None else _to_layout(grad_x, layout),
        None if grad_offset is None else _to_layout(grad_offset.reshape(off.shape[:2] + (Ho, Wo)), layout),
        grad_weight,
        None if grad_mask is None else _to_layout(grad_mask.reshape(mk.shape[:2] + (Ho, Wo)), layout),
        grad_bias,
    )
