"""Kernel stand-ins for ``python -m deformops.bench tf``: TensorFlow's own cost around the calls.

:class:`KernelClock` wraps ``deformops_tf``'s one entry into the kernels (``ops._locked``, which
every forward and backward call of the adapter goes through, on whichever thread runs it). It
times the real calls made while a task is *tagged*, and in *stand-in* mode it replaces each call
by a sleep of a given duration (the NumPy op's own forward or backward time) that returns fresh
copies of the last real result of the same call. A Keras step whose kernel calls are stand-ins
costs what the NumPy op costs plus everything TensorFlow and the adapter add around it: the
floor that the framework overhead cannot go below, whatever the kernels do.
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


class KernelClock:
    """Times or replaces ``deformops_tf``'s kernel calls (see the module docstring).

    Use as a context manager (it installs itself in ``ops`` and restores the original on exit).
    ``durations[tag][key]`` lists the real calls' times in seconds made under ``tagged(tag)``;
    under ``stand_ins(seconds)``, a call whose ``key`` (:func:`call_key`) is in ``seconds`` and
    has run for real before waits that long instead and returns a fresh copy of that result.
    """

    def __init__(self, ops):
        self._ops, self._real = ops, ops._locked
        self.durations = {}
        self._results = {}
        self._tag = None
        self._seconds = None
        self.real_under_stand_ins = 0  # calls that ran for real inside stand_ins(): no stand-in

    def __enter__(self):
        self._ops._locked = self._call
        return self

    def __exit__(self, *exc):
        self._ops._locked = self._real

    def _call(self, fn, args, kwargs):
        key = call_key(fn, kwargs)
        if self._seconds is not None and key in self._seconds and key in self._results:
            deadline = time.perf_counter() + self._seconds[key]
            result = fresh_copy(self._results[key])  # in the time the kernel would take
            wait_until(deadline)
            return result
        if self._seconds is not None:
            self.real_under_stand_ins += 1
        t0 = time.perf_counter()
        result = self._real(fn, args, kwargs)
        t1 = time.perf_counter()
        self._results[key] = result
        if self._tag is not None:
            self.durations.setdefault(self._tag, {}).setdefault(key, []).append(t1 - t0)
        return result

    @contextlib.contextmanager
    def tagged(self, tag):
        """Record the real calls made inside under ``tag``."""
        self._tag = tag
        try:
            yield
        finally:
            self._tag = None

    @contextlib.contextmanager
    def stand_ins(self, seconds):
        """Replace the calls whose keys ``seconds`` maps to a duration (see the class)."""
        self._seconds = dict(seconds)
        try:
            yield
        finally:
            self._seconds = None

    def median_ms(self, tag):
        """The sum over the calls made under ``tag`` of each call's median time, in ms (what
        the kernels took per step); None when no call was recorded."""
        calls = self.durations.get(tag)
        if not calls:
            return None
        return 1e3 * sum(statistics.median(ts) for ts in calls.values())


class SplitClock:
    """Times the NumPy op's forward and backward calls apart: ``seconds()`` maps each call's key
    (:func:`call_key`) to its median time, the stand-ins' durations."""

    def __init__(self):
        self.times = {}

    def timed(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its duration recorded under its key."""
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times.setdefault(call_key(fn, kwargs), []).append(time.perf_counter() - t0)
        return result

    def seconds(self):
        return {key: statistics.median(ts) for key, ts in self.times.items()}
