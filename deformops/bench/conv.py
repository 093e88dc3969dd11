"""Time ``deformops.deform_conv2d`` and ``deform_conv2d_backward`` against torchvision and conv2d.

Workload (defaults): three 3x3 deformable convolutions, stride 1, padding 1, dilation 1, one
offset group, bias on, float32:

- N=32, 64 -> 128 channels, 14x14, v1 (no mask);
- N=8, 64 -> 64 channels, 56x56, v2 (with mask);
- N=2, 256 -> 256 channels, 32x32, v2.

``--groups G`` makes every case a grouped convolution (G = Cin: a depthwise one).

Input uniform in [0, 1); weight standard normal / sqrt(Cin/G*9); bias standard normal / 10;
offsets (dy, dx) uniform in [-2, 2] pixels, so that taps near the border fall partly or wholly
outside the image and exercise the zero-padding rule; mask uniform in [0, 1]; output gradient
standard normal.

Measured per shape, each callable in its own block of back-to-back calls after one warm-up call:

- deformops: ``deform_conv2d`` (forward) and forward + ``deform_conv2d_backward`` with all five
  gradients (forward+backward);
- ``torchvision.ops.deform_conv2d`` on the CPU, when torchvision is importable: forward under
  ``no_grad`` and forward + ``torch.autograd.grad`` of input, offset, weight, mask (v2) and bias;
- ``torch.nn.functional.conv2d`` of the same shape, the floor of any deformable convolution:
  forward under ``no_grad`` and forward + backward (input, weight and bias gradients);
- the peak extra memory of one forward+backward: for deformops the peak of ``tracemalloc``
  (NumPy reports its allocations to it) minus the outputs, the workspace that the backend
  keeps between calls released first so that it counts; for torch the peak of the CPU
  allocations seen by ``torch.profiler`` (``profile_memory=True``) minus the outputs.

Before timing, deformops is checked in float64 at a small version of each shape (N=2, channels
divided by 8): forward and every gradient against torchvision (relative error <= 1e-8), and, with
zero offsets and no mask, against conv2d. The command exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import sys
import time

from . import _timing
from ._timing import Check, Task

HELP = "deform_conv2d / deform_conv2d_backward vs torchvision.ops.deform_conv2d and conv2d"

REPEAT = 5  # these calls are slow
MIN_TIME = 1.0  # seconds of timed calls per callable at least (fast calls get more rounds)
DEFAULT_DTYPE = "float32"
OFFSET_RANGE = 2.0  # offsets uniform in [-OFFSET_RANGE, OFFSET_RANGE] pixels
KSIZE, STRIDE, PADDING, DILATION = 3, 1, 1, 1

# (N, Cin, Cout, H, W, with mask)
DEFAULT_SHAPES = (
    (32, 64, 128, 14, 14, False),
    (8, 64, 64, 56, 56, True),
    (2, 256, 256, 32, 32, True),
)
CHECK_N = 2  # the float64 checks run at N=2 and channels // CHECK_DIV (at least CHECK_MIN_C)
CHECK_DIV = 8
CHECK_MIN_C = 4

GRAD_TOL = 1e-8  # float64 checks, relative to the largest magnitude of the reference
# forward at the timed shape and dtype vs torchvision, relative to max |out|
FORWARD_TOL = {"float32": 1e-4, "float64": 1e-10}

FWD, BOTH = "forward", "forward+backward"
OPS = (FWD, BOTH)
PEERS = ("deformops", "torchvision", "conv2d")
TARGETS = {
    ("torchvision / deformops", FWD): None,
    ("torchvision / deformops", BOTH): (">", 5.0),
    ("deformops / conv2d", FWD): ("<", 3.0),
    ("deformops / conv2d", BOTH): ("<", 4.0),
}
GRAD_NAMES = ("grad input", "grad offset", "grad weight", "grad mask", "grad bias")


# ----------------------------------------------------------------------------------------------
# options


def _shape(text: str):
    """``N,CIN,COUT,H,W,v1|v2`` -> (N, Cin, Cout, H, W, with mask)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 6 or parts[5] not in ("v1", "v2"):
        raise argparse.ArgumentTypeError(f"expected N,CIN,COUT,H,W,v1|v2, got {text!r}")
    nums = [_timing.positive_int(p) for p in parts[:5]]
    return (*nums, parts[5] == "v2")


def add_arguments(parser) -> None:
    _set_dtype_default(parser, DEFAULT_DTYPE)
    g = parser.add_argument_group("conv options")
    g.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=None,
        metavar="N,CIN,COUT,H,W,v1|v2",
        help="a 3x3 case to time instead of the defaults (repeatable); v1 = no mask, v2 = mask "
        "(default: 32,64,128,14,14,v1 8,64,64,56,56,v2 2,256,256,32,32,v2)",
    )
    g.add_argument("--seed", type=_timing.seed_int, default=0,
                   help="seed of the random data (default: 0)")
    g.add_argument(
        "--groups", type=_timing.positive_int, default=1, metavar="G",
        help="conv groups of every case, a divisor of its input and output channels; G = CIN is "
        "a depthwise convolution (default: 1)",
    )
    g.add_argument(
        "--min-time", type=_timing.seconds, default=MIN_TIME, metavar="SECONDS",
        help="time each callable for at least --repeat calls and this many seconds "
        f"(default: {MIN_TIME:g})",
    )
    g.add_argument(
        "--no-torchvision", action="store_true", help="skip the torchvision peer and its checks"
    )
    g.add_argument(
        "--no-torch", action="store_true", help="skip every torch peer (torchvision and conv2d)"
    )


def _set_dtype_default(parser, default: str) -> None:
    """Give ``--dtype`` of this subcommand its own default.

    The common options are shared by the subcommands' parsers (argparse copies the action
    objects by reference), so ``parser.set_defaults`` would change the default of every
    subcommand: this replaces the action in this parser only by a copy.
    """
    try:
        old = parser._option_string_actions["--dtype"]
        new = copy.copy(old)
        new.default = default
        new.help = f"floating dtype to time (default: {default})"
        parser._actions[parser._actions.index(old)] = new
        for s in old.option_strings:
            parser._option_string_actions[s] = new
        for group in parser._action_groups:
            group._group_actions = [new if a is old else a for a in group._group_actions]
    except (AttributeError, KeyError, ValueError):  # argparse internals changed: keep "both"
        pass


# ----------------------------------------------------------------------------------------------
# data and helpers


def _label(shape, groups=1) -> str:
    N, Cin, Cout, H, W, has_mask = shape
    conv = f" groups {groups}" if groups > 1 else ""
    return f"N{N} {Cin}->{Cout} {H}x{W}{conv} {'v2' if has_mask else 'v1'}"


def _check_groups(shapes, groups) -> None:
    """SystemExit (as ``bench sample --groups``) where ``groups`` does not divide a case's input
    and output channels."""
    for N, Cin, Cout, H, W, has_mask in shapes:
        if Cin % groups or Cout % groups:
            raise SystemExit(f"--groups {groups} must divide the {Cin} input and {Cout} output "
                             "channels of every case")


def make_data(N, Cin, Cout, H, W, has_mask, seed=0, groups=1):
    """float64 (x, offset, weight, bias, mask or None, grad_out) of one case (weight (Cout,
    Cin/groups, 3, 3))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    K = KSIZE * KSIZE
    Ho = (H + 2 * PADDING - DILATION * (KSIZE - 1) - 1) // STRIDE + 1
    Wo = (W + 2 * PADDING - DILATION * (KSIZE - 1) - 1) // STRIDE + 1
    x = rng.random((N, Cin, H, W))
    offset = rng.uniform(-OFFSET_RANGE, OFFSET_RANGE, size=(N, 2 * K, Ho, Wo))
    weight = rng.standard_normal((Cout, Cin // groups, KSIZE, KSIZE)) / np.sqrt(Cin // groups * K)
    bias = rng.standard_normal(Cout) / 10
    mask = rng.random((N, K, Ho, Wo)) if has_mask else None
    grad_out = rng.standard_normal((N, Cout, Ho, Wo))
    return x, offset, weight, bias, mask, grad_out


def _cast(arrays, dtype):
    import numpy as np

    return [None if a is None else np.ascontiguousarray(a, dtype=dtype) for a in arrays]


def _errors(got, ref):
    """(max abs error, max abs error / max |ref|)."""
    import numpy as np

    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    err = float(np.max(np.abs(got - ref), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    return err, err / scale


def _rel_check(what, dtype, got, ref, tol):
    err, rel = _errors(got, ref)
    return Check(what, dtype, rel, tol, f"max abs err {err:.2e}; relative to max |ref|")


def _nbytes(arrays) -> int:
    total = 0
    for a in arrays:
        if a is None:
            continue
        n = getattr(a, "nbytes", None)
        total += int(n if n is not None else a.numel() * a.element_size())
    return total


def _mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e6:.1f}"


# ----------------------------------------------------------------------------------------------
# the three implementations


def _deformops_fns(dops, x, offset, weight, bias, mask, grad_out):
    kw = dict(stride=STRIDE, padding=PADDING, dilation=DILATION, mask=mask)

    def fwd():
        return dops.deform_conv2d(x, offset, weight, bias, **kw)

    def both():
        out = fwd()
        return out, dops.deform_conv2d_backward(
            grad_out, x, offset, weight, needs_input_grad=(True,) * 5, **kw
        )

    return fwd, both


def _torchvision_fns(torch, tvops, x, offset, weight, bias, mask, grad_out):
    """Forward (no_grad) and forward + autograd.grad of every input that has one."""
    t = [None if a is None else torch.from_numpy(a) for a in (x, offset, weight, bias, mask)]
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in t]
    go = torch.from_numpy(grad_out)
    kw = dict(stride=STRIDE, padding=PADDING, dilation=DILATION)

    def fwd():
        with torch.no_grad():
            return tvops.deform_conv2d(*t[:4], mask=t[4], **kw)

    def both():
        out = tvops.deform_conv2d(*leaves[:4], mask=leaves[4], **kw)
        return out, torch.autograd.grad(out, [a for a in leaves if a is not None], go)

    return fwd, both


def _conv2d_fns(torch, x, weight, bias, grad_out):
    F = torch.nn.functional
    xt, wt, bt = (torch.from_numpy(a) for a in (x, weight, bias))
    leaves = [a.detach().clone().requires_grad_() for a in (xt, wt, bt)]
    go = torch.from_numpy(grad_out)
    kw = dict(stride=STRIDE, padding=PADDING, dilation=DILATION,
              groups=x.shape[1] // weight.shape[1])

    def fwd():
        with torch.no_grad():
            return F.conv2d(xt, wt, bt, **kw)

    def both():
        out = F.conv2d(*leaves, **kw)
        return out, torch.autograd.grad(out, leaves, go)

    return fwd, both


def _flatten(res):
    """The arrays / tensors of a (out, grads) result."""
    out, grads = res
    return [out, *grads]


# ----------------------------------------------------------------------------------------------
# report with a memory table


@dataclasses.dataclass
class ConvReport(_timing.Report):
    """A :class:`_timing.Report` with one more table: the peak extra memory of one
    forward+backward per case, dtype and peer."""

    memory: list = dataclasses.field(default_factory=list)

    def render(self) -> str:
        notes, self.notes = self.notes, []
        try:
            text = super().render()  # timings and ratios
        finally:
            self.notes = notes
        rows = [
            (m["case"], m["peer"], m["dtype"], _mb(m["extra_bytes"]), _mb(m["outputs_bytes"]),
             m["method"])
            for m in self.memory
        ]
        table = _timing.markdown_table(
            ("forward+backward", "peer", "dtype", "peak extra MB", "outputs MB", "measured with"),
            rows,
            align="lllrrl",
        )
        parts = [text] + ([table] if self.memory else [])
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {**super().to_json(), "memory": self.memory}


# ----------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A tqdm bar over the timed callables when tqdm is importable, else plain lines on
    stderr."""

    def __init__(self, total: int):
        mod, _ = _timing.optional_import("tqdm")
        self.bar = None
        if mod is not None and hasattr(mod, "tqdm"):
            self.bar = mod.tqdm(total=total, unit="callable", file=sys.stderr, leave=False)

    def done(self) -> None:
        """One callable timed."""
        if self.bar is not None:
            self.bar.update(1)

    def stage(self, text: str) -> None:
        if self.bar is None:
            _timing.progress(text)
        else:
            self.bar.set_description(text)

    def line(self, text: str) -> None:
        if self.bar is None:
            _timing.progress(text)
        else:
            self.bar.write(text, file=sys.stderr)

    def add(self, report, m) -> None:
        """:meth:`Report.add` that writes its progress line through the bar."""
        report.measurements.append(m)
        self.line(f"  {m.op:<40} {m.peer:<11} {m.dtype:<8} {_timing.fmt_ms(m.median_ms):>9} ms")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# memory


def _traced_peak(fn):
    """(peak bytes that tracemalloc traced during ``fn()`` above the level at its start, result).

    NumPy reports its array buffers to tracemalloc; memory allocated inside Numba kernels (none
    in the deformops CPU backend today) or by BLAS is not seen."""
    import tracemalloc

    started = not tracemalloc.is_tracing()
    gc.collect()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        res = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started:
            tracemalloc.stop()
    return peak - base, res


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _torch_peak(fn):
    """(peak bytes of CPU allocations made during ``fn()`` and not freed before the peak, as
    recorded by ``torch.profiler`` with ``profile_memory=True``, result); ``(None, reason)``
    where that profiler API is not available."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return None, f"torch.profiler unavailable ({e})"
    try:
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                res = fn()
            tree = prof.profiler.kineto_results.experimental_event_tree()
        events = []
        stack = list(tree)
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
    except Exception as e:  # a private profiler API: any change makes the number n/a
        return None, f"torch.profiler memory events unavailable ({type(e).__name__}: {e})"
    events.sort(key=lambda ev: ev[0])
    live: dict[int, int] = {}
    cur = peak = 0
    for _, size, ptr in events:
        if size > 0:
            live[ptr] = size
            cur += size
            peak = max(peak, cur)
        elif ptr in live:  # frees of memory allocated before the call do not count
            cur -= live.pop(ptr)
    return peak, res


def _memory_row(report, case, peer, dtype, fn, torch_based):
    if not torch_based:
        # the CPU backend keeps each thread's last workspace between calls: drop it, so that
        # the peak counts it as a single call would
        from deformops.backends.cpu.deform_conv import release_workspaces

        release_workspaces()
    if torch_based:
        peak, res = _torch_peak(fn)
        method = "torch.profiler (profile_memory)"
    else:
        peak, res = _traced_peak(fn)
        method = "tracemalloc"
    if peak is None:
        row = dict(case=case, peer=peer, dtype=dtype, extra_bytes=None, outputs_bytes=None,
                   peak_bytes=None, method=f"n/a: {res}")
    else:
        outputs = _nbytes(_flatten(res))
        row = dict(case=case, peer=peer, dtype=dtype, extra_bytes=max(0, peak - outputs),
                   outputs_bytes=outputs, peak_bytes=peak, method=method)
    del res
    report.memory.append(row)


# ----------------------------------------------------------------------------------------------
# checks


def _check_case(report, dops, torch, tvops, shape, seed, first_calls, groups=1):
    """float64 checks at a small version of ``shape``: deformops vs torchvision (forward and
    every gradient) and, with zero offsets and no mask, vs conv2d. The small version keeps a
    depthwise convolution depthwise (its groups: the greatest common divisor of ``groups``
    and its channel counts)."""
    import math

    import numpy as np

    N, Cin, Cout, H, W, has_mask = shape
    small = (CHECK_N, max(CHECK_MIN_C, Cin // CHECK_DIV), max(CHECK_MIN_C, Cout // CHECK_DIV),
             H, W, has_mask)
    small_groups = math.gcd(groups, small[1], small[2])
    label = f"{_label(small, small_groups)} (for {_label(shape, groups)})"
    x, offset, weight, bias, mask, grad_out = make_data(*small, seed=seed + 1,
                                                        groups=small_groups)
    d_fwd, d_both = _deformops_fns(dops, x, offset, weight, bias, mask, grad_out)

    t0 = time.perf_counter_ns()
    out = d_fwd()
    t1 = time.perf_counter_ns()
    _, grads = d_both()
    t2 = time.perf_counter_ns()
    first_calls.setdefault("forward", (t1 - t0) / 1e6)
    first_calls.setdefault("forward+backward", (t2 - t1) / 1e6)

    if tvops is not None:
        t_fwd, t_both = _torchvision_fns(torch, tvops, x, offset, weight, bias, mask, grad_out)
        ref = t_fwd().numpy()
        report.add_check(_rel_check(f"torchvision vs deformops, {label}, forward", "float64",
                                    out, ref, GRAD_TOL))
        _, t_grads = t_both()  # in the order of the leaves: input, offset, weight, bias, mask
        gx, goff, gw, gb = t_grads[:4]
        t_grads = (gx, goff, gw, t_grads[4] if mask is not None else None, gb)
        for name, g, tg in zip(GRAD_NAMES, grads, t_grads, strict=True):
            if tg is None and g is None:
                continue
            if g is None or tg is None:
                report.add_check(Check(f"torchvision vs deformops, {label}, {name}", "float64",
                                       float("inf"), GRAD_TOL, "missing on one side"))
                continue
            report.add_check(_rel_check(f"torchvision vs deformops, {label}, {name}",
                                        "float64", g, tg.numpy(), GRAD_TOL))

    if torch is not None:
        zero = np.zeros_like(offset)
        _, z_both = _deformops_fns(dops, x, zero, weight, bias, None, grad_out)
        _, c_both = _conv2d_fns(torch, x, weight, bias, grad_out)
        z_out, z_grads = z_both()
        c_out, (c_gx, c_gw, c_gb) = c_both()
        worst = ("forward", 0.0, 0.0)
        for name, got, ref in (("forward", z_out, c_out), ("grad input", z_grads[0], c_gx),
                               ("grad weight", z_grads[2], c_gw), ("grad bias", z_grads[4], c_gb)):
            err, rel = _errors(got, ref.detach().numpy())
            if not rel <= worst[2]:
                worst = (name, err, rel)
        report.add_check(Check(
            f"conv2d vs deformops with zero offsets, no mask, {label}, forward and gradients",
            "float64", worst[2], GRAD_TOL,
            f"worst: {worst[0]}, max abs err {worst[1]:.2e}; relative to max |ref|",
        ))


# ----------------------------------------------------------------------------------------------
# the run


def run(args) -> _timing.Report:
    import deformops as dops

    repeat = args.repeat or REPEAT
    shapes = tuple(args.shape) if args.shape else DEFAULT_SHAPES
    groups = args.groups
    _check_groups(shapes, groups)

    report = ConvReport(
        command="conv",
        config={
            "cases": "; ".join(_label(s, groups) for s in shapes),
            "kernel": f"{KSIZE}x{KSIZE}",
            "groups": groups,
            "stride": STRIDE,
            "padding": PADDING,
            "dilation": DILATION,
            "offset groups": 1,
            "bias": "on",
            "offsets": f"uniform in [{-OFFSET_RANGE:g}, {OFFSET_RANGE:g}] px",
            "mask (v2)": "uniform in [0, 1]",
            "threads": args.threads,
            "repeat": repeat,
            "min time (s)": args.min_time,
            "seed": args.seed,
        },
    )

    torch = tvops = None
    if args.no_torch:
        report.notes.append("torchvision and conv2d peers skipped (--no-torch)")
    else:
        torch, why = _timing.load_torch(args.threads)
        if torch is None:
            report.notes.append(
                f"torchvision and conv2d peers skipped: torch is not importable ({why})"
            )
    if torch is not None:
        if args.no_torchvision:
            report.notes.append("torchvision peer skipped (--no-torchvision)")
        else:
            tvops, why = _timing.optional_import("torchvision.ops")
            if tvops is None:
                report.notes.append(
                    f"torchvision.ops.deform_conv2d skipped: torchvision is not importable ({why})"
                )
    tv_version = _timing._version("torchvision") if tvops is not None else None
    report.config["torchvision"] = tv_version or "skipped"
    for n in report.notes:
        print(n, flush=True)

    # numerical checks (float64, small shapes) before any timing
    first_calls: dict[str, float] = {}
    _timing.progress("checking deformops in float64 at small shapes ...")
    for shape in shapes:
        _check_case(report, dops, torch, tvops, shape, args.seed, first_calls, groups)
    if tvops is None:
        print("check: deformops vs torchvision: skipped (no torchvision)", flush=True)

    # timings
    tasks_per_case = 2 + (2 if tvops is not None else 0) + (2 if torch is not None else 0)
    prog = _Progress(len(args.dtypes) * len(shapes) * tasks_per_case)
    try:
        for dtype in args.dtypes:
            for shape in shapes:
                _bench_case(report, prog, dops, torch, tvops, shape, dtype, repeat,
                            args.min_time, args.seed, groups)
    finally:
        prog.close()

    _add_notes(report, torch, args.dtypes, first_calls)
    return report


def _bench_case(report, prog, dops, torch, tvops, shape, dtype, repeat, min_time, seed,
                groups=1):
    """Check (vs torchvision, at this shape and dtype), time, ratios and memory of one case."""
    label = _label(shape, groups)
    prog.stage(f"[{dtype}] {label}")
    x, offset, weight, bias, mask, grad_out = _cast(make_data(*shape, seed=seed, groups=groups),
                                                    dtype)

    d_fwd, d_both = _deformops_fns(dops, x, offset, weight, bias, mask, grad_out)
    t0 = time.perf_counter_ns()
    ref = d_fwd()  # the reference of the check; its time is the forward's first call
    first_fwd_ms = (time.perf_counter_ns() - t0) / 1e6

    tasks = [
        Task(d_fwd, f"{label} {FWD}", "deformops"),
        Task(d_both, f"{label} {BOTH}", "deformops", "all 5 gradients"),
    ]
    if tvops is not None:
        t_fwd, t_both = _torchvision_fns(torch, tvops, x, offset, weight, bias, mask, grad_out)
        report.add_check(_rel_check(f"torchvision vs deformops, {label}, forward", dtype,
                                    ref, t_fwd().numpy(), FORWARD_TOL[dtype]))
        grads = "input, offset, weight, mask, bias" if mask is not None else \
            "input, offset, weight, bias"
        tasks += [
            Task(t_fwd, f"{label} {FWD}", "torchvision", "no_grad"),
            Task(t_both, f"{label} {BOTH}", "torchvision", f"autograd: {grads}"),
        ]
    if torch is not None:
        c_fwd, c_both = _conv2d_fns(torch, x, weight, bias, grad_out)
        tasks += [
            Task(c_fwd, f"{label} {FWD}", "conv2d", "no_grad (floor)"),
            Task(c_both, f"{label} {BOTH}", "conv2d", "autograd: input, weight, bias"),
        ]
    del ref
    if prog.bar is None:
        prog.line(f"  timing {len(tasks)} callables, 1 warm-up call then at least {repeat} "
                  f"calls and {min_time:g} s each, one callable after the other ...")
    timed = {}
    for task in tasks:  # blocks, not rounds: see the note on spin-waiting thread pools
        time.sleep(0.3)
        (m,) = _timing.measure_interleaved([task], dtype=dtype, repeat=repeat, min_s=min_time)
        timed[m.op, m.peer] = m
        prog.done()
    timed[f"{label} {FWD}", "deformops"].first_ms = first_fwd_ms
    for peer in PEERS:
        for op in OPS:
            m = timed.get((f"{label} {op}", peer))
            if m is not None:
                prog.add(report, m)

    for op in OPS:
        key = f"{label} {op}"
        d = timed[key, "deformops"]
        report.add_ratio("torchvision / deformops", key, dtype, timed.get((key, "torchvision")),
                         d, TARGETS["torchvision / deformops", op])
        # grouped convolutions: information (a depthwise conv2d has a Cin-th of the dense
        # one's arithmetic, the deformable sampling the same; the targets are a dense one's)
        report.add_ratio("deformops / conv2d", key, dtype, d, timed.get((key, "conv2d")),
                         TARGETS["deformops / conv2d", op] if groups == 1 else None)

    # peak memory of one forward+backward, outside the timed rounds
    _memory_row(report, label, "deformops", dtype, d_both, torch_based=False)
    if tvops is not None:
        _memory_row(report, label, "torchvision", dtype, t_both, torch_based=True)
    if torch is not None:
        _memory_row(report, label, "conv2d", dtype, c_both, torch_based=True)


def _add_notes(report, torch, dtypes, first_calls):
    report.notes.append(
        "forward+backward: deformops = deform_conv2d then deform_conv2d_backward (grad input, "
        "offset, weight, mask, bias)"
        + (
            "; torch peers = a fresh forward with grad-requiring leaves then torch.autograd.grad "
            "of all of them (for conv2d: input, weight, bias); torch forwards run under no_grad."
            if torch is not None
            else "."
        )
    )
    if torch is not None:
        report.notes.append(
            "each callable is timed in its own block of back-to-back calls (a warm-up, then "
            "at least --repeat calls and --min-time seconds; 'runs' in the table), 0.3 s "
            "apart: interleaving peers would let one runtime's "
            "spin-waiting thread pools (OpenMP, BLAS) slow the next one down. min ms is the "
            "least disturbed time on a busy machine. Ratio targets: torchvision / deformops "
            ">= 5 for forward+backward; deformops / conv2d <= 3 forward, <= 4 forward+backward "
            "(conv2d is the floor: the same convolution without deformation), for dense "
            "convolutions only (with --groups the sampling outweighs the convolution)."
        )
    text = (
        "first call (JIT): the warm-up call; for deformops it includes Numba compilation (or "
        "loading Numba's on-disk cache) only in the first case of a dtype"
    )
    if "float64" in dtypes and first_calls:
        text += (
            "; float64 compiled during the checks, whose first deformops calls took "
            f"{_timing.fmt_ms(first_calls['forward'])} ms (forward) and "
            f"{_timing.fmt_ms(first_calls['forward+backward'])} ms (forward+backward)"
        )
    report.notes.append(text + ".")
    mem = (
        "peak extra MB (1 MB = 10^6 bytes) of one forward+backward: the peak allocated during "
        "the call minus its outputs (output and gradients; inputs and grad_out exist before). "
        "deformops: tracemalloc, which sees NumPy's buffers (not memory allocated inside Numba "
        "kernels or by BLAS)"
    )
    if torch is not None:
        mem += (
            "; torch peers: CPU allocation events of torch.profiler(profile_memory=True), "
            "counting memory allocated during the call (saved tensors, columns, temporaries)"
        )
    report.notes.append(mem + ".")
