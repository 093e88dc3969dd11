"""NVRTC through ctypes: compile the CUDA sources to PTX without a GPU and without CuPy.

Used by the compile check of CI (``tests/test_cuda_compile.py``) with the pip wheels of the
``cuda-build`` extra (``nvidia-cuda-nvrtc`` for the compiler, ``nvidia-cuda-runtime`` for
``cuda_fp16.h`` / ``cuda_bf16.h``); a CUDA toolkit found through ``CUDA_PATH`` or
``/usr/local/cuda`` works too. The options are the runtime's: :data:`_source.OPTIONS` plus what
CuPy's ``RawModule`` adds (``-arch=compute_XX``, ``-ftz=true``, the CUDA include directory).
"""

import ctypes
import glob
import os
import site
import sys


class NVRTCNotFound(RuntimeError):
    """No NVRTC library (or no CUDA headers) could be found."""


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message holds its log."""


def _candidate_roots():
    """CUDA roots to search: pip's nvidia/cu13 (and cu12) layouts, CUDA_PATH, /usr/local/cuda."""
    roots = []
    paths = list(sys.path)
    try:
        paths += site.getsitepackages()
    except AttributeError:
        pass
    for p in paths:
        for sub in ("nvidia/cu13", "nvidia/cu12"):
            root = os.path.join(p, sub)
            if os.path.isdir(root) and root not in roots:
                roots.append(root)
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            roots.append(os.environ[env])
    roots.append("/usr/local/cuda")
    return roots


def find_cuda():
    """``(libnvrtc path, include dir)``; raises :class:`NVRTCNotFound`."""
    libs, includes = [], []
    for root in _candidate_roots():
        for libdir in ("lib", "lib64", os.path.join("targets", "x86_64-linux", "lib")):
            libs += sorted(glob.glob(os.path.join(root, libdir, "libnvrtc.so*")))
        inc = os.path.join(root, "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            includes.append(inc)
    libs = [p for p in libs if "builtins" not in p and ".alt." not in p]
    if not libs:
        raise NVRTCNotFound("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set CUDA_PATH)")
    if not includes:
        raise NVRTCNotFound(
            "cuda_fp16.h not found (pip install nvidia-cuda-runtime, or set CUDA_PATH)")
    # the same root for both when there is one
    for lib in libs:
        root = os.path.dirname(os.path.dirname(lib))
        if os.path.join(root, "include") in includes:
            return lib, os.path.join(root, "include")
    return libs[0], includes[0]


_lib = None


def _load(path):
    global _lib
    if _lib is None:
        # libnvrtc dlopens libnvrtc-builtins by name: load it first from the same folder.
        for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in b:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                break
        _lib = ctypes.CDLL(path)
    return _lib


def version():
    lib = _load(find_cuda()[0])
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_ptx(code, options, name_expressions, arch, name="deformops.cu"):
    """Compile ``code`` to PTX for ``compute_<arch>``; returns ``(ptx, {expr: lowered name})``.

    Raises :class:`CompileError` with the NVRTC log when compilation fails.
    """
    lib_path, include = find_cuda()
    lib = _load(lib_path)
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0,
                                       None, None))
    try:
        for expr in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, expr.encode()))
        opts = list(options) + [f"-arch=compute_{arch}", "-ftz=true", f"-I{include}"]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        log = _log(lib, prog)
        if rc != 0:
            raise CompileError(f"NVRTC failed for compute_{arch} ({_err(lib, rc)}):\n{log}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, buf))
        lowered = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)))
            lowered[expr] = out.value.decode()
        return buf.value.decode(), lowered, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _log(lib, prog):
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def _err(lib, rc):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib.nvrtcGetErrorString(rc).decode()


def _check(lib, rc):
    if rc != 0:
        raise CompileError(f"NVRTC call failed: {_err(lib, rc)}")
