"""Batched sampling at absolute coordinates (``sample``) and at offsets from the regular grid
(``deform_sample``), with their gradients.

Shapes (G offset groups; group g covers channels ``[g*C/G, (g+1)*C/G)``):

======================  ===================  ===================
array                   layout="NCHW"        layout="NHWC"
======================  ===================  ===================
x                       (N, C, H, W)         (N, H, W, C)
coords / offset         (N, 2G, Ho, Wo)      (N, Ho, Wo, 2G)
output, grad_out        (N, C, Ho, Wo)       (N, Ho, Wo, C)
======================  ===================  ===================

Channel ``2g`` of ``coords`` is y (row) and ``2g + 1`` is x (column), in pixels.
"""

from typing import NamedTuple, Optional

from . import _arrays
from ._modes import check_order, mode_code


class SampleGrads(NamedTuple):
    """Gradients of :func:`sample`; an entry is None when it was not requested."""

    grad_input: Optional[object]
    grad_coords: Optional[object]


class DeformSampleGrads(NamedTuple):
    """Gradients of :func:`deform_sample`; an entry is None when it was not requested."""

    grad_input: Optional[object]
    grad_offset: Optional[object]


_SEMANTICS = """
    Sampling is identical to ``scipy.ndimage.map_coordinates`` applied to every (n, c) plane
    with the same ``order``, ``mode`` and ``cval`` (no spline prefilter is involved for
    order <= 1), including scipy's surprises: 'constant' returns ``cval`` for any point outside
    [0, n-1] (no interpolation toward cval, unlike 'grid-constant'), 'wrap' has period n-1 (its
    end points overlap), and order 0 rounds half up. Non-finite coordinates give ``cval`` in
    every mode. The default 'grid-constant' with ``cval=0`` is the zero-padding rule of
    torchvision's deform_conv2d.
"""


def check_shapes(x_shape, coords_shape, coords_name="coords", relative=False):
    """Check the shapes of a sampling call, as (N, C, H, W) and (N, 2G, Ho, Wo) whatever the
    layout (a ``ValueError`` naming the argument); the output's (N, C, Ho, Wo).

    Shapes only, so that frameworks can check symbolic shapes before any data exists (torch's
    fake kernels); the functions below call it too."""
    for shape, name, doc in ((x_shape, "x", "(N, C, H, W)"),
                             (coords_shape, coords_name, "(N, 2G, Ho, Wo)")):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D {doc}; got shape {tuple(shape)}")
    N, C, H, W = x_shape
    N2, G2, Ho, Wo = coords_shape
    if N2 != N:
        raise ValueError(f"{coords_name} has batch size {N2} but x has {N}")
    if G2 < 2 or G2 % 2:
        raise ValueError(
            f"{coords_name} must have 2G channels (a (y, x) pair per offset group); got {G2}"
        )
    G = G2 // 2
    if C % G:
        raise ValueError(f"x has {C} channels, which {G} offset groups of {coords_name} do not divide")
    if relative and (Ho, Wo) != (H, W):
        raise ValueError(
            f"{coords_name} must have the spatial size of x, {(H, W)}; got {(Ho, Wo)}"
        )
    if (H == 0 or W == 0) and N * C * Ho * Wo:
        raise ValueError(f"x has an empty spatial size {(H, W)}: there is nothing to sample")
    return N, C, Ho, Wo


def _prepare(x, coords, layout, coords_name, relative, backward=False, grad_out=None):
    """Validate, choose the kernel memory order, return what the backend needs."""
    layout = _arrays.check_layout(layout)
    arrays, device = _arrays.as_arrays(
        optional=() if backward else ("grad_out",),
        **{"x": x, coords_name: coords, "grad_out": grad_out},
    )
    x, coords, grad_out = arrays["x"], arrays[coords_name], arrays["grad_out"]
    backend = _arrays.backend(device)
    doc_x = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    doc_c = "(N, 2G, Ho, Wo)" if layout == "NCHW" else "(N, Ho, Wo, 2G)"
    _arrays.check_ndim(x, "x", 4, doc_x)
    _arrays.check_ndim(coords, coords_name, 4, doc_c)
    if backward:
        _arrays.check_ndim(grad_out, "grad_out", 4, doc_x.replace("H, W", "Ho, Wo"))
    _arrays.check_dtypes({"x": x, coords_name: coords, "grad_out": grad_out}, device=device)
    if layout == "NHWC":  # from here on every array is indexed NCHW
        x, coords = x.transpose(0, 3, 1, 2), coords.transpose(0, 3, 1, 2)
        grad_out = None if grad_out is None else grad_out.transpose(0, 3, 1, 2)
    N, C, Ho, Wo = check_shapes(x.shape, coords.shape, coords_name, relative)
    if grad_out is not None and grad_out.shape != (N, C, Ho, Wo):
        want = (N, C, Ho, Wo) if layout == "NCHW" else (N, Ho, Wo, C)
        got = grad_out.shape if layout == "NCHW" else grad_out.transpose(0, 2, 3, 1).shape
        raise ValueError(f"grad_out must have the output's shape {want}; got {tuple(got)}")
    # A view that is channels-last in memory runs the NHWC kernel without a copy.
    channels_last = _arrays.is_channels_last(x) or (
        layout == "NHWC" and not x.flags.c_contiguous
    )
    to_k = _arrays.to_kernel_order
    x_k, coords_k = to_k(x, channels_last), to_k(coords, channels_last)
    grad_out_k = None if grad_out is None else to_k(grad_out, channels_last)
    return backend, x_k, coords_k, grad_out_k, channels_last, layout


def _from_kernel_order(a_k, channels_last, layout):
    """The kernel's (N, C, H, W) or (N, H, W, C) memory, as a view in the caller's layout."""
    nchw = a_k.transpose(0, 3, 1, 2) if channels_last else a_k
    return nchw.transpose(0, 2, 3, 1) if layout == "NHWC" else nchw


def _forward(x, coords, order, mode, cval, layout, coords_name, relative):
    order, mode, cval = check_order(order), mode_code(mode), _arrays.check_cval(cval)
    backend, x_k, coords_k, _, cl, layout = _prepare(x, coords, layout, coords_name, relative)
    xp = _arrays.xp_of(x_k)
    if cl:
        N, H, W, C = x_k.shape
        Ho, Wo = coords_k.shape[1:3]
        shape = (N, Ho, Wo, C)
    else:
        N, C = x_k.shape[:2]
        Ho, Wo = coords_k.shape[2:]
        shape = (N, C, Ho, Wo)
    with _arrays.device_of(x_k):
        out = _arrays.empty(xp, shape, x_k.dtype)
        backend.sample_forward(x_k, coords_k, out, order, mode, cval, relative, cl)
    return _from_kernel_order(out, cl, layout)


def _backward(grad_out, x, coords, order, mode, cval, layout, needs_input_grad, coords_name,
              relative):
    order, mode, cval = check_order(order), mode_code(mode), _arrays.check_cval(cval)
    need_x, need_coords = _arrays.check_needs(needs_input_grad, 2)
    backend, x_k, coords_k, go_k, cl, layout = _prepare(
        x, coords, layout, coords_name, relative, backward=True, grad_out=grad_out
    )
    xp = _arrays.xp_of(x_k)
    with _arrays.device_of(x_k):
        grad_x = _arrays.empty_like(xp, x_k) if need_x else None
        grad_coords = _arrays.empty_like(xp, coords_k) if need_coords else None
        # order 0 is piecewise constant: its coordinate gradient is 0, whatever the pixels
        # (the kernels' sums would make 0 * Inf = NaN of a non-finite one)
        ask = None if order == 0 else grad_coords
        if grad_coords is not None and ask is None:
            grad_coords[...] = 0
        if grad_x is not None or ask is not None:
            backend.sample_backward(go_k, x_k, coords_k, grad_x, ask, order, mode, cval,
                                    relative, cl)
    return (
        None if grad_x is None else _from_kernel_order(grad_x, cl, layout),
        None if grad_coords is None else _from_kernel_order(grad_coords, cl, layout),
    )


def sample(x, coords, *, order=1, mode="grid-constant", cval=0.0, layout="NCHW"):
    """Sample every channel of ``x`` at absolute pixel coordinates.

    ``out[n, c, i, j] = interp(x[n, c], coords[n, 2g, i, j], coords[n, 2g + 1, i, j])`` for
    channel c in offset group g (NCHW shown; NHWC moves the channel axis last).

    Parameters
    ----------
    x : array, (N, C, H, W) or (N, H, W, C)
        Input, float32 or float64 (NumPy or any CPU ``__dlpack__`` exporter).
    coords : array, (N, 2G, Ho, Wo) or (N, Ho, Wo, 2G)
        Sample points in pixels, (y, x) pairs per group; same dtype as ``x``.
    order : {0, 1}
        0 nearest (rounds half up, as scipy), 1 bilinear.
    mode : str
        'constant', 'grid-constant', 'nearest', 'reflect' (= 'grid-mirror'), 'mirror', 'wrap'
        or 'grid-wrap', exactly as in ``scipy.ndimage``.
    cval : float
        Value outside the image for the constant modes and for non-finite coordinates.
    layout : {'NCHW', 'NHWC'}

    Returns
    -------
    out : array, (N, C, Ho, Wo) or (N, Ho, Wo, C)
        Same dtype as ``x``. When ``x`` is channels-last in memory, ``out`` is too.

    Notes
    -----""" + _SEMANTICS
    return _forward(x, coords, order, mode, cval, layout, "coords", relative=False)


def sample_backward(grad_out, x, coords, *, order=1, mode="grid-constant", cval=0.0,
                    layout="NCHW", needs_input_grad=(True, True)):
    """Gradients of :func:`sample` with respect to ``x`` and ``coords``.

    Parameters
    ----------
    grad_out : array, (N, C, Ho, Wo) or (N, Ho, Wo, C)
        Gradient of the loss with respect to the output of :func:`sample`.
    x, coords, order, mode, cval, layout
        As given to :func:`sample`.
    needs_input_grad : (bool, bool)
        Which of (grad_input, grad_coords) to compute.

    Returns
    -------
    SampleGrads
        ``grad_input`` (shape of ``x``): the exact adjoint of the forward, a scatter of the
        same weights. ``grad_coords`` (shape of ``coords``): per point, the sum over the
        group's channels of ``grad_out`` times the derivative of the bilinear interpolant of
        the cell ``[floor(y), floor(y)+1] x [floor(x), floor(x)+1]`` (right-hand at integer
        coordinates), from the four corner values the forward used, times the sign of the
        mode's coordinate mapping (-1 on mirrored segments, where an integer point takes the
        cell on the other side of its mirrored pixel: the derivative stays right-hand). Zero for ``order=0``, non-finite
        coordinates and points whose output is ``cval`` without interpolation.
    """
    grads = _backward(grad_out, x, coords, order, mode, cval, layout, needs_input_grad,
                      "coords", relative=False)
    return SampleGrads(*grads)


def deform_sample(x, offset, *, order=1, mode="grid-constant", cval=0.0, layout="NCHW"):
    """Sample every channel of ``x`` at offsets from its own pixel grid.

    Output (i, j) of channel c in offset group g samples ``x[n, c]`` at
    ``(i + offset[n, 2g, i, j], j + offset[n, 2g + 1, i, j])`` (NCHW shown). With a zero
    offset the output equals ``x``.

    Parameters
    ----------
    x : array, (N, C, H, W) or (N, H, W, C)
        Input, float32 or float64.
    offset : array, (N, 2G, H, W) or (N, H, W, 2G)
        (dy, dx) pairs per offset group, in pixels; same dtype as ``x``.
    order, mode, cval, layout
        As for :func:`sample`.

    Returns
    -------
    out : array, the shape of ``x``

    Notes
    -----""" + _SEMANTICS
    return _forward(x, offset, order, mode, cval, layout, "offset", relative=True)


def deform_sample_backward(grad_out, x, offset, *, order=1, mode="grid-constant", cval=0.0,
                           layout="NCHW", needs_input_grad=(True, True)):
    """Gradients of :func:`deform_sample` with respect to ``x`` and ``offset``.

    The offset gradient equals the coordinate gradient of :func:`sample_backward` at
    ``grid + offset``; at a zero offset it is the right-hand difference of the image, never
    the zero that ceil-based corner sampling gives.

    Returns
    -------
    DeformSampleGrads
        ``grad_input`` (shape of ``x``) and ``grad_offset`` (shape of ``offset``), None where
        not requested.
    """
    grads = _backward(grad_out, x, offset, order, mode, cval, layout, needs_input_grad,
                      "offset", relative=True)
    return DeformSampleGrads(*grads)
