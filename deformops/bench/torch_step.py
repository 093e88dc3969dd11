"""Time a training step of ``deformops_torch.DeformConv2dPack`` against torchvision and
``nn.Conv2d``, and the PyTorch adapter's overhead over the NumPy core.

Workload: the cases of ``python -m deformops.bench conv`` (3x3, stride 1, padding 1, bias on;
N=32 64->128 14x14 v1, N=8 64->64 56x56 v2, N=2 256->256 32x32 v2; ``--shape`` picks others),
float32 by default.

1. Training step (forward, backward of ``sum(out * g)``, ``torch.optim.SGD`` step; the input
   requires grad, as for a layer inside a network), each peer with the same parameters:

   - deformops_torch: ``DeformConv2dPack(modulated=v2)``, whose zero-initialised offset
     predictor is set to N(0, 1/(3*Cin)) weights so that the predicted offsets are about 1 px
     (the sampling is not the integer-offset special case);
   - torchvision: the same predictor (a copy of ``conv_offset``), sigmoid mask for v2, and
     ``torchvision.ops.DeformConv2d`` with the same weight and bias;
   - conv2d: ``nn.Conv2d`` of the same shape (no predictor), the floor.

   Checked before timing, in float64 at a small version of each case: output and every
   gradient (input, predictor, weight, bias) of deformops_torch against the torchvision peer.
2. Adapter overhead at the same cases: ``deformops_torch.deform_conv2d`` forward +
   ``torch.autograd.grad`` of all its inputs, against ``deformops.deform_conv2d`` +
   ``deform_conv2d_backward`` on the NumPy views of the same tensors, timed in alternating
   rounds (every other round in reverse order); target: at most 5% of the op's time, judged
   twice: end to end (median of the paired per-round ratios) and for the adapter's own part
   (the time the torch call spends outside the core's two functions, timed around them).
3. Per-call overhead on tiny inputs (N=1, 2 channels, 4x4), for each operator forward and
   forward+backward, the same comparison with many repeats and one thread (a thread pool's
   wake-up on a busy machine is noise of milliseconds); target: at most 50 us per call (the
   forward+backward pair makes two calls), judged end to end and for the adapter's own part:
   net of the same autograd round trip through a do-nothing ``autograd.Function`` (timed in
   the same rounds), which any Python-level op pays.

On a machine where ``torch.cuda.is_available()``, the training step is also timed on the GPU
(rows with device "cuda"); a peer that fails there is reported as a note.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time

from . import _timing
from .conv import (DEFAULT_SHAPES, KSIZE, PADDING, _cast, _label, _rel_check, _set_dtype_default,
                   _shape, make_data)
from ._timing import Task

HELP = "deformops_torch: training step vs torchvision and nn.Conv2d; adapter overhead"

REPEAT = 5  # training steps at the conv shapes are slow
TINY_REPEAT = 2000
TINY_THREADS = 1
TINY_SHAPE = (1, 2, 2, 4, 4)  # N, Cin, Cout, H, W
DEFAULT_DTYPE = "float32"
OVERHEAD_TARGET = 0.05  # of the op's time, at the conv shapes
OVERHEAD_REPEAT = 15  # paired rounds at the conv shapes
PER_CALL_TARGET_US = 50.0
CHECK_TOL = 1e-8  # float64, relative to max |reference|
CHECK_N, CHECK_DIV, CHECK_MIN_C = 2, 8, 4
LR = 1e-3
STEP = "train step"
PEERS = ("deformops_torch", "torchvision", "conv2d")


def add_arguments(parser) -> None:
    _set_dtype_default(parser, DEFAULT_DTYPE)
    g = parser.add_argument_group("torch options")
    g.add_argument(
        "--shape", type=_shape, action="append", default=None, metavar="N,CIN,COUT,H,W,v1|v2",
        help="a 3x3 case to time instead of the defaults (repeatable); v1 = no mask, v2 = "
        "modulated (default: 32,64,128,14,14,v1 8,64,64,56,56,v2 2,256,256,32,32,v2)")
    g.add_argument("--seed", type=_timing.seed_int, default=0,
                   help="seed of the random data (default: 0)")
    g.add_argument(
        "--tiny-repeat", type=_timing.positive_int, default=TINY_REPEAT, metavar="N",
        help=f"timed rounds per tiny-input overhead measurement (default: {TINY_REPEAT}; the "
        "median of the paired differences is used)")
    g.add_argument(
        "--tiny-threads", type=_timing.positive_int, default=TINY_THREADS, metavar="N",
        help=f"Numba and torch threads for the tiny-input overheads (default: {TINY_THREADS})")
    g.add_argument("--no-torchvision", action="store_true", help="skip the torchvision peer")
    g.add_argument("--no-cuda", action="store_true", help="skip the GPU rows")


# ----------------------------------------------------------------------------------------------
# report with an overhead table


@dataclasses.dataclass
class TorchReport(_timing.Report):
    """A :class:`_timing.Report` with one more table: adapter overheads with their targets."""

    overheads: list = dataclasses.field(default_factory=list)

    def add_overhead(self, case, what, dtype, torch_m, core_m, limit, unit, floor_m=None,
                     own=None):
        """One row: ``torch_m`` vs ``core_m``, timed in the same interleaved rounds, end to end
        as the median over the rounds of the paired ratio (``unit`` "%", of the core's time) or
        difference (``unit`` "us", ``limit`` per call already multiplied by the number of
        calls), and the adapter's own part: ``own`` (measured apart, in ``unit``) or, with
        ``floor_m`` (unit "us", same rounds: a do-nothing autograd Function's forward +
        backward, which any Python-level torch op pays), the end-to-end difference net of it.
        Both are judged against ``limit``."""
        if floor_m is not None and (unit != "us" or not _timing.paired(torch_m, floor_m)):
            raise ValueError("floor_m needs unit 'us' and the rounds of torch_m")
        if unit == "%":
            value = 100 * (_timing.paired_median(torch_m, core_m, lambda a, b: a / b) - 1)
        else:
            value = 1000 * _timing.paired_median(torch_m, core_m, lambda a, b: a - b)
        if own is None and floor_m is not None:
            own = 1000 * statistics.median(
                a - b - f for a, b, f in zip(torch_m.times_ms, core_m.times_ms,
                                             floor_m.times_ms, strict=True))
        if own is None:
            own = value
        row = dict(case=case, what=what, dtype=dtype, torch_ms=torch_m.median_ms,
                   core_ms=core_m.median_ms, value=value, unit=unit, limit=limit,
                   ok=bool(value <= limit), own=own, own_ok=bool(own <= limit),
                   autograd_floor_us=None if floor_m is None else 1000 * floor_m.median_ms)
        self.overheads.append(row)
        return row

    def render(self) -> str:
        notes, self.notes = self.notes, []
        try:
            text = super().render()
        finally:
            self.notes = notes
        rows = [(o["case"], o["what"], o["dtype"], _timing.fmt_ms(o["torch_ms"]),
                 _timing.fmt_ms(o["core_ms"]), f"{o['value']:.1f} {o['unit']}",
                 "ok" if o["ok"] else "MISS",
                 "-" if o["autograd_floor_us"] is None else f"{o['autograd_floor_us']:.1f} us",
                 f"{o['own']:.1f} {o['unit']}", "ok" if o["own_ok"] else "MISS",
                 f"<= {o['limit']:g} {o['unit']}")
                for o in self.overheads]
        table = _timing.markdown_table(
            ("adapter overhead", "calls", "dtype", "torch median ms", "core median ms",
             "end to end (paired median)", "verdict", "autograd floor", "adapter's own",
             "verdict", "target"), rows, align="lllrrrlrrll")
        parts = [text] + ([table] if self.overheads else [])
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {**super().to_json(), "overheads": self.overheads}


# ----------------------------------------------------------------------------------------------
# the three training steps


def _peers(torch, tvops, dt, shape, dtype, device, seed):
    """{peer: (module list, forward(x))}, the same parameters in each (torch dtype)."""
    N, Cin, Cout, H, W, v2 = shape
    K = KSIZE * KSIZE
    torch.manual_seed(seed)
    ours = dt.DeformConv2dPack(Cin, Cout, KSIZE, padding=PADDING, modulated=v2)
    with torch.no_grad():
        ours.conv_offset.weight.normal_(0.0, 1.0 / math.sqrt(3 * Cin))
    ours = ours.to(device=device, dtype=dtype)
    peers = {"deformops_torch": ([ours], ours)}
    if tvops is not None:
        pred = copy.deepcopy(ours.conv_offset)
        tv = tvops.DeformConv2d(Cin, Cout, KSIZE, padding=PADDING).to(device=device, dtype=dtype)
        with torch.no_grad():
            tv.weight.copy_(ours.weight)
            tv.bias.copy_(ours.bias)

        def tv_forward(x):
            p = pred(x)
            mask = torch.sigmoid(p[:, 2 * K:]) if v2 else None
            return tv(x, p[:, :2 * K], mask)

        peers["torchvision"] = ([pred, tv], tv_forward)
    conv = torch.nn.Conv2d(Cin, Cout, KSIZE, padding=PADDING).to(device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(ours.weight)
        conv.bias.copy_(ours.bias)
    peers["conv2d"] = ([conv], conv)
    return peers


def _step_fn(torch, modules, forward, x, g, sync):
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        forward(x).backward(g)
        opt.step()
        sync()

    return step


def _inputs(torch, shape, dtype, device, seed):
    N, Cin, Cout, H, W, _ = shape
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(N, Cin, H, W, generator=gen, dtype=torch.float64)
    g = torch.randn(N, Cout, H, W, generator=gen, dtype=torch.float64)  # 3x3, pad 1: Ho = H
    return (x.to(device=device, dtype=dtype).requires_grad_(), g.to(device=device, dtype=dtype))


def _check_step(report, torch, tvops, dt, shape, seed):
    """float64, small version of ``shape``: output and all gradients vs the torchvision peer."""
    N, Cin, Cout, H, W, v2 = shape
    small = (CHECK_N, max(CHECK_MIN_C, Cin // CHECK_DIV), max(CHECK_MIN_C, Cout // CHECK_DIV),
             H, W, v2)
    label = f"{_label(small)} (for {_label(shape)})"
    peers = _peers(torch, tvops, dt, small, torch.float64, "cpu", seed)
    x, g = _inputs(torch, small, torch.float64, "cpu", seed)
    results = {}
    for name in ("deformops_torch", "torchvision"):
        modules, forward = peers[name]
        leaves = [x] + [p for m in modules for p in m.parameters()]
        out = forward(x)
        results[name] = (out, torch.autograd.grad(out, leaves, g))
    (out, grads), (ref, ref_grads) = results["deformops_torch"], results["torchvision"]
    # leaves: input, then ours: weight, bias, predictor weight, predictor bias;
    # torchvision's: predictor weight, predictor bias, weight, bias
    ref_grads = (ref_grads[0], ref_grads[3], ref_grads[4], ref_grads[1], ref_grads[2])
    names = ("output", "grad input", "grad weight", "grad bias", "grad predictor weight",
             "grad predictor bias")
    for name, a, r in zip(names, (out, *grads), (ref, *ref_grads)):
        report.add_check(_rel_check(f"torchvision vs deformops_torch step, {label}, {name}",
                                    "float64", a.detach().numpy(), r.detach().numpy(),
                                    CHECK_TOL))


def _bench_steps(report, torch, tvops, dt, shape, dtype, device, repeat, seed):
    label = _label(shape)
    tdtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        peers = _peers(torch, tvops, dt, shape, tdtype, device, seed)
        x, g = _inputs(torch, shape, tdtype, device, seed)
    except Exception as e:  # noqa: BLE001  (e.g. no CUDA backend yet)
        report.notes.append(f"{device} {label}: skipped ({type(e).__name__}: {e})")
        return
    timed = {}
    for peer in PEERS:
        if peer not in peers:
            continue
        modules, forward = peers[peer]
        fn = _step_fn(torch, modules, forward, x, g, sync)
        time.sleep(0.3)  # let the previous runtime's thread pool stop spinning (see conv)
        try:
            (m,) = _timing.measure_interleaved(
                [Task(fn, f"{label} {STEP}", peer, device)], dtype=dtype, repeat=repeat)
        except Exception as e:  # noqa: BLE001
            report.notes.append(f"{device} {label} {peer}: failed ({type(e).__name__}: {e})")
            continue
        timed[peer] = report.add(m)
    op = f"{label} {STEP}" + ("" if device == "cpu" else " (cuda)")
    report.add_ratio("torchvision / deformops_torch", op, dtype, timed.get("torchvision"),
                     timed.get("deformops_torch"))
    report.add_ratio("deformops_torch / conv2d", op, dtype, timed.get("deformops_torch"),
                     timed.get("conv2d"))


# ----------------------------------------------------------------------------------------------
# adapter overhead


def _conv_pair(torch, dops, dt, arrays):
    """(torch callable, NumPy callable): deform_conv2d forward + every gradient."""
    x, off, w, b, m, go = arrays
    kw = dict(stride=1, padding=PADDING, dilation=1)
    tensors = [None if a is None else torch.from_numpy(a) for a in (x, off, w, b, m)]
    leaves = [None if t is None else t.requires_grad_() for t in tensors]
    grad_leaves = [t for t in leaves if t is not None]
    go_t = torch.from_numpy(go)

    def with_torch():
        out = dt.deform_conv2d(*leaves[:4], mask=leaves[4], **kw)
        return out, torch.autograd.grad(out, grad_leaves, go_t)

    def with_core():
        out = dops.deform_conv2d(x, off, w, b, mask=m, **kw)
        return out, dops.deform_conv2d_backward(go, x, off, w, mask=m, **kw)

    return with_torch, with_core


def _tiny_pairs(torch, dops, dt, dtype, seed):
    """{(op, calls): (torch callable, NumPy callable)} on tiny inputs."""
    import numpy as np

    N, Cin, Cout, H, W = TINY_SHAPE
    x, off, w, b, m, go = _cast(make_data(N, Cin, Cout, H, W, True, seed=seed), dtype)
    rng = np.random.default_rng(seed)
    coords = (rng.uniform(-1, H, size=(N, 2, H, W))).astype(dtype)
    go_s = rng.standard_normal((N, Cin, H, W)).astype(dtype)
    pairs = {}
    t = {k: torch.from_numpy(a) for k, a in dict(x=x, off=off, w=w, b=b, m=m, c=coords).items()}
    kw = dict(stride=1, padding=PADDING, dilation=1)
    pairs["deform_conv2d", "forward"] = (
        lambda: dt.deform_conv2d(t["x"], t["off"], t["w"], t["b"], mask=t["m"], **kw),
        lambda: dops.deform_conv2d(x, off, w, b, mask=m, **kw))
    pairs["deform_conv2d", "forward+backward"] = _conv_pair(torch, dops, dt,
                                                            (x, off, w, b, m, go))
    for name, op, core, core_bw in (
            ("sample", dt.sample, dops.sample, dops.sample_backward),
            ("deform_sample", dt.deform_sample, dops.deform_sample, dops.deform_sample_backward)):
        pairs[name, "forward"] = (lambda op=op: op(t["x"], t["c"]),
                                  lambda core=core: core(x, coords))
        xl = t["x"].clone().requires_grad_()
        cl = t["c"].clone().requires_grad_()
        go_t = torch.from_numpy(go_s)

        def with_torch(op=op, xl=xl, cl=cl, go_t=go_t):
            out = op(xl, cl)
            return out, torch.autograd.grad(out, (xl, cl), go_t)

        def with_core(core=core, core_bw=core_bw):
            return core(x, coords), core_bw(go_s, x, coords)

        pairs[name, "forward+backward"] = (with_torch, with_core)
    return pairs


class _CoreTimer:
    """While active, the core functions that deformops_torch calls are wrapped to add up the
    time spent inside them: ``_forward`` and ``_backward`` of ``deformops.deform_conv`` (the
    bodies of ``deform_conv2d`` and its backward, which name the input as torch does; the
    adapter looks them up on the module at each call)."""

    NAMES = ("_forward", "_backward")

    def __init__(self, module):
        self.module, self.inside_ms, self.calls, self._saved = module, 0.0, 0, {}

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside_ms += (time.perf_counter_ns() - t0) / 1e6
                self.calls += 1
        return timed

    def __enter__(self):
        for name in self.NAMES:
            self._saved[name] = getattr(self.module, name)
            setattr(self.module, name, self._wrap(self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.module, name, fn)


def _outside_core_percent(dops, with_torch, repeat):
    """Median over ``repeat`` calls of the time ``with_torch`` spends outside the core's
    functions (conversions, checks, dispatch, autograd), in % of the time inside them."""
    shares = []
    with _CoreTimer(dops.deform_conv) as timer:
        for _ in range(repeat):
            timer.inside_ms, timer.calls = 0.0, 0
            t0 = time.perf_counter_ns()
            res = with_torch()
            total = (time.perf_counter_ns() - t0) / 1e6
            del res
            if timer.calls != len(_CoreTimer.NAMES):  # one forward, one backward
                raise RuntimeError(f"deformops_torch made {timer.calls} timed core calls, "
                                   f"expected {len(_CoreTimer.NAMES)}: it no longer calls "
                                   "deformops.deform_conv._forward/_backward at call time")
            shares.append(100 * (total - timer.inside_ms) / timer.inside_ms)
    return statistics.median(shares)


def _bench_overhead(report, torch, dops, dt, shape, dtype, repeat, seed):
    label = _label(shape)
    arrays = _cast(make_data(*shape, seed=seed), dtype)
    with_torch, with_core = _conv_pair(torch, dops, dt, arrays)
    op = f"{label} deform_conv2d fwd+bwd"
    rounds = max(repeat, OVERHEAD_REPEAT)
    m_t, m_c = _timing.measure_interleaved(
        [Task(with_torch, op, "deformops_torch"), Task(with_core, op, "deformops (NumPy)")],
        dtype=dtype, repeat=rounds, alternate=True)
    report.add(m_t)
    report.add(m_c)
    report.add_overhead(label, "deform_conv2d fwd+bwd", dtype, m_t, m_c,
                        100 * OVERHEAD_TARGET, "%",
                        own=_outside_core_percent(dops, with_torch, rounds))


def _autograd_floor(torch, n_inputs, out_shape, dtype):
    """forward + ``torch.autograd.grad`` through a do-nothing ``autograd.Function`` of
    ``n_inputs`` tiny inputs: what any Python-level autograd op costs, kernels aside."""

    class NoOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return inputs[0].new_empty(out_shape)

        @staticmethod
        def backward(ctx, grad):
            return tuple(torch.empty_like(t) for t in ctx.saved_tensors)

    leaves = [torch.zeros(3, dtype=getattr(torch, dtype), requires_grad=True)
              for _ in range(n_inputs)]
    grad = torch.zeros(out_shape, dtype=getattr(torch, dtype))

    def floor():
        out = NoOp.apply(*leaves)
        return torch.autograd.grad(out, leaves, grad)

    return floor


def _bench_tiny(report, torch, dops, dt, dtype, repeat, seed):
    N, Cin, Cout, H, W = TINY_SHAPE
    case = f"tiny N{N} {Cin}->{Cout} {H}x{W}"
    for (name, calls), (with_torch, with_core) in _tiny_pairs(torch, dops, dt, dtype,
                                                                seed).items():
        op = f"{case} {name} {calls}"
        tasks = [Task(with_torch, op, "deformops_torch"), Task(with_core, op, "deformops (NumPy)")]
        if calls != "forward":
            n_inputs = 5 if name == "deform_conv2d" else 2
            tasks.append(Task(_autograd_floor(torch, n_inputs, (N, Cout, H, W), dtype), op,
                              "autograd floor", f"no-op Function, {n_inputs} inputs"))
        ms = _timing.measure_interleaved(tasks, dtype=dtype, repeat=repeat, alternate=True)
        for m in ms:
            report.add(m)
        n_calls = 1 if calls == "forward" else 2
        report.add_overhead(case, f"{name} {calls}", dtype, ms[0], ms[1],
                            PER_CALL_TARGET_US * n_calls, "us", ms[2] if len(ms) > 2 else None)


# ----------------------------------------------------------------------------------------------
# the run


def run(args) -> _timing.Report:
    import deformops as dops

    repeat = args.repeat or REPEAT
    shapes = tuple(args.shape) if args.shape else DEFAULT_SHAPES
    report = TorchReport(command="torch", config={
        "cases": "; ".join(_label(s) for s in shapes),
        "kernel": f"{KSIZE}x{KSIZE}", "padding": PADDING, "bias": "on",
        "optimizer": f"SGD lr={LR:g}", "threads": args.threads, "repeat": repeat,
        "tiny": f"N{TINY_SHAPE[0]} C{TINY_SHAPE[1]} {TINY_SHAPE[3]}x{TINY_SHAPE[4]}, "
                f"{args.tiny_repeat} runs, {args.tiny_threads} thread(s)",
        "seed": args.seed,
    })
    _timing.require("torch", "pip install 'deformops-kernels[torch]'")
    torch, _ = _timing.load_torch(args.threads)
    import deformops_torch as dt

    tvops = None
    if args.no_torchvision:
        report.notes.append("torchvision peer skipped (--no-torchvision)")
    else:
        tvops, why = _timing.optional_import("torchvision.ops")
        if tvops is None:
            report.notes.append(f"torchvision peer skipped: not importable ({why})")
    report.config["torch"] = torch.__version__
    report.config["torchvision"] = _timing._version("torchvision") if tvops else "skipped"
    cuda = not args.no_cuda and torch.cuda.is_available()
    report.config["cuda"] = torch.cuda.get_device_name() if cuda else "not used"

    if tvops is not None:
        _timing.progress("checking a training step in float64 at small shapes ...")
        for shape in shapes:
            _check_step(report, torch, tvops, dt, shape, args.seed)

    for dtype in args.dtypes:
        for shape in shapes:
            _timing.progress(f"[{dtype}] {_label(shape)}: training step")
            _bench_steps(report, torch, tvops, dt, shape, dtype, "cpu", repeat, args.seed)
            if cuda:
                _bench_steps(report, torch, tvops, dt, shape, dtype, "cuda", repeat, args.seed)
            _timing.progress(f"[{dtype}] {_label(shape)}: adapter overhead")
            _bench_overhead(report, torch, dops, dt, shape, dtype, repeat, args.seed)
        _timing.progress(f"[{dtype}] tiny inputs: per-call overhead")
        _timing.set_threads(args.tiny_threads)
        try:
            _bench_tiny(report, torch, dops, dt, dtype, args.tiny_repeat, args.seed)
        finally:
            _timing.set_threads(args.threads)

    report.notes += [
        "train step: zero_grad, forward, backward of sum(out * g) (the input requires grad), "
        f"SGD step (lr {LR:g}); each peer timed in its own block of calls, 0.3 s apart. "
        "deformops_torch = DeformConv2dPack (predictor + deform_conv2d); torchvision = the same "
        "predictor + torchvision.ops.DeformConv2d; conv2d = nn.Conv2d of the same shape (floor).",
        "adapter overhead: deformops_torch vs deformops on the NumPy views of the same tensors, "
        f"timed in alternating rounds ({OVERHEAD_REPEAT} at the conv cases); the overhead is "
        "the median over the rounds of the paired ratio or difference (a slow spell of the "
        "machine hits both calls of a round). At the conv cases it is a percentage of the "
        f"core's time (target <= {100 * OVERHEAD_TARGET:g}%); on tiny inputs it is absolute, "
        f"with a target of {PER_CALL_TARGET_US:g} us per call (forward+backward = 2 calls). "
        "'autograd floor' is forward + torch.autograd.grad through a do-nothing "
        "autograd.Function with as many inputs, timed in the same rounds: what any Python-level "
        "torch op pays for autograd, whatever it does. Two verdicts: end to end, and the "
        "adapter's own part (DLPack conversion and dispatch): on tiny inputs the end-to-end "
        "overhead, net of the autograd floor for forward+backward; at the conv cases the time "
        "the torch call spends outside the core's deform_conv2d and deform_conv2d_backward "
        "(timed around them). Every other round runs in reverse order.",
        "first call (JIT): the warm-up call; it includes Numba compilation (or loading its "
        "cache) only for the first use of a kernel.",
    ]
    return report
