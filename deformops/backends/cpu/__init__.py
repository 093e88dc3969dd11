"""Numba CPU backend."""

import glob
import hashlib
import os


def _drop_stale_numba_cache():
    """Remove this package's Numba cache when any of its sources changed.

    Numba invalidates a cached kernel only when the kernel's own file changes, not when a helper
    it inlines from a sibling module does. A hash of every source here decides instead. Installs
    whose ``__pycache__`` is not writable are left alone (there, sources change only by
    reinstalling, which also changes every file's stamp).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = os.path.join(here, "__pycache__")
    marker = os.path.join(cache, "numba-sources.sha1")
    try:
        with open(marker) as f:
            if f.read() == digest.hexdigest():
                return
    except OSError:
        pass
    try:
        for path in glob.glob(os.path.join(cache, "*.nb[ic]")):
            os.remove(path)
        os.makedirs(cache, exist_ok=True)
        with open(marker, "w") as f:
            f.write(digest.hexdigest())
    except OSError:
        pass


_drop_stale_numba_cache()

from .deform_conv import deform_conv2d_backward, deform_conv2d_forward  # noqa: E402
from ._threads import limit as limit_threads  # noqa: E402
from .sampling import sample_backward, sample_forward  # noqa: E402

# deform_conv2d reads and writes NHWC arrays as they are (channels_last=True)
NATIVE_NHWC = True

__all__ = ["sample_forward", "sample_backward", "deform_conv2d_forward", "deform_conv2d_backward",
           "limit_threads"]
