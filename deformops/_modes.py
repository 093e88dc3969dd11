"""Boundary modes and interpolation orders, named as in ``scipy.ndimage``.

The integer codes are what the kernels receive; they are private.
"""

import operator

CONSTANT = 0
GRID_CONSTANT = 1
NEAREST = 2
REFLECT = 3  # scipy's 'reflect' == 'grid-mirror' (half-sample symmetric)
MIRROR = 4  # whole-sample symmetric
WRAP = 5  # scipy's 'wrap': period n - 1, the end points overlap
GRID_WRAP = 6  # period n

MODES = {
    "constant": CONSTANT,
    "grid-constant": GRID_CONSTANT,
    "nearest": NEAREST,
    "reflect": REFLECT,
    "grid-mirror": REFLECT,
    "mirror": MIRROR,
    "wrap": WRAP,
    "grid-wrap": GRID_WRAP,
}

ORDERS = (0, 1)


def mode_code(mode):
    """Return the kernel code of a scipy mode name; ``TypeError`` for anything but a string,
    ``ValueError`` for an unknown name."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, one of {sorted(MODES)}, got "
                        f"{type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def check_order(order):
    """Validate an interpolation order: 0 (nearest) or 1 (bilinear)."""
    try:  # operator.index, not int(): a 0-d float array has __index__ and int() truncates it
        if isinstance(order, bool):
            raise TypeError
        order = operator.index(order)
    except TypeError:
        kind = type(order).__name__
        if getattr(order, "ndim", 0):
            kind += f" of shape {order.shape}"
        elif str(getattr(order, "dtype", kind)) != kind:
            kind += f" of dtype {order.dtype}"
        raise TypeError(f"order must be an integer, got {kind}") from None
    if order < 0 or order > 5:
        raise ValueError(f"order must be 0 or 1, got {order}")
    if order > 1:
        raise NotImplementedError(
            f"order={order} (spline interpolation) is not implemented; deformops supports order 0 and 1"
        )
    return order
