"""Shared pytest configuration: hypothesis profiles, and the ``one_thread`` fixture.

- "ci": derandomized, no deadline (Numba compiles kernels on first call), ~40 examples per test;
- "dev": random, no deadline, hypothesis' default example count.

The "ci" profile is loaded when the environment variable CI is set (to anything non-empty), else
"dev"; ``--hypothesis-profile=NAME`` on the command line overrides both.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Triton (imported by torch._dynamo, e.g. through torchvision) segfaults at import when
# TensorFlow was imported first (TF 2.21 with triton 3.8, the versions CI installs); imported
# first, both work. The suite imports both frameworks in one process.
try:
    import triton  # noqa: F401
except ImportError:
    pass

# Make tests/_oracles.py importable as ``_oracles`` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=40, print_blob=True, **_common)
settings.register_profile("dev", **_common)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def one_thread():
    """One Numba and one torch thread for a module of tests on tiny inputs.

    On a shared 2-core machine, waking a thread pool costs more than such kernels (2 threads
    under load: ~10 ms per call instead of ~0.1 ms); the core's own tests exercise the parallel
    paths. dynamo's caches are cleared afterwards.
    """
    import numba
    import torch

    numba_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    numba.set_num_threads(numba_threads)
    torch.set_num_threads(torch_threads)
    torch.compiler.reset()


@pytest.fixture
def launch_threads(monkeypatch):
    """The thread count (``numba.get_num_threads()`` of the calling thread) at every launch of a
    CPU kernel, in order: a list that the test reads after its calls."""
    import numba

    from deformops.backends.cpu import _threads

    seen = []
    call = _threads.ParallelKernel.__call__

    def counted(self, *args):
        seen.append(numba.get_num_threads())
        return call(self, *args)

    monkeypatch.setattr(_threads.ParallelKernel, "__call__", counted)
    return seen
