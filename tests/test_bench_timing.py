"""Helpers of the benchmark command that decide verdicts: paired medians and the timer that
separates the PyTorch adapter's own time from the core's. Oracle: hand-computed values."""

import time
import types

import pytest

from deformops.bench import _timing
from deformops.bench.torch_step import _CoreTimer


def _m(times, rounds_id=1):
    return _timing.Measurement(op="op", peer="p", dtype="float32", median_ms=0.0, min_ms=0.0,
                               first_ms=0.0, repeat=len(times), times_ms=tuple(times),
                               rounds_id=rounds_id)


def test_paired_median_pairs_rounds():
    # rounds 2 and 3 are slow spells for both calls: the medians' ratio (40 / 10) is 4, and
    # the medians' difference 30; the paired values say 2 and 1
    a, b = _m([2.0, 40.0, 80.0]), _m([1.0, 10.0, 79.0])
    assert _timing.paired_median(a, b, lambda x, y: x / y) == pytest.approx(2.0)
    assert _timing.paired_median(a, b, lambda x, y: x - y) == pytest.approx(1.0)


def test_paired_median_refuses_unpaired_measurements():
    with pytest.raises(ValueError, match="same interleaved rounds"):
        _timing.paired_median(_m([1.0, 2.0]), _m([1.0]), lambda x, y: x / y)
    with pytest.raises(ValueError):
        _timing.paired_median(_m([]), _m([]), lambda x, y: x / y)
    with pytest.raises(ValueError):  # two different measure_interleaved calls
        _timing.paired_median(_m([1.0]), _m([1.0], rounds_id=2), lambda x, y: x / y)


def test_measure_interleaved_pairs_its_tasks_and_ratios_use_the_pairs():
    calls = iter([1.0, 2.0] * 50)
    ms = _timing.measure_interleaved(
        [_timing.Task(lambda: next(calls), "op", "a"), _timing.Task(lambda: next(calls), "op", "b")],
        dtype="float32", repeat=3)
    other = _timing.measure_interleaved([_timing.Task(lambda: None, "op", "c")],
                                        dtype="float32", repeat=3)
    assert _timing.paired(*ms) and not _timing.paired(ms[0], other[0])
    assert len(ms[0].times_ms) == 3
    report = _timing.Report(command="t")
    a = _m([2.0, 40.0, 2.0], rounds_id=7)
    b = _m([1.0, 10.0, 1.0], rounds_id=7)
    a.median_ms, b.median_ms = 3.0, 1.0  # their medians' ratio differs from the pairs' median
    assert report.add_ratio("a / b", "op", "float32", a, b).value == pytest.approx(2.0)
    b_unpaired = _m([1.0, 10.0, 1.0], rounds_id=8)
    b_unpaired.median_ms = 1.0
    assert report.add_ratio("a / b", "op", "float32", a, b_unpaired).value == pytest.approx(3.0)


def test_core_timer_counts_inside_time_and_restores_functions():
    def slow(*args, **kwargs):
        time.sleep(0.02)
        return args, kwargs

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    core = types.SimpleNamespace(_forward=slow, _backward=failing)
    with pytest.raises(RuntimeError, match="boom"), _CoreTimer(core) as timer:
        assert core._forward(1, k=2) == ((1,), {"k": 2})
        assert timer.inside_ms >= 20.0
        core._backward()
    assert core._forward is slow and core._backward is failing


def test_measure_interleaved_alternates_the_order():
    seen = []
    tasks = [_timing.Task(lambda k=k: seen.append(k), "op", str(k)) for k in range(3)]
    _timing.measure_interleaved(tasks, dtype="float32", repeat=3, alternate=True)
    # one warm-up call each, then rounds 0 .. 2 with round 1 reversed
    assert seen == [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 2]


def test_measure_interleaved_min_time_adds_rounds_up_to_a_cap(monkeypatch):
    """Oracle: the call count. Without min_s exactly ``repeat`` rounds; with it, rounds go on
    until the timed calls add up to min_s (and stop right then), never past the cap."""
    def call():
        time.sleep(0.002)

    (m,) = _timing.measure_interleaved([_timing.Task(call, "op", "p")], dtype="float32",
                                       repeat=3)
    assert m.repeat == len(m.times_ms) == 3
    (m,) = _timing.measure_interleaved([_timing.Task(call, "op", "p")], dtype="float32",
                                       repeat=3, min_s=0.03)
    assert m.repeat == len(m.times_ms) > 3  # 3 sleeps of 2 ms are not 30 ms
    assert sum(m.times_ms) >= 30 > sum(m.times_ms[:-1])
    monkeypatch.setattr(_timing, "MAX_ROUNDS", 5)
    (m,) = _timing.measure_interleaved([_timing.Task(call, "op", "p")], dtype="float32",
                                       repeat=3, min_s=10.0)
    assert m.repeat == 5


def test_merge_blocks_takes_the_median_over_every_call():
    """Oracle: the median and minimum of the concatenated calls, the first block's warm-up."""
    a = _timing.Measurement("op", "p", "float32", 2.0, 1.0, 9.0, 3, times_ms=(1.0, 2.0, 3.0),
                            rounds_id=4)
    b = _timing.Measurement("op", "p", "float32", 10.0, 10.0, 7.0, 1, times_ms=(10.0,),
                            rounds_id=5)
    m = _timing.merge_blocks([a, b])
    assert (m.median_ms, m.min_ms, m.first_ms, m.repeat) == (2.5, 1.0, 9.0, 4)
    assert m.times_ms == (1.0, 2.0, 3.0, 10.0) and not _timing.paired(m, m)
