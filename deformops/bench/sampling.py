"""Time ``deformops.sample`` and ``sample_backward`` against scipy and torch, in one run.

Workload (defaults): N=8 images of C=64 channels, 64x64 -> 64x64 sample points, G=1 coordinate
group, order 1 (bilinear), mode 'grid-constant', cval 0; coordinates uniform over the image plus
a margin of 2 pixels on every side (y, x in [-2, 65]), so that out-of-image and partly-outside
points are exercised too. ``--groups G`` gives every group of C/G channels its own coordinates;
``--groups C`` is per-channel sampling, as in the original project's ``ConvOffset2D``.

Peers:

- ``scipy.ndimage.map_coordinates`` looped over the N*C planes (forward only; single-threaded);
- ``torch.nn.functional.grid_sample`` (bilinear, padding_mode='zeros', align_corners=False) on
  the CPU, forward and backward through autograd (gradients of input and grid), when torch is
  importable; with G groups it samples the (N*G, C/G, H, W) view of the input with one grid per
  group, the usual way to give groups or channels their own grid. Pixel coordinates map to
  its normalised grid as ``(x + 0.5) / W * 2 - 1``; the outputs (and, in float64, both
  gradients) are compared with deformops before timing.
"""

from __future__ import annotations

import time

from . import _timing
from ._timing import Check, Task

HELP = "sample / sample_backward vs scipy.ndimage.map_coordinates and torch grid_sample"

FAST_REPEAT = 20  # deformops and torch
SLOW_REPEAT = 3  # the scipy loop over planes
MARGIN = 2.0  # pixels of coordinates outside the image on every side

# agreement required before a peer is timed: forward max abs error (inputs in [0, 1))
FORWARD_TOL = {"float32": 1e-5, "float64": 1e-10}
SCIPY_TOL = {"float32": 1e-6, "float64": 1e-12}
GRAD_TOL = 1e-10  # float64 gradients vs torch, relative to the largest reference magnitude

MODE = "grid-constant"
ORDER = 1
OPS = ("forward", "backward", "forward+backward")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("sample options")
    g.add_argument(
        "--size",
        nargs=4,
        type=_timing.positive_int,
        default=(8, 64, 64, 64),
        metavar=("N", "C", "H", "W"),
        help="batch, channels, height, width; the output has H x W sample points "
        "(default: 8 64 64 64)",
    )
    g.add_argument(
        "--groups",
        type=_timing.positive_int,
        default=1,
        metavar="G",
        help="coordinate groups, a divisor of C; G = C samples every channel at its own "
        "coordinates (default: 1)",
    )
    g.add_argument("--seed", type=_timing.seed_int, default=0,
                   help="seed of the random data (default: 0)")
    g.add_argument("--no-scipy", action="store_true", help="skip the scipy peer")
    g.add_argument("--no-torch", action="store_true", help="skip the torch peer")


def make_data(N, C, H, W, seed=0, G=1):
    """float64 input in [0, 1), coordinates (N, 2G, H, W) in [-MARGIN, n - 1 + MARGIN], and a
    standard-normal output gradient."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((N, C, H, W))
    coords = np.empty((N, 2 * G, H, W))
    coords[:, 0::2] = rng.uniform(-MARGIN, H - 1 + MARGIN, size=(N, G, H, W))  # y (row)
    coords[:, 1::2] = rng.uniform(-MARGIN, W - 1 + MARGIN, size=(N, G, H, W))  # x (col)
    grad_out = rng.standard_normal((N, C, H, W))
    return x, coords, grad_out


def pixel_to_grid(coords, H, W):
    """deformops pixel coordinates (N, 2G, Ho, Wo), y first, -> grid_sample's normalised grid
    (N*G, Ho, Wo, 2), x first, for ``align_corners=False``. Computed in float64, returned in the
    dtype of ``coords``."""
    import numpy as np

    N, G2, Ho, Wo = coords.shape
    c = coords.astype(np.float64).reshape(N * G2 // 2, 2, Ho, Wo)
    gx = (c[:, 1] + 0.5) / W * 2.0 - 1.0
    gy = (c[:, 0] + 0.5) / H * 2.0 - 1.0
    return np.ascontiguousarray(np.stack([gx, gy], axis=-1).astype(coords.dtype))


def grid_grad_to_pixel(grad_grid, H, W, N):
    """Gradient w.r.t. the normalised grid (N*G, Ho, Wo, 2) -> w.r.t. pixel coords
    (N, 2G, Ho, Wo)."""
    import numpy as np

    g = np.stack([grad_grid[..., 1] * (2.0 / H), grad_grid[..., 0] * (2.0 / W)], axis=1)
    return g.reshape(N, -1, *g.shape[2:])


def by_group(a, G):
    """(N, C, ...) -> the (N*G, C/G, ...) view that grid_sample samples with one grid per group."""
    return a.reshape(a.shape[0] * G, a.shape[1] // G, *a.shape[2:])


def _max_abs(a, b):
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def _rel_err(a, ref):
    import numpy as np

    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    return _max_abs(a, ref) / scale


def scipy_loop(ndi, x, coords, out):
    """``map_coordinates`` over every (image, channel) plane, at its group's coordinates."""
    import numpy as np

    N, C = x.shape[:2]
    cpg = C // (coords.shape[1] // 2)
    for n in range(N):
        cn = np.asarray(coords[n], np.float64)  # converted once per image, not once per plane
        for c in range(C):
            g = c // cpg
            ndi.map_coordinates(
                x[n, c],
                cn[2 * g : 2 * g + 2],
                output=out[n, c],
                order=ORDER,
                mode=MODE,
                cval=0.0,
                prefilter=False,
            )
    return out


def run(args) -> _timing.Report:
    import deformops as dops

    N, C, H, W = args.size
    G = args.groups
    if C % G:
        raise SystemExit(f"--groups {G} must divide the {C} channels of --size")
    fast = args.repeat or FAST_REPEAT
    slow = args.repeat or SLOW_REPEAT

    report = _timing.Report(
        command="sample",
        config={
            "N": N,
            "C": C,
            "H": H,
            "W": W,
            "Ho": H,
            "Wo": W,
            "G": G,
            "order": ORDER,
            "mode": MODE,
            "cval": 0.0,
            "coords": f"uniform in [{-MARGIN:g}, {H - 1 + MARGIN:g}] x "
            f"[{-MARGIN:g}, {W - 1 + MARGIN:g}]",
            "threads": args.threads,
            "repeat": f"{fast} (scipy {slow})",
            "seed": args.seed,
        },
    )

    ndi = torch = None
    if not args.no_scipy:
        ndi, why = _timing.optional_import("scipy.ndimage")
        if ndi is None:
            report.notes.append(f"scipy peer skipped: scipy is not importable ({why})")
    else:
        report.notes.append("scipy peer skipped (--no-scipy)")
    if not args.no_torch:
        torch, why = _timing.load_torch(args.threads)
        if torch is None:
            report.notes.append(f"torch peer skipped: torch is not importable ({why})")
    else:
        report.notes.append("torch peer skipped (--no-torch)")
    for n in report.notes:
        print(n, flush=True)

    x64, c64, g64 = make_data(N, C, H, W, args.seed, G)

    if torch is not None:
        _check_torch_grads(report, dops, torch, x64, c64, g64)

    for dtype in args.dtypes:
        _timing.progress(f"[{dtype}]")
        _bench_dtype(
            report,
            dops,
            ndi,
            torch,
            x64.astype(dtype),
            c64.astype(dtype),
            g64.astype(dtype),
            fast,
            slow,
        )

    who = "deformops and torch use" if torch is not None else "deformops uses"
    if ndi is not None:
        report.notes.append(
            f"scipy.ndimage.map_coordinates runs on one thread; {who} {args.threads}."
        )
    report.notes.append(
        "backward = sample_backward (grad x and grad coords) for deformops"
        + (
            ", torch.autograd.grad of input and grid (graph kept) for torch; "
            "forward+backward includes a fresh forward for both."
            if torch is not None
            else "."
        )
    )
    if torch is not None and G > 1:
        report.notes.append(
            f"torch grid_sample samples the ({N * G}, {C // G}, {H}, {W}) view of the input, "
            "one grid per group."
        )
    report.notes.append(
        "first call (JIT): the warm-up call; for deformops it includes Numba "
        "compilation, or only loading the kernels when Numba's on-disk cache "
        "already holds them."
    )
    if torch is not None:
        report.notes.append(
            "deformops and torch are timed in interleaved rounds (one call of "
            "each per round, every other round in reverse order); their ratios are "
            "medians of the per-round ratios "
            "(a slow spell of the machine hits both calls of a round); min ms is "
            "the least disturbed time on a busy machine."
        )
    return report


def _bench_dtype(report, dops, ndi, torch, x, coords, grad_out, fast, slow):
    """Checks, timings and ratios of one dtype."""
    import numpy as np

    dtype = x.dtype.name
    N, C = x.shape[:2]

    def d_fwd():
        return dops.sample(x, coords, order=ORDER, mode=MODE, cval=0.0)

    def d_bwd():
        return dops.sample_backward(grad_out, x, coords, order=ORDER, mode=MODE, cval=0.0)

    def d_both():
        out = d_fwd()
        return out, d_bwd()

    t0 = time.perf_counter_ns()
    ref = d_fwd()  # the reference of the checks; its time is the forward's first call
    first_fwd_ms = (time.perf_counter_ns() - t0) / 1e6
    tasks = [
        Task(d_fwd, "forward", "deformops"),
        Task(d_bwd, "backward", "deformops", "grad x + grad coords"),
        Task(d_both, "forward+backward", "deformops"),
    ]
    if torch is not None:
        tasks += _torch_tasks(report, torch, x, coords, grad_out, ref, dtype)
    # deformops and torch in interleaved rounds: a busy spell of the machine hits both alike
    timed = {
        (m.op, m.peer): m for m in _timing.measure_interleaved(tasks, dtype=dtype, repeat=fast, alternate=True)
    }
    timed["forward", "deformops"].first_ms = first_fwd_ms
    for op in OPS:
        report.add(timed[op, "deformops"])

    s_f = None
    if ndi is not None:
        out = np.empty_like(x)
        scipy_loop(ndi, x, coords, out)
        report.add_check(
            Check(
                "scipy map_coordinates vs deformops sample, forward",
                dtype,
                _max_abs(out, ref),
                SCIPY_TOL[dtype],
            )
        )
        s_f = report.add(
            _timing.measure(
                lambda: scipy_loop(ndi, x, coords, out),
                op="forward",
                peer="scipy",
                dtype=dtype,
                repeat=slow,
                note=f"loop over {N * C} planes, 1 thread",
            )
        )
    for op in OPS:
        if (op, "torch") in timed:
            report.add(timed[op, "torch"])

    d_f, d_b = timed["forward", "deformops"], timed["backward", "deformops"]
    t_f, t_b = timed.get(("forward", "torch")), timed.get(("backward", "torch"))
    report.add_ratio("scipy / deformops", "forward", dtype, s_f, d_f, (">", 1.0))
    for op in OPS:
        report.add_ratio(
            "deformops / torch",
            op,
            dtype,
            timed[op, "deformops"],
            timed.get((op, "torch")),
            ("<", 1.2),
        )
    report.add_ratio("backward / forward", "deformops", dtype, d_b, d_f)
    report.add_ratio("backward / forward", "torch", dtype, t_b, t_f)


def _torch_sample(torch, xt, grid):
    return torch.nn.functional.grid_sample(
        xt, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def _check_torch_grads(report, dops, torch, x, coords, grad_out):
    """float64: both gradients of grid_sample (mapped to pixel units) against sample_backward."""
    N, C, H, W = x.shape
    G = coords.shape[1] // 2
    xt = torch.from_numpy(by_group(x, G)).requires_grad_()
    gt = torch.from_numpy(pixel_to_grid(coords, H, W)).requires_grad_()
    out = _torch_sample(torch, xt, gt)
    gx_t, gg_t = torch.autograd.grad(out, (xt, gt), torch.from_numpy(by_group(grad_out, G)))
    gx_d, gc_d = dops.sample_backward(grad_out, x, coords, order=ORDER, mode=MODE, cval=0.0)
    gx_t = gx_t.reshape(x.shape)
    gc_t = grid_grad_to_pixel(gg_t.numpy(), H, W, N)
    report.add_check(
        Check(
            "torch grid_sample vs deformops sample_backward, grad x",
            "float64",
            _rel_err(gx_d, gx_t.numpy()),
            GRAD_TOL,
            "relative to max |grad|",
        )
    )
    report.add_check(
        Check(
            "torch grid_sample vs deformops sample_backward, grad coords",
            "float64",
            _rel_err(gc_d, gc_t),
            GRAD_TOL,
            "relative to max |grad|",
        )
    )


def _torch_tasks(report, torch, x, coords, grad_out, ref, dtype):
    """Check grid_sample's forward against ``ref`` (deformops), then return its timing tasks."""
    H, W = x.shape[2:]
    G = coords.shape[1] // 2
    xt = torch.from_numpy(by_group(x, G))
    grid = torch.from_numpy(pixel_to_grid(coords, H, W))
    got = torch.from_numpy(by_group(grad_out, G))

    with torch.no_grad():
        out = _torch_sample(torch, xt, grid).numpy().reshape(ref.shape)
    report.add_check(
        Check(
            "torch grid_sample vs deformops sample, forward",
            dtype,
            _max_abs(out, ref),
            FORWARD_TOL[dtype],
        )
    )

    def t_fwd():
        with torch.no_grad():
            return _torch_sample(torch, xt, grid)

    xr = xt.detach().clone().requires_grad_()
    gr = grid.detach().clone().requires_grad_()
    kept = _torch_sample(torch, xr, gr)

    def t_bwd():
        return torch.autograd.grad(kept, (xr, gr), got, retain_graph=True)

    def t_both():
        return torch.autograd.grad(_torch_sample(torch, xr, gr), (xr, gr), got)

    note = "autograd: grad input + grad grid"
    return [
        Task(t_fwd, "forward", "torch", "grid_sample, no_grad"),
        Task(t_bwd, "backward", "torch", note),
        Task(t_both, "forward+backward", "torch", note),
    ]
