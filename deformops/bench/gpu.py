"""Time the CUDA backend (CuPy) against torchvision CUDA, cuDNN conv2d, cupyx and grid_sample.

Needs a GPU: without CuPy, or when ``cupy.is_available()`` is False, the command prints why on
stderr and exits 2. The device is the current CUDA device (``CUDA_VISIBLE_DEVICES`` picks it).

Peaks, measured first in the same run (METHOD.md of the device tool): the device-to-device copy
bandwidth (a 1 GiB ``cupy`` copy, counting bytes read plus bytes written) and the matrix-product
rate (``cupy.matmul`` of 8192 x 8192 matrices, 2 n^3 flops) in each timed dtype. Every timed
row reports its achieved bandwidth (the fewest bytes the op must move: each input read once, each
output written once) and flop rate against those peaks.

deform_conv2d (3x3, stride 1, padding 1, one offset group, bias on; offsets uniform in [-2, 2],
mask uniform in [0, 1]): shapes (N=16, 256->256, 64x64, v2), (N=64, 64->64, 56x56, v2),
(N=32, 512->512, 28x28, v1), forward and forward + backward (all five gradients), against
``torchvision.ops.deform_conv2d`` on CUDA (forward under no_grad; forward + autograd.grad) and
``torch.nn.functional.conv2d`` (cuDNN) of the same shape. Targets: forward + backward at least
2x faster than torchvision, forward within 2x of cuDNN.

Sampling: ``deform_sample`` (bilinear, 'grid-constant', NCHW and NHWC) of (N=16, C=64, 128x128),
against ``cupyx.scipy.ndimage.map_coordinates`` (4-D coordinates, order 1) and
``torch.nn.functional.grid_sample`` (align_corners=True, zeros padding: the same function), plus
the backward of deformops and grid_sample. Target: forward at 70% or more of the copy bandwidth
for the bytes it must move.

Every deformops result is checked against its peer first (float32: relative error <= 1e-4;
float16: <= 1e-2 against float32 torchvision). Timing: CUDA events on the current stream around
each call, after one warm-up call (which includes NVRTC compilation on a first run); the median
of ``--repeat`` calls (default 10).
"""

from __future__ import annotations

import functools
import sys
import time

from . import _timing
from ._timing import Check, Measurement, Ratio

HELP = "CUDA kernels (CuPy) vs torchvision CUDA, cuDNN conv2d, cupyx and grid_sample (needs a GPU)"

REPEAT = 10
GPU_DTYPES = ("float32", "float16")
CONV_SHAPES = (  # (N, Cin, Cout, H, W, with mask)
    (16, 256, 256, 64, 64, True),
    (64, 64, 64, 56, 56, True),
    (32, 512, 512, 28, 28, False),
)
SAMPLE_SHAPE = (16, 64, 128, 128)  # N, C, H, W
QUICK_CONV_SHAPE = (4, 64, 64, 32, 32, True)  # --quick
QUICK_SAMPLE_SHAPE = (4, 32, 64, 64)
PEAK_COPY_ELEMENTS = 1 << 28  # float32: 1 GiB copied
PEAK_MATMUL_N = 8192
OFFSET_RANGE = 2.0
FWD, BOTH = "forward", "forward+backward"
CHECK_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("gpu options")
    g.add_argument("--gpu-dtype", action="append", choices=("float32", "float16", "bfloat16"),
                   default=None, help="dtype to time, repeatable (default: float32 and float16; "
                   "the common --dtype is ignored here)")
    g.add_argument("--quick", action="store_true",
                   help="one small conv shape and a smaller sampling case (a smoke run)")
    g.add_argument("--seed", type=_timing.seed_int, default=0)


def _free(cupy, torch):
    """Give the memory of the finished case back (its arrays died with the function)."""
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def _require_gpu():
    try:
        import cupy
    except ImportError as err:
        _fail(f"no GPU benchmark: CuPy is not installed ({err}); "
              "pip install 'deformops-kernels[cuda13]'")
    if not cupy.is_available():
        _fail("no GPU benchmark: CuPy finds no usable GPU (cupy.is_available() is False); "
              "run it on a machine with an NVIDIA GPU")
    return cupy


def _fail(msg):
    print(msg, file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# timing with CUDA events


def gpu_measure(cupy, fn, *, op, peer, dtype, repeat, note="") -> Measurement:
    """One warm-up call (wall clock, synchronized: includes compilation), then ``repeat`` calls
    each between two CUDA events on the current stream; median and min in ms."""
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    res = fn()
    cupy.cuda.Device().synchronize()
    first = (time.perf_counter() - t0) * 1e3
    del res
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        res = fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
        del res
    times.sort()
    return Measurement(op=op, peer=peer, dtype=dtype, median_ms=times[len(times) // 2],
                       min_ms=times[0], first_ms=first, repeat=repeat, note=note)


def measure_peaks(cupy, dtypes) -> dict:
    """Copy bandwidth (bytes/s, read + write) and matmul rate (flop/s) per dtype."""
    import numpy as np

    peaks = {}
    n = PEAK_COPY_ELEMENTS
    a = cupy.ones(n, np.float32)
    b = cupy.empty_like(a)
    m = gpu_measure(cupy, functools.partial(cupy.copyto, b, a), op="copy", peer="cupy",
                    dtype="float32", repeat=10)
    peaks["copy_bytes_per_s"] = 2 * a.nbytes / (m.median_ms * 1e-3)
    k = PEAK_MATMUL_N
    for dt in dtypes:
        dtype = _np_dtype(dt)
        rng = cupy.random.default_rng(0)
        x = rng.standard_normal((k, k), dtype=np.float32).astype(dtype)
        y = rng.standard_normal((k, k), dtype=np.float32).astype(dtype)
        mm = gpu_measure(cupy, functools.partial(cupy.matmul, x, y), op="matmul", peer="cupy",
                         dtype=dt, repeat=5)
        peaks[f"matmul_flops_{dt}"] = 2 * k**3 / (mm.median_ms * 1e-3)
    return peaks


def _np_dtype(name):
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rates(ms, nbytes, flops, peaks, dt):
    bw = nbytes / (ms * 1e-3)
    text = f"{bw / 1e9:.0f} GB/s = {bw / peaks['copy_bytes_per_s']:.0%} of copy"
    if flops:
        fr = flops / (ms * 1e-3)
        text += f"; {fr / 1e12:.1f} TFLOP/s = {fr / peaks[f'matmul_flops_{dt}']:.0%} of matmul"
    return text, bw / peaks["copy_bytes_per_s"]


def _rel(got, ref):
    import numpy as np

    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# ----------------------------------------------------------------------------------------------
# deform_conv2d


def _conv_case(cupy, shape, dt, seed):
    import numpy as np

    N, Cin, Cout, H, W, has_mask = shape
    dtype = _np_dtype(dt)
    rng = cupy.random.default_rng(seed)
    K = 9

    def r(*s):
        return rng.random(s, dtype=np.float32)

    x = r(N, Cin, H, W).astype(dtype)
    offset = ((r(N, 2 * K, H, W) * 2 - 1) * OFFSET_RANGE).astype(dtype)
    weight = rng.standard_normal((Cout, Cin, 3, 3), dtype=np.float32) / np.sqrt(Cin * K)
    weight = weight.astype(dtype)
    bias = (rng.standard_normal(Cout, dtype=np.float32) / 10).astype(dtype)
    mask = r(N, K, H, W).astype(dtype) if has_mask else None
    grad_out = rng.standard_normal((N, Cout, H, W), dtype=np.float32).astype(dtype)
    return x, offset, weight, bias, mask, grad_out


def _label(shape):
    N, Cin, Cout, H, W, m = shape
    return f"N{N} {Cin}->{Cout} {H}x{W} {'v2' if m else 'v1'}"


def _bench_conv(report, cupy, torch, tv, dops, shape, dt, peaks, repeat, seed):
    x, offset, weight, bias, mask, go = _conv_case(cupy, shape, dt, seed)
    N, Cin, Cout, H, W, has_mask = shape
    kw = dict(stride=1, padding=1, dilation=1, mask=mask)
    label = _label(shape)
    flops = 2 * N * Cout * H * W * Cin * 9
    io = [x, offset, weight, bias, mask]
    fwd_bytes = sum(a.nbytes for a in io if a is not None) + N * Cout * H * W * x.itemsize
    both_bytes = 2 * fwd_bytes + go.nbytes  # forward, then read inputs + grad_out, write grads

    def d_fwd():
        return dops.deform_conv2d(x, offset, weight, bias, **kw)

    def d_both():
        out = d_fwd()
        return out, dops.deform_conv2d_backward(go, x, offset, weight, **kw)

    fns = {("deformops", FWD): d_fwd, ("deformops", BOTH): d_both}
    if torch is not None:
        t = [None if a is None else torch.as_tensor(a, device="cuda") for a in io]
        tgo = torch.as_tensor(go, device="cuda")
        leaves = [None if a is None else a.detach().clone().requires_grad_() for a in t]
        F = torch.nn.functional
        cl = [t[0].detach().clone().requires_grad_(), t[2].detach().clone().requires_grad_(),
              t[3].detach().clone().requires_grad_()]

        def c_fwd():
            with torch.no_grad():
                return F.conv2d(t[0], t[2], t[3], padding=1)

        def c_both():
            out = F.conv2d(*cl, padding=1)
            return out, torch.autograd.grad(out, cl, tgo)

        fns[("cudnn conv2d", FWD)] = c_fwd
        fns[("cudnn conv2d", BOTH)] = c_both
        if tv is not None:
            def tv_fwd():
                with torch.no_grad():
                    return tv.ops.deform_conv2d(t[0], t[1], t[2], t[3], padding=1, mask=t[4])

            def tv_both():
                out = tv.ops.deform_conv2d(*leaves[:4], padding=1, mask=leaves[4])
                return out, torch.autograd.grad(out, [a for a in leaves if a is not None], tgo)

            fns[("torchvision", FWD)] = tv_fwd
            fns[("torchvision", BOTH)] = tv_both
            # check before timing: forward and the input gradient against torchvision
            ours = cupy.asnumpy(d_fwd()).astype("float64")
            if dt == "float32":
                ref = tv_fwd().double().cpu().numpy()
            else:  # half types against float32 torchvision on the same (rounded) inputs
                with torch.no_grad():
                    t32 = [None if a is None else a.float() for a in t]
                    ref = tv.ops.deform_conv2d(t32[0], t32[1], t32[2], t32[3], padding=1,
                                               mask=t32[4]).double().cpu().numpy()
            report.add_check(Check(f"forward vs torchvision, {label}", dt, _rel(ours, ref),
                                   CHECK_TOL[dt], "relative norm error"))
            if dt == "float32":
                _, grads = tv_both()
                ours_g = dops.deform_conv2d_backward(go, x, offset, weight, **kw)
                report.add_check(Check(f"grad input vs torchvision, {label}", dt,
                                       _rel(cupy.asnumpy(ours_g.grad_input),
                                            grads[0].cpu().numpy()),
                                       CHECK_TOL[dt], "relative norm error"))
                report.add_check(Check(f"grad offset vs torchvision, {label}", dt,
                                       _rel(cupy.asnumpy(ours_g.grad_offset),
                                            grads[1].cpu().numpy()),
                                       10 * CHECK_TOL[dt], "relative norm error"))
    for (peer, op), fn in fns.items():
        m = gpu_measure(cupy, fn, op=f"conv {op}", peer=peer, dtype=dt, repeat=repeat)
        nbytes = fwd_bytes if op == FWD else both_bytes
        m.note, _ = _rates(m.median_ms, nbytes, flops if op == FWD else 3 * flops, peaks, dt)
        m.note = f"{label}: {m.note}"
        report.add(m)
    for op in (FWD, BOTH):
        ours = _get(report, f"conv {op}", "deformops", dt, label)
        report.add_ratio(f"torchvision / deformops ({label})", f"conv {op}", dt,
                         _get(report, f"conv {op}", "torchvision", dt, label), ours,
                         (">", 2.0) if op == BOTH else None)
        report.add_ratio(f"deformops / cudnn ({label})", f"conv {op}", dt, ours,
                         _get(report, f"conv {op}", "cudnn conv2d", dt, label),
                         ("<", 2.0) if op == FWD else None)


def _get(report, op, peer, dt, label):
    for m in report.measurements:
        if (m.op, m.peer, m.dtype) == (op, peer, dt) and m.note.startswith(label + ":"):
            return m
    return None


# ----------------------------------------------------------------------------------------------
# sampling


def _bench_sample(report, cupy, torch, dops, shape, dt, peaks, repeat, seed):
    import numpy as np

    N, C, H, W = shape
    dtype = _np_dtype(dt)
    rng = cupy.random.default_rng(seed)
    x = rng.random((N, C, H, W), dtype=np.float32).astype(dtype)
    off = ((rng.random((N, 2, H, W), dtype=np.float32) * 2 - 1) * OFFSET_RANGE).astype(dtype)
    go = rng.standard_normal((N, C, H, W), dtype=np.float32).astype(dtype)
    x_nhwc = cupy.ascontiguousarray(x.transpose(0, 2, 3, 1))
    off_nhwc = cupy.ascontiguousarray(off.transpose(0, 2, 3, 1))
    label = f"N{N} C{C} {H}x{W}"
    item = x.itemsize
    fwd_bytes = (2 * N * C * H * W + N * 2 * H * W) * item
    bwd_bytes = (3 * N * C * H * W + 2 * N * 2 * H * W) * item  # read go, x, off; write gx, goff
    fns = {
        ("sample NCHW forward", "deformops"): (lambda: dops.deform_sample(x, off), fwd_bytes),
        ("sample NHWC forward", "deformops"):
            (lambda: dops.deform_sample(x_nhwc, off_nhwc, layout="NHWC"), fwd_bytes),
        ("sample NCHW backward", "deformops"):
            (lambda: dops.deform_sample_backward(go, x, off), bwd_bytes),
        ("sample NHWC backward", "deformops"):
            (lambda: dops.deform_sample_backward(cupy.ascontiguousarray(go.transpose(0, 2, 3, 1)),
                                                 x_nhwc, off_nhwc, layout="NHWC"), bwd_bytes),
    }
    # cupyx: 4-D coordinates (n, c, y, x) for every output element, order 1
    if dt != "bfloat16":
        from cupyx.scipy import ndimage as cnd

        gy, gx = cupy.meshgrid(cupy.arange(H, dtype=dtype), cupy.arange(W, dtype=dtype),
                               indexing="ij")
        cy = cupy.broadcast_to((gy + off[:, 0])[:, None], (N, C, H, W))
        cx = cupy.broadcast_to((gx + off[:, 1])[:, None], (N, C, H, W))
        cn = cupy.broadcast_to(cupy.arange(N, dtype=dtype)[:, None, None, None], (N, C, H, W))
        cc = cupy.broadcast_to(cupy.arange(C, dtype=dtype)[None, :, None, None], (N, C, H, W))
        coords = cupy.stack([cn, cc, cy, cx])
        ours = cupy.asnumpy(dops.deform_sample(x, off)).astype(np.float64)
        ref = cupy.asnumpy(cnd.map_coordinates(x, coords, order=1, mode="grid-constant",
                                               cval=0.0)).astype(np.float64)
        report.add_check(Check(f"deform_sample vs cupyx map_coordinates, {label}", dt,
                               _rel(ours, ref), CHECK_TOL[dt], "relative norm error"))
        fns[("sample NCHW forward", "cupyx")] = (
            lambda: cnd.map_coordinates(x, coords, order=1, mode="grid-constant", cval=0.0),
            fwd_bytes)
    if torch is not None:
        F = torch.nn.functional
        tx = torch.as_tensor(x, device="cuda")
        toff = torch.as_tensor(off, device="cuda").float()
        gy, gx = torch.meshgrid(torch.arange(H, device="cuda"), torch.arange(W, device="cuda"),
                                indexing="ij")
        grid = torch.stack([(gx + toff[:, 1]) * (2.0 / (W - 1)) - 1,
                            (gy + toff[:, 0]) * (2.0 / (H - 1)) - 1], dim=-1).to(tx.dtype)
        tgo = torch.as_tensor(go, device="cuda")
        lx, lg = tx.detach().clone().requires_grad_(), grid.detach().clone().requires_grad_()

        def gs_fwd():
            with torch.no_grad():
                return F.grid_sample(tx, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=True)

        def gs_bwd():
            out = F.grid_sample(lx, lg, mode="bilinear", padding_mode="zeros", align_corners=True)
            return torch.autograd.grad(out, [lx, lg], tgo)

        ours = cupy.asnumpy(dops.deform_sample(x, off)).astype(np.float64)
        report.add_check(Check(f"deform_sample vs grid_sample, {label}", dt,
                               _rel(ours, gs_fwd().double().cpu().numpy()),
                               max(CHECK_TOL[dt], 1e-4 if dt == "float32" else 0), "relative norm"))
        fns[("sample NCHW forward", "grid_sample")] = (gs_fwd, fwd_bytes)
        fns[("sample NCHW backward", "grid_sample")] = (gs_bwd, bwd_bytes)
    for (op, peer), (fn, nbytes) in fns.items():
        m = gpu_measure(cupy, fn, op=op, peer=peer, dtype=dt, repeat=repeat)
        m.note, frac = _rates(m.median_ms, nbytes, 0, peaks, dt)
        m.note = f"{label}: {m.note}"
        report.add(m)
        if peer == "deformops" and "forward" in op:
            report.ratios.append(Ratio(f"bandwidth / copy peak ({label})", op, dt, frac,
                                       (">", 0.7)))
    for op in ("sample NCHW forward", "sample NCHW backward"):
        ours = _get(report, op, "deformops", dt, label)
        for peer in ("cupyx", "grid_sample"):
            report.add_ratio(f"{peer} / deformops ({label})", op, dt,
                             _get(report, op, peer, dt, label), ours)


# ----------------------------------------------------------------------------------------------


def run(args) -> _timing.Report:
    cupy = _require_gpu()
    import deformops as dops

    dtypes = tuple(args.gpu_dtype or GPU_DTYPES)
    repeat = args.repeat or REPEAT
    torch, why_torch = _timing.optional_import("torch")
    tv = None
    if torch is not None and not torch.cuda.is_available():
        torch, why_torch = None, "torch sees no GPU"
    if torch is not None:
        tv, why_tv = _timing.optional_import("torchvision")
        # float32 peers in full float32, as deformops (CuPy's cuBLAS calls do not use TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    report = _timing.Report("gpu", config={
        "device": name, "sm": f"{props['major']}{props['minor']}",
        "multiprocessors": props["multiProcessorCount"], "cupy": cupy.__version__,
        "torch": getattr(torch, "__version__", why_torch), "repeat": repeat,
        "dtypes": ",".join(dtypes),
    })
    _timing.progress(f"device: {name}; measuring peaks")
    peaks = measure_peaks(cupy, dtypes)
    _free(cupy, torch)
    rates = ", ".join(f"{dt} {peaks[f'matmul_flops_{dt}'] / 1e12:.0f} TFLOP/s" for dt in dtypes)
    report.notes.append(f"measured copy bandwidth {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s "
                        f"(read + write); matmul {rates}")
    report.config.update({k: f"{v:.4g}" for k, v in peaks.items()})
    report.notes.append("float32 everywhere in full float32: TF32 is off for cuDNN and torch "
                        "matmuls, as in CuPy's cuBLAS calls")
    shapes = (QUICK_CONV_SHAPE,) if args.quick else CONV_SHAPES
    sample_shape = QUICK_SAMPLE_SHAPE if args.quick else SAMPLE_SHAPE
    for dt in dtypes:
        for shape in shapes:
            _timing.progress(f"deform_conv2d {_label(shape)} {dt}")
            _bench_conv(report, cupy, torch, tv, dops, shape, dt, peaks, repeat, args.seed)
            _free(cupy, torch)
        _timing.progress(f"sampling {sample_shape} {dt}")
        _bench_sample(report, cupy, torch, dops, sample_shape, dt, peaks, repeat, args.seed)
        _free(cupy, torch)
    if torch is None:
        report.notes.append(f"torch peers skipped: {why_torch}")
    elif tv is None:
        report.notes.append("torchvision peer skipped: not importable")
    return report
