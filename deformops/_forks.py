"""Processes forked from one whose Numba thread team runs on GNU OpenMP (no Numba import).

GNU OpenMP, Numba's default threading layer on Linux, cannot run a parallel region in a child
forked from a process that has started it: Numba terminates such a child at its first parallel
launch, whatever started the team (deformops, or any other ``parallel=True`` code). The hook is
registered when ``deformops`` is imported, before any kernel, so that a child forked from a
parent that only ran other Numba code is seen too. The CPU backend runs serially where
:func:`forked_from_gnu_openmp` (``deformops.backends.cpu._threads``).
"""

import os
import sys

_forked_from_gnu_openmp = False


def _gnu_openmp_started():
    """Whether this process has started Numba's thread team on GNU OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:  # Numba never imported: no team
        return False
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run: no team yet
        return False
    if layer != "omp":
        return False
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    # the vendor is unknown only if Numba's layout changed: assume the unsafe one
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child():
    global _forked_from_gnu_openmp
    _forked_from_gnu_openmp = _forked_from_gnu_openmp or _gnu_openmp_started()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_from_gnu_openmp():
    """True in a process forked (at any depth) from one that had started GNU OpenMP."""
    return _forked_from_gnu_openmp
