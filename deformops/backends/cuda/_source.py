"""Assembly of the CUDA sources: one place for the code, the options and the name expressions.

The runtime (``cupy.RawModule``) and the compile check of CI (``tests/test_cuda_compile.py``,
NVRTC without a GPU) both take their input from :func:`module_source`, so that a kernel that
does not compile cannot land. Nothing here imports CuPy.
"""

import functools
import os
import re

import numpy as np

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
# Translation units, in order; their local ``#include "x.cuh"`` lines are inlined once each.
SOURCES = ("sampling.cu", "deform_conv.cu")
HEADER = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
# Options of our own (CuPy adds -arch, -ftz=true and its include paths).
OPTIONS = ("--std=c++17",)

# numpy/CuPy dtype name -> C++ scalar type
SCALAR_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
# index dtype -> C++ index type
INDEX_TYPES = {"int32": "int", "int64": "long long"}

# Every kernel and its template parameters after (T, I).
KERNELS = {
    "sample_forward": (("false",), ("true",)),
    "sample_backward_input": (("false",), ("true",)),
    "sample_backward_coords_nchw": ((),),
    "sample_backward_coords_nhwc": ((),),
    "sample_tap_table": (("false",), ("true",)),
    "gather_segments": ((),),
    "dc_im2col": ((),),
    "dc_col2im": ((),),
    "dc_tap_table": ((),),
    "dc_offset_mask_grad": ((),),
}

# The largest element or thread count that 32-bit indexing takes: 2^31 - 1 less a block's
# headroom, because the kernels' strided loops (``e += blockDim.x``, ``c += 32``) step up to
# 1024 past their bound before they stop, and that step must not wrap around.
INDEX32_LIMIT = 2**31 - 1 - 1024

_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


@functools.lru_cache(maxsize=None)
def source():
    """The whole CUDA source: the fp16/bf16 headers, then every .cu with its .cuh inlined."""
    seen = set()

    def expand(name):
        with open(os.path.join(KERNEL_DIR, name)) as f:
            text = f.read()

        def include(match):
            dep = match.group(1)
            if dep in seen:
                return ""
            seen.add(dep)
            return expand(dep)

        return _INCLUDE.sub(include, text)

    parts = [HEADER]
    for name in SOURCES:
        parts.append(f"// ---- {name}\n")
        parts.append(expand(name))
    return "".join(parts)


def name_expression(kernel, dtype, index_dtype, *flags):
    """C++ name of one kernel instantiation, e.g. ``sample_forward<float, int, true>``."""
    args = [SCALAR_TYPES[np.dtype(dtype).name if not isinstance(dtype, str) else dtype],
            INDEX_TYPES[index_dtype]] + list(flags)
    return f"{kernel}<{', '.join(args)}>"


def name_expressions(dtype, index_dtype):
    """Every instantiation that the module of (dtype, index_dtype) holds."""
    return tuple(name_expression(k, dtype, index_dtype, *flags)
                 for k, variants in KERNELS.items() for flags in variants)


def module_source(dtype, index_dtype):
    """``(code, options, name_expressions)`` of the module for one scalar and index type."""
    return source(), OPTIONS, name_expressions(dtype, index_dtype)


def index_dtype(*counts, limit=None):
    """'int64' when any element or thread count exceeds ``limit``, else 'int32'.

    ``limit`` defaults to the module attribute :data:`INDEX32_LIMIT`; tests lower it to exercise
    the 64-bit path on small arrays.
    """
    limit = INDEX32_LIMIT if limit is None else limit
    return "int64" if any(int(c) > limit for c in counts) else "int32"
