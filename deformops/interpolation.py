"""``map_coordinates``: a drop-in for ``scipy.ndimage.map_coordinates`` on 2-D inputs, order 0/1."""

import numpy as np

from . import _arrays
from ._modes import check_order, mode_code


def _as_array(obj, name):
    """``(array, device)``. Array-likes are accepted as scipy accepts them (as NumPy arrays, or
    ``None`` device when they are plain sequences); DLPack exporters are taken zero-copy."""
    if isinstance(obj, np.ndarray) or hasattr(obj, "__dlpack__") or _arrays._is_cupy(obj):
        return _arrays.as_array(obj, name)
    try:
        return np.asarray(obj), None
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be array-like: {err}") from None


def _output_array(output, shape, input_dtype, xp=np):
    """Resolve scipy's ``output`` argument: None, a dtype, or an array to fill."""
    if output is None:  # native byte order, as scipy returns
        out = xp.empty(shape, np.dtype(input_dtype).newbyteorder("="))
    elif isinstance(output, xp.ndarray):
        if output.shape != shape:
            raise ValueError(f"output must have shape {shape}; got {output.shape}")
        if not getattr(output.flags, "writeable", True):  # scipy's error; a read-only memmap
            raise ValueError("output array is read-only")
        out = output
    else:
        kind = "CuPy" if xp is not np else "NumPy"
        wrong = TypeError(f"output must be None, a dtype or a {kind} array; got "
                          f"{type(output).__name__}")
        # np.dtype() takes any object with a .dtype: another library's array would be ignored
        if not isinstance(output, (type, str, np.dtype)) and (
                hasattr(output, "shape") or hasattr(output, "__dlpack__")):
            raise wrong
        try:
            dtype = np.dtype(output)
        except (TypeError, ValueError):
            raise wrong from None
        out = xp.empty(shape, dtype)
    if out.dtype.kind not in "biuf" and out.dtype.name != "bfloat16":
        raise TypeError(f"output dtype must be real (bool, integer or floating); got {out.dtype}")
    return out


def _store(values, out, xp=np):
    """Cast float results into ``out`` with scipy's rules for integer and bool outputs."""
    kind = out.dtype.kind
    if kind == "b":  # truncated toward zero, then != 0: True from |v| >= 1, NaN False
        out[...] = xp.abs(values) >= 1.0
        return
    if kind in "iu":
        info = np.iinfo(out.dtype)
        if kind == "u":
            values = xp.where(values > 0, values + 0.5, 0.0)
        else:
            values = xp.where(values > 0, values + 0.5, values - 0.5)
        # int64/uint64 maxima round up to 2**63 / 2**64 as floats, which overflow the cast:
        # values from there on get the maximum itself (scipy's cast wraps around there)
        top = values >= float(info.max)
        with np.errstate(invalid="ignore"):
            cast = xp.clip(values, info.min, info.max).astype(out.dtype)
        out[...] = xp.where(top, out.dtype.type(info.max), cast)
        return
    out[...] = values.astype(out.dtype, copy=False)


def map_coordinates(input, coordinates, output=None, order=1, mode="constant", cval=0.0,
                    prefilter=True):
    """Sample a 2-D array at coordinates, as ``scipy.ndimage.map_coordinates`` does, for orders
    0 and 1. The default order is 1 (bilinear), not scipy's 3: a call without ``order`` that
    gave a cubic spline in scipy gives bilinear values here. An empty ``input`` with points to
    sample raises ``ValueError`` (scipy returns ``cval`` there).

    Parameters
    ----------
    input : array_like, (H, W)
        Real input. float32 with float32 coordinates is computed in float32; everything else
        in float64, as scipy does.
    coordinates : array_like, (2, ...)
        Row coordinates in ``coordinates[0]``, column coordinates in ``coordinates[1]``.
    output : None, dtype or ndarray of shape ``coordinates.shape[1:]``
        Where to store the result, as in scipy: integer outputs round half away from zero;
        values beyond the type's range clip to it (scipy's cast wraps around or is undefined
        there); bool outputs are True from |v| >= 1, False for NaN (scipy keeps the low
        byte of the truncated integer: False for 256.0 or Inf). A read-only array raises
        ``ValueError``; anything else array-like (another library's array) ``TypeError``.
    order : {0, 1}
        Spline orders 2-5 raise ``NotImplementedError``, other integers ``ValueError``.
    mode : str
        'constant', 'grid-constant', 'nearest', 'reflect' (= 'grid-mirror'), 'mirror', 'wrap'
        or 'grid-wrap'; scipy's quirks included ('constant' gives ``cval`` outside [0, n-1]
        without interpolation, 'wrap' has period n-1, order 0 rounds half up).
    cval : float
        Fill value of the constant modes and of non-finite coordinates.
    prefilter : bool
        Accepted for compatibility; no spline prefilter applies to order <= 1.

    Returns
    -------
    ndarray, shape ``coordinates.shape[1:]``
        The ``output`` array (the one given, or a new one).
    """
    order, code, cval = check_order(order), mode_code(mode), _arrays.check_cval(cval)
    image, dev_image = _as_array(input, "input")
    coords, dev_coords = _as_array(coordinates, "coordinates")
    device = dev_image or dev_coords or "cpu"
    if device == "cuda" and dev_image is None:  # a plain sequence next to a CUDA array:
        with _arrays.device_of(coords):  # on that array's GPU
            image = _arrays.xp_of(coords).asarray(image)
    if device == "cuda" and dev_coords is None:
        with _arrays.device_of(image):
            coords = _arrays.xp_of(image).asarray(coords)
    if {dev_image or device, dev_coords or device} != {device}:
        raise TypeError(f"input is on {dev_image} but coordinates on {dev_coords}; "
                        "NumPy and CuPy arrays cannot be mixed in one call")
    # output too: the kernel writes a direct output in place
    _arrays.check_one_gpu(input=image, coordinates=coords, output=output)
    backend = _arrays.backend(device) if device == "cuda" else None  # CUDA: fail early
    xp = _arrays.xp_of(image)
    if image.ndim != 2:
        raise ValueError(f"input must be 2-D (H, W); got shape {image.shape}")
    if coords.ndim < 1 or coords.shape[0] != 2:
        raise ValueError(f"coordinates must have shape (2, ...); got {coords.shape}")
    for name, a in (("input", image), ("coordinates", coords)):
        if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
            raise TypeError(f"{name} must be real-valued; got dtype {a.dtype}")
    with _arrays.device_of(image):  # a CuPy input's GPU: outputs and launches there
        shape = coords.shape[1:]
        out = _output_array(output, shape, image.dtype, xp)
        points = int(np.prod(shape))
        H, W = image.shape
        if points == 0:
            return out
        if H == 0 or W == 0:
            raise ValueError(f"input has an empty shape {image.shape}: there is nothing to sample")
        both32 = image.dtype == np.float32 and coords.dtype == np.float32
        dtype = np.float32 if both32 else np.float64
        x_k = xp.ascontiguousarray(image, dtype).reshape(1, 1, H, W)
        coords_k = xp.ascontiguousarray(coords, dtype).reshape(1, 2, 1, points)
        direct = out.dtype == dtype and out.flags.c_contiguous
        result = out.reshape(1, 1, 1, points) if direct else xp.empty((1, 1, 1, points), dtype)
        backend = backend or _arrays.backend("cpu")
        backend.sample_forward(x_k, coords_k, result, order, code, cval, False, False)
        if not direct:
            _store(result.reshape(shape), out, xp)
        return out
