"""The deterministic-gradient switch of the CUDA backend (no CuPy import)."""

import contextlib
import os
import threading

_state = threading.local()


def _default():
    value = os.environ.get("DEFORMOPS_DETERMINISTIC", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def is_deterministic():
    """True when CUDA input gradients are computed by ordered gathers (bit-identical runs)."""
    value = getattr(_state, "value", None)
    return _default() if value is None else value


def set_deterministic(flag=True):
    """Choose ordered gathers (``True``) or ``atomicAdd`` scatters (``False``, the default) for
    the input gradients on CUDA, for the calling thread. ``None`` returns to the environment
    variable ``DEFORMOPS_DETERMINISTIC``. Returns the previous setting."""
    previous = getattr(_state, "value", None)
    _state.value = None if flag is None else bool(flag)
    return previous


@contextlib.contextmanager
def deterministic(flag=True):
    """Context manager form of :func:`set_deterministic`."""
    previous = set_deterministic(flag)
    try:
        yield
    finally:
        _state.value = previous
