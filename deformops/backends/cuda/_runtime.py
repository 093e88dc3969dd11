"""CuPy side of the CUDA backend: compiled-module cache, launch helpers, index-type choice."""

import numpy as np

from . import _source

THREADS = 256  # DEFORMOPS_THREADS in kernels/common.cuh
MAX_BLOCKS = 1 << 20  # grid-stride loops cover the rest
SHARED_BYTES = 32 << 10  # budget of the staged sampling kernels' tap tables

_modules = {}
_functions = {}


def cupy():
    import cupy

    return cupy


def module(dtype, index):
    """The compiled module of (current device, dtype, index type, options), cached."""
    cp = cupy()
    code, options, names = _source.module_source(np.dtype(dtype).name, index)
    key = (cp.cuda.Device().id, np.dtype(dtype).name, index, options)
    mod = _modules.get(key)
    if mod is None:
        mod = cp.RawModule(code=code, options=options, name_expressions=names)
        _modules[key] = mod
    return key, mod


def kernel(name, dtype, index, *flags):
    """The function of one instantiation, e.g.
    ``kernel('sample_forward', np.float32, 'int32', 'true')``."""
    key, mod = module(dtype, index)
    expr = _source.name_expression(name, np.dtype(dtype).name, index, *flags)
    fkey = key + (expr,)
    fn = _functions.get(fkey)
    if fn is None:
        fn = mod.get_function(expr)
        _functions[fkey] = fn
    return fn


def index_dtype(*counts):
    """'int32' or 'int64' for kernels whose element and thread counts are ``counts``."""
    return _source.index_dtype(*counts, limit=_source.INDEX32_LIMIT)


def itype(index):
    return np.int64 if index == "int64" else np.int32


def acc_dtype(dtype):
    """Accumulation dtype: float64 for float64, float32 for every other type."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def launch(fn, total, args, shared_mem=0, threads=THREADS):
    """Launch ``fn`` with enough blocks for ``total`` threads (capped; kernels grid-stride)."""
    if total <= 0:
        return
    blocks = int(min(max(1, -(-int(total) // threads)), MAX_BLOCKS))
    fn((blocks,), (threads,), args, shared_mem=int(shared_mem))


def launch_blocks(fn, nblocks, args, shared_mem=0, threads=THREADS):
    """Launch ``fn`` over ``nblocks`` work blocks (capped; kernels loop over the rest)."""
    if nblocks <= 0:
        return
    fn((int(min(nblocks, MAX_BLOCKS)),), (threads,), args, shared_mem=int(shared_mem))


def sorted_segments(key, weight, src):
    """Sort a tap table by key (CuPy's sort is deterministic) and cut it into segments of equal
    key: ``(seg_key, seg_start, weight, src)``, the entries of segment s being ``seg_start[s] ..
    seg_start[s+1]-1``. As many segments as distinct keys: never more than the entries, however
    large the images (a dense index over every pixel was quadratic in tiles of one image)."""
    cp = cupy()
    order = cp.argsort(key)
    key = key[order]
    if key.size == 0:
        return key, cp.zeros(1, cp.int64), weight[order], src[order]
    first = cp.flatnonzero(cp.concatenate([cp.ones(1, bool), key[1:] != key[:-1]]))
    seg_start = cp.concatenate([first, cp.full(1, key.size, first.dtype)]).astype(cp.int64)
    return key[first], seg_start, weight[order], src[order]
