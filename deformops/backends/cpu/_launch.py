"""Run serial kernels on Numba's thread team, without a ``prange`` loop compiled per kernel.

Numba compiles a ``prange`` loop's body twice (once in the enclosing function, once as the
thread team's gufunc) and optimizes every function the body calls again at each of three levels
(gufunc, its wrapper, the enclosing function): for the eight sampling kernels, 33 s of a cold
first call (issue 2). Here each kernel is compiled once, serially, as a C-callable ``cfunc``
that runs a range of tasks ``[t0, t1)``, and one small ``prange`` driver, compiled once for all
kernels, calls it through its address on the same OpenMP team as every ``prange`` loop (so
the threads are the ones Numba, and with it torch's OpenMP, already keep running).

A kernel's arguments travel as one int64 array (:func:`pack`): for each 4-D C-contiguous array
its address and shape, then integer and float64 scalars (a float64 is stored by its bits).
Entry points have the C signature ``void(intp t0, intp t1, T *first, intp meta)``, where
``first`` is the first array's data (its pointer type fixes the kernel's dtype).
"""

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from . import _threads as threads
from ._threads import ParallelKernel


@intrinsic
def pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to ``like``'s scalar type (``like``: a NumPy scalar
    type such as ``np.float64``, or a pointer)."""
    sig = types.CPointer(like.dtype)(types.intp, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _call(typingctx, entry, t0, t1, first, meta):
    """``entry(t0, t1, first, meta)`` for the address ``entry`` of a C function."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64, i64, ir.IntType(8).as_pointer(), i64])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(fn, [args[1], args[2], builder.inttoptr(args[3], fnty.args[2]), args[4]])
        return context.get_dummy_value()

    return sig, codegen


def _run_ranges(entry, ntasks, first, meta, nranges):
    for i in prange(nranges):
        r = np.intp(i)  # the gufunc's index is unsigned: keep the bounds in signed integers
        _call(entry, ntasks * r // nranges, ntasks * (r + 1) // nranges, first, meta)


# compiled on first use (not at import: compiling a parallel function starts Numba's team)
_driver = ParallelKernel(_run_ranges, types.void(types.intp, types.intp, types.intp, types.intp,
                                                 types.intp), nogil=True, cache=True)


@njit(cache=True)
def meta_array(meta_address, n):
    """The packed arguments (:func:`pack`), ``n`` int64 slots at ``meta_address``."""
    return carray(pointer(meta_address, np.int64), (n,))


@njit(cache=True)
def array4(m, slot, like):
    """The 4-D C-contiguous array packed at ``m[slot:slot + 5]`` (address, four sizes), of
    ``like``'s type."""
    return carray(pointer(m[slot], like),
                  (m[slot + 1], m[slot + 2], m[slot + 3], m[slot + 4]))


@njit(cache=True)
def float_at(meta_address, slot):
    """The float64 stored by its bits in int64 slot ``slot``."""
    return carray(pointer(meta_address + 8 * slot, np.float64), (1,))[0]


def pack(arrays, ints=(), floats=()):
    """The int64 argument array of a kernel: each 4-D C-contiguous array's address and shape,
    then ``ints``, then ``floats`` by their bits. The arrays must stay alive during the call."""
    meta = []
    for a in arrays:
        if a.ndim != 4 or not a.flags.c_contiguous:  # the kernels index the memory as such
            raise ValueError(f"packed arrays must be 4-D and C-contiguous, got shape {a.shape} "
                             f"and strides {a.strides}")
        meta.append(a.__array_interface__["data"][0])
        meta.extend(a.shape)
    meta.extend(int(i) for i in ints)
    meta.extend(np.asarray(floats, np.float64).view(np.int64).tolist())
    return np.array(meta, np.int64)


def launch(entry, ntasks, first, meta):
    """Run the ``cfunc`` ``entry`` over ``range(ntasks)``: one contiguous range of tasks per
    Numba thread (one in a forked child that cannot use Numba's team, see ``._threads``), on
    Numba's thread team.

    Parameters
    ----------
    entry : numba cfunc
        ``void(intp t0, intp t1, T *first, intp meta)``; tasks must write disjoint outputs.
    ntasks : int
    first : ndarray
        The first packed array (its data pointer is ``first``).
    meta : ndarray of int64
        :func:`pack`'s result.
    """
    if ntasks <= 0:
        return
    nranges = min(threads.count(), ntasks)
    _driver(entry.address, ntasks, first.__array_interface__["data"][0],
            meta.__array_interface__["data"][0], nranges)
