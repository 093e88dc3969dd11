"""The deterministic-gradient switch of the CUDA backend (no CuPy import).

Process-wide, not per thread: frameworks run backward passes on threads of their own (torch's
autograd engine runs CUDA nodes on a per-device thread, TF its graph nodes on its executor's),
where a per-thread setting of the thread that called ``loss.backward()`` would not be seen.
Adapters may register their framework's own switch (:func:`register_framework_switch`), e.g.
``torch.are_deterministic_algorithms_enabled``.
"""

import contextlib
import os
import threading

_lock = threading.Lock()
_value = None  # None: the environment variable decides
_framework_switches = []


def _default():
    value = os.environ.get("DEFORMOPS_DETERMINISTIC", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def register_framework_switch(switch):
    """Also compute deterministic gradients whenever ``switch()`` returns True (a framework's
    own setting, such as ``torch.are_deterministic_algorithms_enabled``)."""
    with _lock:
        if switch not in _framework_switches:
            _framework_switches.append(switch)


def is_deterministic():
    """True when CUDA input gradients are computed by ordered gathers (bit-identical runs): set
    by :func:`set_deterministic`, else by ``DEFORMOPS_DETERMINISTIC``, or asked for by a
    registered framework switch."""
    own = _default() if _value is None else _value
    return own or any(switch() for switch in _framework_switches)


def set_deterministic(flag=True):
    """Choose ordered gathers (``True``) or ``atomicAdd`` scatters (``False``, the default) for
    the input gradients on CUDA, for the whole process (every thread). ``None`` returns to the
    environment variable ``DEFORMOPS_DETERMINISTIC``. Returns the previous setting."""
    global _value
    with _lock:
        previous, _value = _value, None if flag is None else bool(flag)
    return previous


@contextlib.contextmanager
def deterministic(flag=True):
    """Context manager form of :func:`set_deterministic` (the previous setting is restored).
    The setting is process-wide: threads entering such blocks at once restore each other's
    settings; from several threads, call :func:`set_deterministic` once instead."""
    previous = set_deterministic(flag)
    try:
        yield
    finally:
        set_deterministic(previous)
