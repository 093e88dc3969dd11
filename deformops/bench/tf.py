"""Time the TensorFlow adapter (``deformops_tf``): its framework overhead over the NumPy op.

Workload (defaults): 3x3 deformable convolutions, stride 1, 'same' padding (1), one offset group,
bias on, float32, NHWC (TensorFlow's layout):

- N=8, 64 -> 64 channels, 28x28, v2 (with mask);
- N=4, 16 -> 16 channels, 16x16, v2 (small: the fixed per-call cost shows).

Data as ``python -m deformops.bench conv`` (offsets uniform in [-2, 2] px, mask uniform in
[0, 1]), transposed to NHWC. Measured per shape, each callable in blocks of its own, as
``model.fit`` runs its steps (two passes over the callables, the second in reverse order; per
block one warm-up call, then at least --repeat/2 calls and --min-time/2 seconds):

- numpy op: ``deformops.deform_conv2d`` + ``deform_conv2d_backward`` (all five gradients) on
  NumPy arrays in NHWC, the reference of the overhead ratios; and the same in NCHW, the core's
  native layout (information);
- tf op, eager / tf.function: ``deformops_tf.deform_conv2d`` on tensors under a
  ``tf.GradientTape`` with the gradients of all five inputs, eagerly and inside ``tf.function``
  (where it runs in a ``tf.py_function``, as in ``model.fit``);
- py_function floor: the tf.function op's structure (custom gradient, a ``tf.py_function`` each
  way) with do-nothing bodies: what any op built on ``tf.py_function`` pays, whatever it does;
  the tf.function op minus this floor is deformops_tf's own part (information);
- DeformConv2D step: one Keras training step (``model.train_on_batch``: the compiled
  ``train_step`` of ``model.fit``: forward, MSE loss, backward, SGD update) of a model that is
  one ``deformops_tf.DeformConv2D`` layer (its own offset/mask predictor conv included);
- predictor step: the same step of a model that is the DeformConv2D layer's offset/mask
  predictor alone (a ``Conv2D`` with 2K or 3K outputs); the DeformConv2D step minus this one
  is what the deformable op itself costs inside ``model.fit`` (information);
- Conv2D step: the same step of a ``keras.layers.Conv2D`` model of the same shape (the floor).

Target: the layer's training step costs at most 1.2x the NumPy op (framework overhead, offset
predictor and optimizer included, at most 20%). Before timing, the TF op's forward and gradients
are checked against the NumPy op at each shape (float32; the adapter calls the same kernels, so
the difference must be 0 up to summation order of the tape); the command exits 1 on a mismatch.
"""

from __future__ import annotations

import time

from . import _timing
from ._timing import Check, Ratio, Task

HELP = "deformops_tf: DeformConv2D / deform_conv2d in TensorFlow vs the NumPy op and Conv2D"

REPEAT = 10
MIN_TIME = 1.0  # seconds of timed calls per callable at least
DEFAULT_DTYPE = "float32"
DEFAULT_SHAPES = ((8, 64, 64, 28, 28, True), (4, 16, 16, 16, 16, True))
CHECK_TOL = {"float32": 1e-5, "float64": 1e-12}  # relative to max |reference|

NUMPY, NUMPY_NCHW = "numpy op", "numpy op NCHW"
EAGER, GRAPH = "tf op eager", "tf op tf.function"
LAYER, CONV = "DeformConv2D step", "Conv2D step"
PRED = "predictor step"
FLOOR = "py_function floor"
TARGETS = {
    (GRAPH, NUMPY): ("<", 1.2),
    (LAYER, NUMPY): ("<", 1.2),
    (EAGER, NUMPY): None,
    (NUMPY, NUMPY_NCHW): None,
    (LAYER, CONV): None,
}


def add_arguments(parser) -> None:
    from .conv import _set_dtype_default, _shape

    _set_dtype_default(parser, DEFAULT_DTYPE)
    g = parser.add_argument_group("tf options")
    g.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=None,
        metavar="N,CIN,COUT,H,W,v1|v2",
        help="a 3x3 'same' case to time instead of the defaults (repeatable); v1 = no mask, "
        "v2 = mask (default: 8,64,64,28,28,v2 4,16,16,16,16,v2)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random data (default: 0)")
    g.add_argument(
        "--min-time", type=float, default=MIN_TIME, metavar="SECONDS",
        help="time each callable for at least --repeat calls and this many seconds "
        f"(default: {MIN_TIME:g})",
    )


def _label(shape) -> str:
    from .conv import _label

    return _label(shape)


def _nhwc(a):
    import numpy as np

    return None if a is None else np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _make_case(shape, dtype, seed):
    """NHWC float arrays (x, offset, filters [3, 3, Cin, Cout], bias, mask or None, grad_out) and
    the NCHW originals."""
    from .conv import _cast, make_data

    nchw = _cast(make_data(*shape, seed=seed), dtype)
    x, offset, weight, bias, mask, grad_out = nchw
    nhwc = (_nhwc(x), _nhwc(offset), weight.transpose(2, 3, 1, 0).copy(), bias, _nhwc(mask),
            _nhwc(grad_out))
    return nhwc, nchw


def _numpy_fn(dops, x, offset, weight, bias, mask, grad_out, layout):
    def both():
        kw = dict(stride=1, padding=1, dilation=1, mask=mask, layout=layout)
        out = dops.deform_conv2d(x, offset, weight, bias, **kw)
        return out, dops.deform_conv2d_backward(grad_out, x, offset, weight,
                                                needs_input_grad=(True,) * 5, **kw)

    return both


def _tf_op_fns(tf, dtf, arrays):
    x, offset, filters, bias, mask, grad_out = [None if a is None else tf.constant(a)
                                                for a in arrays]
    leaves = [a for a in (x, offset, filters, bias, mask) if a is not None]

    def both():
        with tf.GradientTape() as tape:
            tape.watch(leaves)
            out = dtf.deform_conv2d(x, offset, filters, bias, padding=1, mask=mask)
        return out, tape.gradient(out, leaves, output_gradients=grad_out)

    return both, tf.function(both)


def _py_function_floor(tf, arrays, out_shape):
    """The tf.function op's structure with do-nothing bodies: a ``tf.custom_gradient`` whose
    forward and backward are ``tf.py_function`` calls that only allocate their outputs (zeros),
    under a GradientTape. What any op built on ``tf.py_function`` pays per forward + backward."""
    x, offset, filters, bias, mask, grad_out = [None if a is None else tf.constant(a)
                                                for a in arrays]
    leaves = [a for a in (x, offset, filters, bias, mask) if a is not None]
    dtype = x.dtype

    @tf.custom_gradient
    def op(*inputs):
        out = tf.py_function(lambda *a: tf.zeros(out_shape, dtype), list(inputs), dtype)
        out.set_shape(out_shape)

        def grad(dy):
            gs = tf.py_function(lambda *a: [tf.zeros_like(t) for t in a[1:]], [dy, *inputs],
                                [dtype] * len(inputs))
            for g, t in zip(gs, inputs):
                g.set_shape(t.shape)
            return gs

        return out, grad

    def both():
        with tf.GradientTape() as tape:
            tape.watch(leaves)
            out = op(*leaves)
        return out, tape.gradient(out, leaves, output_gradients=grad_out)

    return tf.function(both)


def _keras_steps(tf, keras, dtf, shape, dtype, x, seed):
    """``train_on_batch`` callables of a DeformConv2D model, a model of its offset/mask
    predictor alone (a Conv2D with as many outputs: 3x3, 'same', 2K or 3K channels) and a
    Conv2D model of the same shape."""
    N, Cin, Cout, H, W, has_mask = shape
    import numpy as np

    n_pred = (3 if has_mask else 2) * 9
    steps = []
    for layer, channels in (
            (dtf.DeformConv2D(Cout, 3, padding="same", use_mask=has_mask, dtype=dtype), Cout),
            (keras.layers.Conv2D(n_pred, 3, padding="same", dtype=dtype), n_pred),
            (keras.layers.Conv2D(Cout, 3, padding="same", dtype=dtype), Cout)):
        y = np.random.default_rng(seed + 2).standard_normal((N, H, W, channels)).astype(dtype)
        keras.utils.set_random_seed(seed)
        inp = keras.Input((H, W, Cin), dtype=dtype)
        model = keras.Model(inp, layer(inp))
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=False)
        xt, yt = tf.constant(x), tf.constant(y)
        steps.append(lambda model=model, xt=xt, yt=yt: model.train_on_batch(xt, yt))
    return steps


def _rel_err(got, ref):
    import numpy as np

    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    return float(np.max(np.abs(got - ref), initial=0.0)) / scale


def _check(report, label, dtype, tf_both, np_both):
    out_t, grads_t = tf_both()
    out_n, g = np_both()
    ref_grads = [g.grad_input, g.grad_offset, g.grad_weight.transpose(2, 3, 1, 0), g.grad_bias]
    if g.grad_mask is not None:
        ref_grads.append(g.grad_mask)
    errs = [_rel_err(out_t.numpy(), out_n)]
    errs += [_rel_err(a.numpy(), b) for a, b in zip(grads_t, ref_grads)]
    if len(grads_t) != len(ref_grads):
        errs.append(float("inf"))
    report.add_check(Check(f"tf.function op vs numpy op, {label}, forward and all gradients",
                           dtype, max(errs), CHECK_TOL[dtype], "max relative error"))


def run(args) -> _timing.Report:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    import deformops as dops
    import deformops_tf as dtf

    repeat = args.repeat or REPEAT
    shapes = tuple(args.shape) if args.shape else DEFAULT_SHAPES
    report = _timing.Report(
        command="tf",
        config={
            "cases": "; ".join(_label(s) for s in shapes),
            "kernel": "3x3",
            "padding": "same (1)",
            "layout": "NHWC",
            "threads": args.threads,
            "repeat": repeat,
            "min time (s)": args.min_time,
            "seed": args.seed,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    )
    for dtype in args.dtypes:
        for shape in shapes:
            _bench_case(report, tf, keras, dops, dtf, shape, dtype, repeat, args.min_time,
                        args.seed)
    report.notes.append(
        "every row times forward + backward with the gradients of x, offset, filters, bias and "
        "mask; the Keras steps also run the loss, the offset predictor (DeformConv2D) and an SGD "
        "update. Each callable is timed in blocks of its own, 0.3 s apart, as model.fit runs "
        "its steps: two passes over the callables, the second in reverse order, each block one "
        "warm-up call then at least --repeat/2 calls and --min-time/2 seconds; the median is "
        "over both blocks' calls. Ratios are ratios of the medians. "
        "'(min ms)' ratios compare the least disturbed calls. Targets: tf.function op / numpy "
        "op < 1.2 and DeformConv2D step / numpy op < 1.2 (framework overhead at most 20%)."
    )
    return report


def _net_ratio(report, label, dtype, timed, peer, minus):
    """Add ``(peer - minus) / numpy op`` from the three medians (information, no target)."""
    a, b, c = timed.get(peer), timed.get(minus), timed.get(NUMPY)
    if a is None or b is None or c is None or c.median_ms <= 0:
        return
    value = (a.median_ms - b.median_ms) / c.median_ms
    report.ratios.append(Ratio(f"({peer} - {minus}) / {NUMPY}", label, dtype, value))


def _bench_case(report, tf, keras, dops, dtf, shape, dtype, repeat, min_time, seed):
    label = _label(shape)
    _timing.progress(f"[{dtype}] {label}")
    (x, offset, filters, bias, mask, grad_out), nchw = _make_case(shape, dtype, seed)
    weight = filters.transpose(3, 2, 0, 1).copy()
    np_both = _numpy_fn(dops, x, offset, weight, bias, mask, grad_out, "NHWC")
    np_nchw = _numpy_fn(dops, nchw[0], nchw[1], nchw[2], nchw[3], nchw[4], nchw[5], "NCHW")
    eager, graph = _tf_op_fns(tf, dtf, (x, offset, filters, bias, mask, grad_out))
    _check(report, label, dtype, graph, np_both)
    layer_step, pred_step, conv_step = _keras_steps(tf, keras, dtf, shape, dtype, x, seed)
    tasks = [
        Task(np_both, f"{label}", NUMPY, "NHWC, all 5 gradients"),
        Task(np_nchw, f"{label}", NUMPY_NCHW, "the core's native layout"),
        Task(eager, f"{label}", EAGER, "GradientTape, DLPack"),
        Task(graph, f"{label}", GRAPH, "tf.py_function inside"),
        Task(_py_function_floor(tf, (x, offset, filters, bias, mask, grad_out), grad_out.shape),
             f"{label}", FLOOR, "do-nothing py_function op, same structure"),
        Task(layer_step, f"{label}", LAYER, "train_on_batch, SGD"),
        Task(pred_step, f"{label}", PRED, "its offset/mask predictor alone"),
        Task(conv_step, f"{label}", CONV, "train_on_batch, SGD"),
    ]
    timed = {}
    # Each callable in a block of its own, as model.fit runs its steps. In rounds, calls from the
    # main thread (the NumPy op, the eager op) and from TF's threads (tf.function bodies, handed
    # to the adapter's worker thread) took turns, and each switch cost both sides the other
    # thread's OpenMP team and workspace: the NumPy op measured 35 ms instead of 22, the
    # tf.function op 40 instead of 25 (N=8, 64 channels, 28x28) -- a cost model.fit never pays.
    # Two passes, the second in reverse order, each block half of --min-time: a slow spell of
    # the machine, or what the previous block leaves behind, falls on each callable alike.
    blocks = {}
    for pass_tasks in (tasks, tasks[::-1]):
        for task in pass_tasks:
            time.sleep(0.3)
            (m,) = _timing.measure_interleaved([task], dtype=dtype, repeat=max(1, repeat // 2),
                                               min_s=min_time / 2)
            blocks.setdefault(task.peer, []).append(m)
    for task in tasks:
        timed[task.peer] = report.add(_timing.merge_blocks(blocks[task.peer]))
    for (num, den), target in TARGETS.items():
        report.add_ratio(f"{num} / {den}", label, dtype, timed.get(num), timed.get(den), target)
    # The deformable op's share of the Keras step (its predictor alone taken out: loss, update
    # and the predictor conv cancel), and the tf.function op net of TF's py_function floor.
    _net_ratio(report, label, dtype, timed, LAYER, PRED)
    _net_ratio(report, label, dtype, timed, GRAPH, FLOOR)
    for num in (GRAPH, LAYER):  # the least disturbed times, for busy machines
        a, b = timed.get(num), timed.get(NUMPY)
        if a is not None and b is not None and b.min_ms > 0:
            report.ratios.append(Ratio(f"{num} / {NUMPY} (min ms)", label, dtype,
                                       a.min_ms / b.min_ms))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run it as: python -m deformops.bench tf")
