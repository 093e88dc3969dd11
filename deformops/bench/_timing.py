"""Timing, reporting and machine-description helpers shared by the benchmark subcommands.

Nothing here imports Numba, SciPy or a framework at module level: ``import deformops.bench`` stays
as light as ``import deformops``. Subcommands ask for optional peers with :func:`optional_import`
and :func:`load_torch`, which import on demand.

A subcommand fills a :class:`Report` with

- :class:`Measurement` rows (one per op, peer and dtype), made by :func:`measure` or, for
  callables whose ratios matter, :func:`measure_interleaved`;
- :class:`Check` rows (numerical agreement with a peer, verified before timing it);
- :class:`Ratio` rows (speed ratios with an optional target),

and the CLI prints it as Markdown tables (:meth:`Report.render`) and writes it as JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------------------------
# measurements


@dataclasses.dataclass
class Measurement:
    """Wall-clock timings of one (op, peer, dtype), in milliseconds.

    ``first_ms`` is the warm-up call (it includes Numba JIT compilation or cache loading for
    deformops); ``median_ms`` and ``min_ms`` are over the ``repeat`` calls that follow it.
    """

    op: str
    peer: str
    dtype: str
    median_ms: float
    min_ms: float
    first_ms: float
    repeat: int
    note: str = ""
    # the timed calls in order, and which measure_interleaved call they came from (0: none):
    # measurements of one call were timed in the same rounds and can be compared pairwise
    times_ms: tuple[float, ...] = ()
    rounds_id: int = 0


@dataclasses.dataclass
class Check:
    """Numerical agreement of deformops with a peer, verified before timing the peer."""

    what: str
    dtype: str
    max_err: float
    tol: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.max_err <= self.tol)  # NaN fails

    def line(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"check: {self.what} [{self.dtype}]: max err {self.max_err:.2e} "
            f"<= tol {self.tol:.0e}: {verdict}{extra}"
        )


@dataclasses.dataclass
class Ratio:
    """``numerator / denominator`` of two median times, with an optional target.

    ``target`` is ``(">", 1.0)`` or ``("<", 1.2)``, or ``None`` for an informational ratio.
    """

    name: str
    op: str
    dtype: str
    value: float
    target: tuple[str, float] | None = None

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        sign, bound = self.target
        return bool(self.value > bound) if sign == ">" else bool(self.value < bound)


def _ms(t0: int, t1: int) -> float:
    return (t1 - t0) / 1e6


def measure(
    fn: Callable[[], Any], *, op: str, peer: str, dtype: str, repeat: int, note: str = ""
) -> Measurement:
    """Time ``fn()``: one warm-up call (reported as ``first_ms``), then the median of ``repeat``.

    The garbage collector is off while timing (as in :mod:`timeit`) and the result of each call
    is dropped before the next one starts.
    """
    return measure_interleaved([Task(fn, op=op, peer=peer, note=note)], dtype=dtype, repeat=repeat)[
        0
    ]


@dataclasses.dataclass
class Task:
    """One callable to time with :func:`measure_interleaved`."""

    fn: Callable[[], Any]
    op: str
    peer: str
    note: str = ""


_ROUNDS = itertools.count(1)  # ids of measure_interleaved calls
MAX_ROUNDS = 1000  # rounds of measure_interleaved with min_s


def measure_interleaved(tasks: Sequence[Task], *, dtype: str, repeat: int,
                        settle_s: float = 0.0, alternate: bool = False,
                        min_s: float = 0.0) -> list[Measurement]:
    """Time several callables in rounds (one call of each per round), so that a slow spell of
    the machine (another process, frequency changes) hits all of them alike and their ratios stay
    meaningful. Each task first gets one warm-up call (``first_ms``), in order; the report is the
    median of ``repeat`` rounds. The garbage collector is off while timing (as in :mod:`timeit`)
    and each result is dropped before the next call. ``settle_s`` seconds of sleep before each
    call let the thread pools of the previous call (OpenMP, BLAS) stop spin-waiting, so that one
    peer's idle threads do not slow the next one down. ``alternate`` runs every other round in
    reverse order, so that what one call leaves behind (spinning threads, warm caches) falls on
    each peer alike. With ``min_s``, rounds go on past ``repeat`` until the timed calls add up
    to ``min_s`` seconds (at most MAX_ROUNDS), so that a fast call's median covers a spell of
    the machine as long as a slow call's does.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    rounds_id = next(_ROUNDS)
    first = []
    times: list[list[float]] = [[] for _ in tasks]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for t in tasks:
            t0 = time.perf_counter_ns()
            res = t.fn()
            t1 = time.perf_counter_ns()
            del res
            first.append(_ms(t0, t1))
            time.sleep(settle_s)
        r, spent_ns = 0, 0
        while r < repeat or (spent_ns < min_s * 1e9 and r < MAX_ROUNDS):
            order = list(enumerate(tasks))
            for k, t in (order[::-1] if alternate and r % 2 else order):
                time.sleep(settle_s)
                t0 = time.perf_counter_ns()
                res = t.fn()
                t1 = time.perf_counter_ns()
                del res
                times[k].append(_ms(t0, t1))
                spent_ns += t1 - t0
            r += 1
    finally:
        if was_enabled:
            gc.enable()
    return [
        Measurement(
            op=t.op,
            peer=t.peer,
            dtype=dtype,
            median_ms=statistics.median(ts),
            min_ms=min(ts),
            first_ms=f,
            repeat=len(ts),
            note=t.note,
            times_ms=tuple(ts),
            rounds_id=rounds_id,
        )
        for t, f, ts in zip(tasks, first, times, strict=True)
    ]


def merge_blocks(blocks: Sequence[Measurement]) -> Measurement:
    """One measurement from several blocks of the same callable: the median and minimum over
    all their timed calls; the first block's warm-up call is ``first_ms``."""
    times = tuple(t for m in blocks for t in m.times_ms)
    first = blocks[0]
    return dataclasses.replace(first, median_ms=statistics.median(times), min_ms=min(times),
                               repeat=len(times), times_ms=times, rounds_id=0)


def paired(a: Measurement, b: Measurement) -> bool:
    """True when ``a`` and ``b`` were timed in the same rounds of one
    :func:`measure_interleaved` call."""
    return (bool(a.rounds_id) and a.rounds_id == b.rounds_id
            and bool(a.times_ms) and len(a.times_ms) == len(b.times_ms))


def paired_median(a: Measurement, b: Measurement,
                  fn: Callable[[float, float], float]) -> float:
    """Median over the rounds of ``fn(a_i, b_i)`` (e.g. a ratio or a difference) for two
    measurements of one :func:`measure_interleaved` call: a slow spell of the machine hits both
    calls of a round alike, so paired values are far steadier than ratios of medians."""
    if not paired(a, b):
        raise ValueError("paired_median needs two measurements of the same interleaved rounds")
    return statistics.median(fn(x, y) for x, y in zip(a.times_ms, b.times_ms, strict=True))


def _int_option(text: str, minimum: int, expected: str) -> int:
    """argparse ``type``: ``text`` as an int >= ``minimum``, else an error saying ``expected``."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        v = minimum - 1
    if v < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """argparse ``type`` for options that take a positive integer."""
    return _int_option(text, 1, "a positive integer")


def seed_int(text: str) -> int:
    """argparse ``type`` for ``--seed``: an integer >= 0 (NumPy's seeds)."""
    return _int_option(text, 0, "an integer >= 0")


def seconds(text: str) -> float:
    """argparse ``type`` for durations such as ``--min-time``: a finite number >= 0."""
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return v


def require(name: str, install: str):
    """Import ``name`` for a subcommand that has nothing to time without it; else print why and
    what to install, and exit with status 2."""
    mod, why = optional_import(name)
    if mod is None:
        print(f"nothing to time: {name} is not importable ({why}); {install}", file=sys.stderr,
              flush=True)
        raise SystemExit(2)
    return mod


def progress(msg: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# reports


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table padded for plain-text reading.

    ``align`` has one letter per column, ``l`` or ``r`` (default: left).
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = (align or "").ljust(len(headers), "l")

    def fmt(row):
        out = []
        for i, c in enumerate(row):
            out.append(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
            for w, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]])


@dataclasses.dataclass
class Report:
    """Everything one subcommand run produced."""

    command: str
    config: dict = dataclasses.field(default_factory=dict)
    measurements: list[Measurement] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    ratios: list[Ratio] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        progress(f"  {m.op:<18} {m.peer:<10} {m.dtype:<8} {fmt_ms(m.median_ms):>9} ms")
        return m

    def add_check(self, c: Check) -> Check:
        self.checks.append(c)
        print(c.line(), flush=True)
        return c

    def get(self, op: str, peer: str, dtype: str) -> Measurement | None:
        for m in self.measurements:
            if (m.op, m.peer, m.dtype) == (op, peer, dtype):
                return m
        return None

    def add_ratio(
        self,
        name: str,
        op: str,
        dtype: str,
        num: Measurement | None,
        den: Measurement | None,
        target: tuple[str, float] | None = None,
    ) -> Ratio | None:
        """Add ``num / den`` if both were measured: the median of the paired ratios when they
        were timed in the same interleaved rounds, else the ratio of the medians."""
        if num is None or den is None or den.median_ms <= 0:
            return None
        if paired(num, den):
            value = paired_median(num, den, lambda a, b: a / b)
        else:
            value = num.median_ms / den.median_ms
        r = Ratio(name, op, dtype, value, target)
        self.ratios.append(r)
        return r

    @property
    def ok(self) -> bool:
        """False when a numerical check failed (missed speed targets do not fail the run)."""
        return all(c.ok for c in self.checks)

    def render(self) -> str:
        parts = []
        rows = [
            (
                m.op,
                m.peer,
                m.dtype,
                fmt_ms(m.median_ms),
                fmt_ms(m.min_ms),
                fmt_ms(m.first_ms),
                m.repeat,
                m.note,
            )
            for m in self.measurements
        ]
        parts.append(
            markdown_table(
                (
                    "op",
                    "peer",
                    "dtype",
                    "median ms",
                    "min ms",
                    "first call (JIT) ms",
                    "runs",
                    "note",
                ),
                rows,
                align="lllrrrrl",
            )
        )
        if self.ratios:
            rows = []
            for r in self.ratios:
                if r.target is None:
                    target, verdict = "-", "info"
                else:
                    target = f"{r.target[0]} {r.target[1]:g}"
                    verdict = "ok" if r.ok else "MISS"
                rows.append((r.name, r.op, r.dtype, fmt_ratio(r.value), target, verdict))
            parts.append(
                markdown_table(
                    ("ratio", "op", "dtype", "value", "target", "verdict"), rows, align="lllrll"
                )
            )
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {
            "command": self.command,
            "config": self.config,
            "measurements": [dataclasses.asdict(m) for m in self.measurements],
            "checks": [dict(dataclasses.asdict(c), ok=c.ok) for c in self.checks],
            "ratios": [dict(dataclasses.asdict(r), ok=r.ok) for r in self.ratios],
            "notes": self.notes,
        }


def write_json(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# machine, threads and optional peers


def max_threads() -> int:
    """The most threads Numba can use here (``NUMBA_NUM_THREADS``; default: all cores)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def set_threads(n: int) -> int:
    """Set the Numba thread count (and torch's, if torch is already imported); return it."""
    import numba

    numba.set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def optional_import(name: str):
    """``(module, None)``, or ``(None, reason)`` when ``name`` cannot be imported."""
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError, RuntimeError) as e:  # absent, or a broken install
        return None, f"{type(e).__name__}: {e}"


def load_torch(threads: int):
    """Import torch on demand and give it ``threads`` intra-op threads; ``(torch, None)`` or
    ``(None, reason)``."""
    torch, why = optional_import("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return torch, why


def _version(dist: str) -> str | None:
    mod = sys.modules.get(dist)
    if mod is not None and hasattr(mod, "__version__"):
        return str(mod.__version__)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(packages: Sequence[str] = ("numpy", "numba", "scipy", "torch")) -> dict:
    """CPU, thread counts and package versions (read without importing absent packages)."""
    import numba

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "numba_threads": numba.get_num_threads(),
        "numba_max_threads": max_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    busy = busy_cpus()
    if busy is not None:
        info["busy_cpus_before_run"] = round(busy, 2)
    info["versions"] = {p: _version(p) or "not installed" for p in packages}
    return update_machine_info(info)


def _cpu_ticks():
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cpus(seconds: float = 0.3) -> float | None:
    """How many CPUs other processes keep busy, measured over ``seconds`` while this process
    sleeps (Linux ``/proc/stat``); ``None`` where that is not available."""
    try:
        b0, t0 = _cpu_ticks()
        time.sleep(seconds)
        b1, t1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (os.cpu_count() or 1) * (b1 - b0) / (t1 - t0)


class OtherLoad:
    """CPUs kept busy by other processes between :meth:`start` and :meth:`stop`: the machine's
    busy time (``/proc/stat``) minus this process's own CPU time, per second of wall clock.
    ``stop()`` returns ``None`` where ``/proc/stat`` is not available."""

    def start(self) -> OtherLoad:
        self._t = time.perf_counter()
        self._own = sum(os.times()[:2])
        try:
            self._busy = _cpu_ticks()[0]
        except (OSError, ValueError, IndexError):
            self._busy = None
        return self

    def stop(self) -> float | None:
        if self._busy is None:
            return None
        try:
            busy = _cpu_ticks()[0] - self._busy
        except (OSError, ValueError, IndexError):
            return None
        wall = time.perf_counter() - self._t
        own = sum(os.times()[:2]) - self._own
        if wall <= 0:
            return None
        return max(0.0, (busy / os.sysconf("SC_CLK_TCK") - own) / wall)


def update_machine_info(info: dict) -> dict:
    """Add what is known only once a subcommand ran (torch's thread count, once imported)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info.setdefault("versions", {})["torch"] = str(torch.__version__)
    return info


def format_machine(info: dict) -> str:
    threads = f"numba threads {info['numba_threads']} (max {info['numba_max_threads']})"
    if "torch_threads" in info:
        threads += f", torch threads {info['torch_threads']}"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    text = (
        f"machine: {info['cpu']}; {info['cpu_count']} CPUs ({info['usable_cpus']} usable); "
        f"{threads}\n"
        f"python {info['python']} on {info['platform']}; {versions}"
    )
    load = info.get("load_average_1min")
    busy = info.get("busy_cpus_before_run")
    if load is not None or busy is not None:
        text += "\nbefore the run: " + "; ".join(
            part
            for part in (
                None if load is None else f"load average (1 min) {load:.2f}",
                None if busy is None else f"{busy:.2f} CPUs busy with other processes",
            )
            if part
        )
    during = info.get("busy_cpus_during_run")
    if during is not None:
        text += f"\nduring the run: {during:.2f} CPUs busy with other processes"
    if max(busy or 0.0, during or 0.0) > 0.25:
        text += (
            "\nWARNING: other processes were using the CPUs; multi-threaded timings (and "
            "their ratios) are disturbed -- rerun on a quiet machine"
        )
    return text
