"""Kernel stand-ins for ``python -m deformops.bench tf``: TensorFlow's own cost around the calls.

:class:`KernelClock` wraps ``deformops_tf``'s one entry into the kernels (``ops._locked``, which
every forward and backward call of the adapter goes through, on whichever thread runs it). It
times the real calls made while a task is *tagged*, and in *stand-in* mode it replaces each call
by a wait of a given duration (the NumPy op's own forward or backward time) that returns a fresh
copy of a real result of the same call. A Keras step whose kernel calls are stand-ins costs what
the NumPy op costs plus everything TensorFlow and the adapter add around it, with the cores idle
where the kernels would use them: TF's and the adapter's share of the framework overhead.

Both clocks leave out the first call of each kind after :meth:`new_block` (a block's warm-up
call, which the benchmark's medians leave out too).
"""

from __future__ import annotations

import contextlib
import statistics
import time

SPIN_S = 2e-4  # the end of a stand-in's wait is spun: time.sleep overshoots by ~60 us on Linux


def call_key(fn, kwargs):
    """Which call this is: the kernel's name and the gradients it computes."""
    return fn.__name__, kwargs.get("needs_input_grad")


def wait_until(deadline):
    """Sleep until ``time.perf_counter() >= deadline`` (the last SPIN_S spun)."""
    rest = deadline - time.perf_counter()
    if rest > SPIN_S:
        time.sleep(rest - SPIN_S)
    while time.perf_counter() < deadline:
        pass


def fresh_copy(result):
    """A copy of a kernel's result (an array, or a NamedTuple of arrays and None) in new 64-byte
    aligned buffers, as the kernels return them: TensorFlow adopts the buffers it is handed and
    may reuse them for its own outputs."""
    import numpy as np
    from deformops_tf._convert import aligned_empty

    def copy(a):
        if not isinstance(a, np.ndarray):
            return a
        b = aligned_empty(a.shape, a.dtype)
        np.copyto(b, a)
        return b

    if isinstance(result, tuple):
        return type(result)(*(copy(a) for a in result))
    return copy(result)


class _Samples:
    """Durations by key, each key's first one after :meth:`new_block` left out; their medians,
    computed again only after new samples."""

    def __init__(self):
        self.times = {}
        self._seen = set()
        self._medians = None

    def new_block(self):
        self._seen = set()

    def add(self, key, seconds):
        if key not in self._seen:  # the block's warm-up call
            self._seen.add(key)
            return
        self.times.setdefault(key, []).append(seconds)
        self._medians = None

    def medians(self):
        if self._medians is None:
            self._medians = {key: statistics.median(ts) for key, ts in self.times.items()}
        return self._medians


class KernelClock:
    """Times or replaces ``deformops_tf``'s kernel calls (see the module docstring).

    Use as a context manager (it installs itself in ``ops`` and restores the original on exit).
    Calls made under ``tagged(tag)`` run for real and are timed (:meth:`seconds`); the first
    one of each key (:func:`call_key`) also keeps a copy of its result. Under
    ``stand_ins(seconds)``, a call whose key is in ``seconds`` and has such a result waits that
    long instead and returns a fresh copy of it (``stand_in_calls`` counts them); any other
    call runs for real (``real_under_stand_ins`` counts those). Other calls pass through.
    """

    def __init__(self, ops):
        self._ops, self._real = ops, ops._locked
        self._samples = {}  # tag -> _Samples
        self._results = {}
        self._tag = None
        self._seconds = None
        self.stand_in_calls = 0
        self.real_under_stand_ins = 0

    def __enter__(self):
        self._ops._locked = self._call
        return self

    def __exit__(self, *exc):
        self._ops._locked = self._real

    def _call(self, fn, args, kwargs):
        if self._tag is None and self._seconds is None:
            return self._real(fn, args, kwargs)
        key = call_key(fn, kwargs)
        if self._seconds is not None:
            if key in self._seconds and key in self._results:
                deadline = time.perf_counter() + self._seconds[key]
                result = fresh_copy(self._results[key])  # in the time the kernel would take
                wait_until(deadline)
                self.stand_in_calls += 1
                return result
            self.real_under_stand_ins += 1
            return self._real(fn, args, kwargs)
        t0 = time.perf_counter()
        result = self._real(fn, args, kwargs)
        t1 = time.perf_counter()
        self._samples.setdefault(self._tag, _Samples()).add(key, t1 - t0)
        if key not in self._results:  # a copy of our own: TF may write into what it adopts
            self._results[key] = fresh_copy(result)
        return result

    def new_block(self):
        """A block starts: leave out each tag's next call of each key (its warm-up)."""
        for samples in self._samples.values():
            samples.new_block()

    @contextlib.contextmanager
    def tagged(self, tag):
        """Run and time the calls made inside under ``tag``."""
        self._tag = tag
        try:
            yield
        finally:
            self._tag = None

    @contextlib.contextmanager
    def stand_ins(self, seconds):
        """Replace the calls whose keys ``seconds`` maps to a duration (see the class)."""
        self._seconds = seconds
        try:
            yield
        finally:
            self._seconds = None

    def seconds(self, tag):
        """{key: median seconds} of the calls timed under ``tag`` ({} if none)."""
        samples = self._samples.get(tag)
        return samples.medians() if samples is not None else {}


class SplitClock:
    """Times the NumPy op's forward and backward calls apart (see the module docstring)."""

    def __init__(self):
        self._samples = _Samples()

    def timed(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its duration recorded under its key (:func:`call_key`)."""
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self._samples.add(call_key(fn, kwargs), time.perf_counter() - t0)
        return result

    def new_block(self):
        """A block starts: leave out the next call of each key (its warm-up)."""
        self._samples.new_block()

    def seconds(self):
        """{key: median seconds} of the calls timed so far: the stand-ins' durations."""
        return self._samples.medians()
