"""First-call cost of the CPU kernels: Numba compiling them cold, and loading them from its cache.

Each measurement runs in a fresh Python process whose Numba cache is an empty temporary
directory (``NUMBA_CACHE_DIR``), so it never reads or writes the cache of the installed package:

1. cold: every sampling kernel (float32 and float64, NCHW and NHWC, forward and backward) called
   once through the public API on an input large enough to be split among threads, timed call
   by call; then deform_conv2d forward
   and backward (NCHW, both dtypes) for information (skipped with ``--sampling-only``);
2. cached: the same calls in a second process on the cache the first one filled.

The target (issue 2) is the cold total of the sampling kernels: under 20 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from . import _timing

HELP = "first-call compile time of the CPU kernels, cold and from Numba's cache"
RATIOS = False  # times only: nothing for --plot to draw
TARGET_S = 20.0

# Run in the child: prints one JSON object {label: seconds}.
_CHILD = r"""
import json, sys, time
import numpy as np
import deformops as dops

rng = np.random.default_rng(0)
times = {}

def timed(label, fn):
    t0 = time.perf_counter()
    fn()
    times[label] = time.perf_counter() - t0

for dtype in sys.argv[1].split(","):
    x = rng.uniform(-1, 1, (2, 16, 32, 32)).astype(dtype)
    c = rng.uniform(-2, 34, (2, 4, 32, 32)).astype(dtype)
    for layout in ("NCHW", "NHWC"):
        # NHWC in memory too: the kernels follow the memory order
        xl, cl = (x, c) if layout == "NCHW" else (
            np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
            np.ascontiguousarray(c.transpose(0, 2, 3, 1)))
        timed(f"sample forward {layout}|{dtype}", lambda: dops.sample(xl, cl, layout=layout))
        timed(f"sample backward {layout}|{dtype}",
              lambda: dops.sample_backward(xl, xl, cl, layout=layout))
for dtype in sys.argv[1].split(",") if sys.argv[2] == "1" else ():
    x = rng.uniform(-1, 1, (2, 4, 9, 11)).astype(dtype)
    w = rng.uniform(-1, 1, (6, 4, 3, 3)).astype(dtype)
    off = rng.uniform(-2, 2, (2, 18, 9, 11)).astype(dtype)
    m = rng.uniform(0, 1, (2, 9, 9, 11)).astype(dtype)
    timed(f"deform_conv2d forward NCHW|{dtype}",
          lambda: dops.deform_conv2d(x, off, w, None, padding=1, mask=m))
    g = rng.uniform(-1, 1, (2, 6, 9, 11)).astype(dtype)
    timed(f"deform_conv2d backward NCHW|{dtype}",
          lambda: dops.deform_conv2d_backward(g, x, off, w, padding=1, mask=m))
print(json.dumps(times))
"""


CHILD_TIMEOUT_S = 600


def add_arguments(parser) -> None:
    """``--sampling-only`` (``--dtype`` and ``--threads`` apply too)."""
    g = parser.add_argument_group("jit options")
    g.add_argument("--sampling-only", action="store_true",
                   help="time the sampling kernels only (the target's), without "
                        "deform_conv2d's rows for information (about half the run time)")


def _child(cache_dir: str, dtypes, threads: int, conv: bool) -> dict[str, float]:
    """Run :data:`_CHILD` in a fresh interpreter with Numba's cache in ``cache_dir``;
    {label: seconds} (``conv``: deform_conv2d's calls too). This package's parent directory
    goes first on its PYTHONPATH, so that the child times this copy of deformops (a checkout
    or an install alike)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-c", _CHILD, ",".join(dtypes), str(int(conv))]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                         timeout=CHILD_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"the timing process failed (exit {out.returncode}):\n"
                           + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> _timing.Report:
    """Both processes, a row per kernel call and process, and the verdict on the cold total."""
    report = _timing.Report(command="jit")
    dtypes = args.dtypes
    report.config = {"dtypes": ",".join(dtypes), "threads": args.threads,
                     "input": "sampling N=2, C=16, G=2, 32x32 (large enough for the parallel "
                              "driver)" + ("" if args.sampling_only
                                           else ", deform_conv2d N=2, 4->6, 9x11, 3x3")}
    conv = not args.sampling_only
    with tempfile.TemporaryDirectory(prefix="deformops-jit-") as cache:
        _timing.progress("cold: compiling every kernel in a fresh process ...")
        cold = _child(cache, dtypes, args.threads, conv)
        _timing.progress("cached: loading them in a second process ...")
        warm = _child(cache, dtypes, args.threads, conv)
    for label, seconds in cold.items():
        op, dtype = label.split("|")
        for peer, s in (("cold compile", seconds), ("from cache", warm[label])):
            ms = 1000 * s
            report.add(_timing.Measurement(op=op, peer=peer, dtype=dtype, median_ms=ms,
                                           min_ms=ms, first_ms=ms, repeat=1))
    sampling = [k for k in cold if k.startswith("sample ")]
    total = sum(cold[k] for k in sampling)
    verdict = "ok" if total < TARGET_S else "MISS"
    report.notes += [
        f"sampling kernels ({len(sampling)} calls), cold total: {total:.1f} s "
        f"(target < {TARGET_S:.0f} s): {verdict}; from cache: "
        f"{sum(warm[k] for k in sampling):.2f} s",
        "Each process starts with an empty Numba cache of its own (NUMBA_CACHE_DIR); the first "
        "call also pays Numba's one-time start-up (LLVM and type-system initialisation).",
    ]
    if conv:
        report.notes.append("deform_conv2d rows are for information: its kernels are compiled on "
                            "its first call.")
    return report
