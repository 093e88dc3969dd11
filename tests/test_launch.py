"""``deformops.backends.cpu._launch``: packing kernel arguments and running a C entry point
over ranges of tasks on Numba's threads [oracle: each task's own record]."""

import numba
import numpy as np
import pytest
from numba import cfunc, types

from deformops.backends.cpu._launch import array4, float_at, launch, meta_array, pack


def _record(t0, t1, first, maddr):
    """Task t adds 1 to counts[t] and writes its range start and the packed scalars."""
    args = meta_array(maddr, 17)
    counts, starts, table = array4(args, 0, first), array4(args, 5, first), \
        array4(args, 10, np.uintp)
    scale = float_at(maddr, 16)
    for t in range(t0, t1):
        counts[0, 0, 0, t] += 1.0
        starts[0, 0, 0, t] = t0 * scale
        table[0, 0, 0, t] = t + args[15]


_ENTRY = cfunc(types.void(types.intp, types.intp, types.CPointer(types.float64), types.intp),
               nogil=True)(_record)


def _run(ntasks, threads, scale=0.5, offset=7):
    counts = np.zeros((1, 1, 1, max(ntasks, 1)))
    starts = np.full_like(counts, -1.0)
    table = np.zeros(counts.shape, np.uintp)
    meta = pack([counts, starts, table], (offset, ), (scale,))
    # ints and floats follow the three arrays
    assert meta.shape == (17,) and meta[15] == offset
    assert meta[16:].view(np.float64)[0] == scale
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        launch(_ENTRY, ntasks, counts, meta)
    finally:
        numba.set_num_threads(saved)
    return counts[0, 0, 0, :ntasks], starts[0, 0, 0, :ntasks] / scale, table[0, 0, 0, :ntasks]


@pytest.mark.parametrize("threads", sorted({1, 2, numba.config.NUMBA_NUM_THREADS}))
@pytest.mark.parametrize("ntasks", [0, 1, 2, 3, 5, 64, 1001])
def test_every_task_runs_once_in_contiguous_ranges(ntasks, threads):
    counts, starts, table = _run(ntasks, threads)
    assert (counts == 1).all()
    assert (table == np.arange(ntasks) + 7).all()
    # one range per thread (at most one per task), contiguous, in order
    ranges = np.unique(starts)
    assert len(ranges) == min(threads, ntasks)
    assert (np.diff(starts) >= 0).all() and (ntasks == 0 or starts[0] == 0)


def test_pack_rejects_arrays_it_cannot_describe():
    with pytest.raises(ValueError, match="4-D and C-contiguous"):
        pack([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="4-D and C-contiguous"):
        pack([np.zeros((2, 3, 4, 5))[..., ::2]])
