"""Numba's thread team, and the processes forked from one that cannot use it.

Numba's default threading layer on Linux is GNU OpenMP, which cannot run a parallel region in
a process forked from one that has used it: Numba terminates such a child (SIGTERM) at its
first parallel launch, whatever its thread count. A torch ``DataLoader`` worker or a
``multiprocessing`` fork-pool worker that calls deformops after the parent did would die.

So every parallel kernel of this backend is a :class:`ParallelKernel`: in such a child it runs
its serial twin (the same function compiled without ``parallel``, its ``prange`` loops plain
loops), on one thread, with the same results (the kernels' sums do not depend on the thread
count). Children of other threading layers (TBB, workqueue, Intel OpenMP, all fork-safe) and
of parents that never ran a parallel region keep Numba's team. The fork hook lives in
``deformops._forks`` (imported with ``deformops``, before Numba).
"""

import functools
import types

import numba
from numba import njit

from ..._forks import forked_from_gnu_openmp


def count():
    """Threads the kernels run on: Numba's (``numba.get_num_threads()``), 1 where serial."""
    return 1 if forked_from_gnu_openmp() else numba.get_num_threads()


class limit:  # noqa: N801 (used as a function: ``with limit_threads(n):``)
    """Within the block, the kernels that this thread calls run on at most ``n`` threads (None:
    no limit). Numba's thread count belongs to the calling thread: other threads keep theirs,
    and this one gets its own back afterwards. The adapters follow their framework's setting
    with it (``torch.set_num_threads``, TF's intra-op threads), at every call: where ``n`` is at
    least Numba's team size, entering costs one comparison."""

    __slots__ = ("_n", "_have")

    def __init__(self, n):
        self._n, self._have = n, None

    def __enter__(self):
        n = self._n
        if n is not None and n < numba.config.NUMBA_NUM_THREADS:
            have = numba.get_num_threads()
            if n < have:
                numba.set_num_threads(max(1, n))
                self._have = have
        return self

    def __exit__(self, *exc):
        if self._have is not None:
            numba.set_num_threads(self._have)
            self._have = None


class ParallelKernel:
    """``njit(parallel=True, **options)(fn)`` that runs its serial twin in a process forked from
    one that started GNU OpenMP (:func:`deformops._forks.forked_from_gnu_openmp`).

    Both are compiled on first use, each cached on disk under its own name (Numba's cache key
    does not include ``parallel``: a twin under the same name would load the other's code).
    """

    def __init__(self, fn, signature=None, **options):
        functools.update_wrapper(self, fn)
        self._fn, self._signature, self._options = fn, signature, options

    def _compile(self, fn, parallel):
        if self._signature is None:
            return njit(parallel=parallel, **self._options)(fn)
        return njit(self._signature, parallel=parallel, **self._options)(fn)

    @functools.cached_property
    def parallel(self):
        return self._compile(self._fn, True)

    @functools.cached_property
    def serial(self):
        fn = self._fn
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__module__ = fn.__module__
        return self._compile(twin, False)

    def __call__(self, *args):
        return (self.serial if forked_from_gnu_openmp() else self.parallel)(*args)


def parallel_kernel(signature=None, **options):
    """Decorator: a :class:`ParallelKernel` with Numba's ``options`` (``cache``, ...)."""
    return lambda fn: ParallelKernel(fn, signature, **options)
