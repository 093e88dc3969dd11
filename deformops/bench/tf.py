"""Time the TensorFlow adapter (``deformops_tf``): its framework overhead over the NumPy op.

Workload (defaults): 3x3 deformable convolutions, stride 1, 'same' padding (1), one offset group,
bias on, float32, NHWC (TensorFlow's layout):

- N=8, 64 -> 64 channels, 28x28, v2 (with mask);
- N=4, 16 -> 16 channels, 16x16, v2 (small: the fixed per-call cost shows).

Data as ``python -m deformops.bench conv`` (offsets uniform in [-2, 2] px, mask uniform in
[0, 1]), transposed to NHWC. Measured per shape, each callable in blocks of its own, as
``model.fit`` runs its steps (--passes passes over the callables, 8 by default, every other one
in reverse order; per block one warm-up call, then at least --repeat/passes calls and
--min-time/passes seconds):

- numpy op: ``deformops.deform_conv2d`` + ``deform_conv2d_backward`` (all five gradients) on
  NumPy arrays in NHWC, the reference of the overhead ratios; the same without the input
  gradient (what a model's first layer needs); and the same in NCHW, the core's native layout
  (information);
- tf op, eager / tf.function: ``deformops_tf.deform_conv2d`` on tensors under a
  ``tf.GradientTape`` with the gradients of all five inputs, eagerly and inside ``tf.function``
  (where it runs in a ``tf.numpy_function``, as in ``model.fit``);
- numpy_function floor: the tf.function op's structure (custom gradient, a
  ``tf.numpy_function`` each way) with bodies that return preallocated outputs: what any op
  built on ``tf.numpy_function`` pays for its calls, before it allocates or computes anything;
  the tf.function op minus this floor is deformops_tf's own part, output allocation included
  (information);
- DeformConv2D step: one Keras training step (``model.train_on_batch``: the compiled
  ``train_step`` of ``model.fit``: forward, MSE loss, backward, SGD update) of a model that is
  one ``deformops_tf.DeformConv2D`` layer (its own offset/mask predictor conv included). It is
  the model's first layer: no one needs its input's gradient, and it skips it;
- DeformConv2D step, 2nd layer: the same after a 1x1 ``DepthwiseConv2D`` (a per-channel scale
  with weights), so that the step needs the layer's input gradient too;
- predictor step (1st / 2nd layer): the same steps with the DeformConv2D layer replaced by its
  offset/mask predictor alone (a ``Conv2D`` with as many outputs: 3x3, 'same', 2K or 3K);
- DeformConv2D step, kernels slept (1st / 2nd layer): the same steps of fresh models with each
  kernel call replaced by a sleep of the NumPy op's own forward or backward time (the median so
  far of the "numpy op" rows' calls, timed apart, warm-up calls left out), returning fresh
  copies of a real call's results (``deformops.bench._stand_ins``). Everything but the kernels
  runs: TF, the graph nodes, the adapter's hand-over and conversions. Their ratios are TF's and
  the adapter's share of the layer ratios: the overhead if the kernel calls cost inside the
  step exactly what they cost alone (and left the cores idle meanwhile);
- Conv2D step: the same step of a ``keras.layers.Conv2D`` model of the same shape;
- Keras step, bias only (and: of the predictor's size): the same step of a model that is one
  per-channel bias (``x + b``) with the DeformConv2D's (the predictor's) output size: Keras'
  fixed cost per step, the MSE loss on that output and the loss's gradient (which the NumPy op
  is handed as ``grad_out``), plus the bias' add and sum, about 0.1 ms.

Framework overhead, for the same work. A step's *net* time is its time minus the step of the
bias model of its output size; the DeformConv2D net is the DeformConv2D step's net time
minus the predictor step's net time (the predictor's conv and update cancel). It is compared
with the NumPy op with the gradients that step computes: four as the first layer, all five as
the second. Targets, at the representative shape (N=8, 64 channels, 28x28; at other shapes the
ratios are information): both at most 1.2x (framework overhead at most 20%), and the
tf.function op at most 1.2x the NumPy op. The same two ratios are also taken within each pass,
from its blocks' medians: their median and range over the passes (information) show how far the
machine's own noise moves them in this run; and a 90% bootstrap interval of each (resampling
whole passes, 2000 times) says how far that noise leaves the reported ratio uncertain: a verdict
whose interval holds 1.2 is the noise's as much as the code's (more passes narrow it).
Information: the same two ratios with the kernels slept (see above: TF's and the adapter's
share), with their 90% intervals; the kernel calls' own time inside the real layer steps
(measured around each call, the sum of each call's median) over the same calls' in the NumPy op
(1.0 where the kernels run as fast in the step as alone); and what the layer costs in
``model.fit``, its predictor included (the DeformConv2D step's net time, the predictor not taken
out). At the small shape (a 1 ms op) TF's fixed cost per step shows instead: two
``tf.numpy_function`` calls and the predictor conv's dispatch come to more than 20% of the op.

Before timing, the TF op's forward and gradients are checked against the NumPy op at each shape
(float32; the adapter calls the same kernels, so the difference must be 0 up to summation order
of the tape); the command exits 1 on a mismatch.
"""

from __future__ import annotations

import functools
import statistics
import time

from . import _stand_ins, _timing
from ._timing import Check, Ratio, Task

HELP = "deformops_tf: DeformConv2D / deform_conv2d in TensorFlow vs the NumPy op and Conv2D"

REPEAT = 10
MIN_TIME = 1.0  # seconds of timed calls per callable at least
PASSES = 8  # blocks per callable, in passes of alternating order (default of --passes)
BOOTSTRAP = 2000  # resamples of the passes for the layer ratios' 90% intervals
DEFAULT_DTYPE = "float32"
DEFAULT_SHAPES = ((8, 64, 64, 28, 28, True), (4, 16, 16, 16, 16, True))
TARGET_SHAPE = DEFAULT_SHAPES[0]  # the representative layer: targets are set here
CHECK_TOL = {"float32": 1e-5, "float64": 1e-12}  # relative to max |reference|

NUMPY, NUMPY_NCHW = "numpy op", "numpy op NCHW"
NUMPY_NO_X = "numpy op, no x grad"
EAGER, GRAPH = "tf op eager", "tf op tf.function"
LAYER, CONV = "DeformConv2D step", "Conv2D step"
PRED = "predictor step"
LAYER_2, PRED_2 = "DeformConv2D step, 2nd layer", "predictor step, 2nd layer"
SLEPT, SLEPT_2 = "DeformConv2D step, kernels slept", "DeformConv2D step, 2nd layer, kernels slept"
EMPTY, EMPTY_PRED = "Keras step, bias only", "Keras step, bias only, predictor's size"
FLOOR = "numpy_function floor"
TARGETS = {
    (GRAPH, NUMPY): ("<", 1.2),
    (LAYER, NUMPY): None,
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
    g.add_argument("--seed", type=_timing.seed_int, default=0,
                   help="seed of the random data (default: 0)")
    g.add_argument(
        "--min-time", type=_timing.seconds, default=MIN_TIME, metavar="SECONDS",
        help="time each callable for at least --repeat calls and this many seconds "
        f"(default: {MIN_TIME:g})",
    )
    g.add_argument(
        "--passes", type=_timing.positive_int, default=PASSES, metavar="N",
        help="passes over the callables, each timing every callable in a block of its own with "
        f"1/N of --repeat and --min-time (default: {PASSES}; more passes narrow the ratios' "
        "intervals)",
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


def _numpy_fn(dops, x, offset, weight, bias, mask, grad_out, layout, needs=(True,) * 5,
              clock=None):
    """The NumPy op: forward + backward; ``clock`` (a :class:`_stand_ins.SplitClock`) times the
    two calls apart."""
    call = clock.timed if clock is not None else (lambda fn, *a, **k: fn(*a, **k))

    def both():
        kw = dict(stride=1, padding=1, dilation=1, mask=mask, layout=layout)
        out = call(dops.deform_conv2d, x, offset, weight, bias, **kw)
        return out, call(dops.deform_conv2d_backward, grad_out, x, offset, weight,
                         needs_input_grad=needs, **kw)

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


def _numpy_function_floor(tf, arrays, out_shape):
    """The tf.function op's structure with do-nothing bodies: a ``tf.custom_gradient`` whose
    forward and backward are ``tf.numpy_function`` calls that return preallocated outputs,
    under a GradientTape. What any op built on ``tf.numpy_function`` pays per forward +
    backward, output allocation not included."""
    from deformops_tf._convert import aligned_empty

    x, offset, filters, bias, mask, grad_out = [None if a is None else tf.constant(a)
                                                for a in arrays]
    leaves = [a for a in (x, offset, filters, bias, mask) if a is not None]
    dtype = x.dtype
    out = aligned_empty(tuple(out_shape), dtype.as_numpy_dtype)
    grads = [aligned_empty(tuple(t.shape), dtype.as_numpy_dtype) for t in leaves]

    @tf.custom_gradient
    def op(*inputs):
        y = tf.numpy_function(lambda *a: out, list(inputs), dtype, stateful=True)
        y.set_shape(out_shape)

        def grad(dy):
            gs = tf.numpy_function(lambda *a: grads, [dy, *inputs], [dtype] * len(inputs),
                                   stateful=True)
            for g, t in zip(gs, inputs):
                g.set_shape(t.shape)
            return gs

        return y, grad

    def both():
        with tf.GradientTape() as tape:
            tape.watch(leaves)
            out = op(*leaves)
        return out, tape.gradient(out, leaves, output_gradients=grad_out)

    return tf.function(both)


def _keras_steps(tf, keras, dtf, shape, dtype, x, seed):
    """``train_on_batch`` callables, by row name: a DeformConv2D model and a model of its
    offset/mask predictor alone (a Conv2D with as many outputs: 3x3, 'same', 2K or 3K channels),
    each as the first layer and after a 1x1 DepthwiseConv2D; a Conv2D model of the same shape;
    a model that is one per-channel bias (Keras' fixed cost, the loss and its gradient)."""
    N, Cin, Cout, H, W, has_mask = shape
    import numpy as np

    n_pred = (3 if has_mask else 2) * 9

    def deform():
        return dtf.DeformConv2D(Cout, 3, padding="same", use_mask=has_mask, dtype=dtype)

    def predictor():
        return keras.layers.Conv2D(n_pred, 3, padding="same", dtype=dtype)

    def conv():
        return keras.layers.Conv2D(Cout, 3, padding="same", dtype=dtype)

    class Bias(keras.layers.Layer):
        """x + b, b per channel (zero): the least layer for which Keras computes the loss's
        gradient (a model without weights has no backward pass)."""

        def build(self, input_shape):
            self.b = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

        def call(self, inputs):
            return inputs + self.b

    def bias_only():
        return Bias(dtype=dtype)

    # row, layer, input channels (a bias model's: the output size it stands for), after a 1x1
    # depthwise conv
    specs = ((LAYER, deform, Cin, False), (PRED, predictor, Cin, False),
             (LAYER_2, deform, Cin, True), (PRED_2, predictor, Cin, True),
             (SLEPT, deform, Cin, False), (SLEPT_2, deform, Cin, True),
             (CONV, conv, Cin, False), (EMPTY, bias_only, Cout, False),
             (EMPTY_PRED, bias_only, n_pred, False))
    steps = {}
    for name, make, channels, second in specs:
        keras.utils.set_random_seed(seed)
        layer = make()
        inp = h = keras.Input((H, W, channels), dtype=dtype)
        if second:
            h = keras.layers.DepthwiseConv2D(1, use_bias=False, dtype=dtype)(h)
        model = keras.Model(inp, layer(h))
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=False)
        y = np.random.default_rng(seed + 2).standard_normal((N, *model.output_shape[1:]))
        y = y.astype(dtype)
        x_in = x if channels == Cin else np.random.default_rng(seed + 3).standard_normal(
            (N, H, W, channels)).astype(dtype)
        steps[name] = functools.partial(_train_on_batch, model, tf.constant(x_in),
                                        tf.constant(y))
    return steps


def _train_on_batch(model, x, y):
    return model.train_on_batch(x, y)


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
    tf = _timing.require("tensorflow", "pip install 'deformops-kernels[tf]'")

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
            "passes": args.passes,
            "seed": args.seed,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    )
    for dtype in args.dtypes:
        for shape in shapes:
            _bench_case(report, tf, keras, dops, dtf, shape, dtype, repeat, args.min_time,
                        args.seed, args.passes)
    report.notes.append(
        "every row times forward + backward with the gradients of x, offset, filters, bias and "
        "mask; the Keras steps also run the loss, the offset predictor (DeformConv2D) and an SGD "
        "update. Each callable is timed in blocks of its own, 0.3 s apart, as model.fit runs "
        f"its steps: {args.passes} passes over the callables, every other one in reverse order, "
        f"each block one warm-up call then at least --repeat/{args.passes} calls and "
        f"--min-time/{args.passes} seconds; the median is over all {args.passes} blocks' calls. "
        "Ratios are ratios of the medians; 'per pass' ratios are the median over the passes of "
        "the ratio of each pass's block medians; '90% interval': of the layer ratios, from "
        f"{BOOTSTRAP} resamples of whole passes (the machine's noise; more --passes narrow it). "
        "'(min ms)' ratios compare the least disturbed calls. A step's net time: minus the step "
        "of a bias model (x + b) of its output size (Keras' fixed cost, the loss and its "
        "gradient). DeformConv2D "
        "net: the DeformConv2D step's net time minus its predictor step's. Targets, at N=8, 64 "
        "channels, 28x28 only: DeformConv2D net / the NumPy op with the same gradients (four as "
        "the first layer, all five as the second) < 1.2 (framework overhead at most 20%), and "
        "tf.function op / numpy op < 1.2."
    )
    return report


def _net_ratio(report, label, dtype, timed, peer, minus, den, target=None):
    """Add ``(peer - minus) / den`` from the three medians."""
    a, b, c = timed.get(peer), timed.get(minus), timed.get(den)
    if a is None or b is None or c is None or c.median_ms <= 0:
        return
    value = (a.median_ms - b.median_ms) / c.median_ms
    report.ratios.append(Ratio(f"({peer} - {minus}) / {den}", label, dtype, value, target))


def _overhead(ms, layer, pred, den):
    """``((layer - bias only) - (pred - bias only of the predictor's size)) / den`` from times in
    ms by row name: the layer's cost in the Keras step net of its predictor's, each net of the
    step's own cost (Keras' fixed cost, the MSE loss on its output and the loss's gradient, which
    differ in size). None where a time is missing."""
    t = [ms.get(k) for k in (layer, EMPTY, pred, EMPTY_PRED, den)]
    if any(v is None for v in t) or t[4] <= 0:
        return None
    return ((t[0] - t[1]) - (t[2] - t[3])) / t[4]


def _overhead_ratio(report, label, dtype, timed, layer, pred, den, name, target=None):
    """Add ``name``: :func:`_overhead` of the medians."""
    value = _overhead({k: m.median_ms for k, m in timed.items()}, layer, pred, den)
    if value is not None:
        report.ratios.append(Ratio(name, label, dtype, value, target))


def _overhead_per_pass(report, label, dtype, blocks, layer, pred, den, name):
    """Add ``name``, per pass: :func:`_overhead` of each pass's block medians, their median as
    an information ratio and their range in a note."""
    if den not in blocks:
        return
    passes = len(blocks[den])
    values = [_overhead({k: b[p].median_ms for k, b in blocks.items()}, layer, pred, den)
              for p in range(passes)]
    values = [v for v in values if v is not None]
    if not values:
        return
    report.ratios.append(Ratio(f"{name}, per pass", label, dtype, statistics.median(values)))
    report.notes.append(f"{label} [{dtype}], {name}, per pass ({len(values)} passes): "
                        f"{min(values):.2f} to {max(values):.2f}")


def _overhead_interval(blocks, layer, pred, den, rng, resamples=BOOTSTRAP):
    """The 5th and 95th percentiles of :func:`_overhead` of the medians over ``resamples``
    bootstrap resamples of the passes (None where a callable is missing or there is one pass:
    no spread to resample). A resample draws
    passes with replacement and takes each callable's median over the calls of the drawn
    passes' blocks: whole passes, so that a slow spell that fell on one pass's blocks stays
    with them."""
    import numpy as np

    names = (layer, EMPTY, pred, EMPTY_PRED, den)
    if any(k not in blocks for k in names):
        return None
    times = {k: [np.asarray(b.times_ms) for b in blocks[k]] for k in names}
    passes = len(times[den])
    if passes < 2 or any(len(t) != passes or not all(a.size for a in t) for t in times.values()):
        return None
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, passes, passes)
        ms = {k: float(np.median(np.concatenate([t[i] for i in drawn]))) for k, t in times.items()}
        value = _overhead(ms, layer, pred, den)
        if value is not None:
            values.append(value)
    return tuple(float(v) for v in np.percentile(values, (5, 95))) if values else None


def _add_interval(report, label, dtype, blocks, layer, pred, den, name, rng):
    """Add a note: ``name``'s 90% bootstrap interval (:func:`_overhead_interval`)."""
    bounds = _overhead_interval(blocks, layer, pred, den, rng)
    if bounds is not None:
        report.notes.append(f"{label} [{dtype}], {name}, 90% interval (bootstrap over "
                            f"{len(blocks[den])} passes): {bounds[0]:.2f} to {bounds[1]:.2f}")


def _bench_case(report, tf, keras, dops, dtf, shape, dtype, repeat, min_time, seed,
                passes=PASSES):
    label = _label(shape)
    _timing.progress(f"[{dtype}] {label}")
    (x, offset, filters, bias, mask, grad_out), nchw = _make_case(shape, dtype, seed)
    weight = filters.transpose(3, 2, 0, 1).copy()
    split_all, split_no_x = _stand_ins.SplitClock(), _stand_ins.SplitClock()
    np_both = _numpy_fn(dops, x, offset, weight, bias, mask, grad_out, "NHWC", clock=split_all)
    np_no_x = _numpy_fn(dops, x, offset, weight, bias, mask, grad_out, "NHWC",
                        (False, True, True, True, True), clock=split_no_x)
    np_nchw = _numpy_fn(dops, nchw[0], nchw[1], nchw[2], nchw[3], nchw[4], nchw[5], "NCHW")
    eager, graph = _tf_op_fns(tf, dtf, (x, offset, filters, bias, mask, grad_out))
    _check(report, label, dtype, graph, np_both)
    steps = _keras_steps(tf, keras, dtf, shape, dtype, x, seed)
    with _stand_ins.KernelClock(dtf.ops) as clock:
        _bench_steps(report, label, dtype, shape, steps, clock, split_all, split_no_x, np_both,
                     np_no_x, np_nchw, eager, graph, tf, (x, offset, filters, bias, mask, grad_out),
                     repeat, min_time, seed, passes)


def _bench_steps(report, label, dtype, shape, steps, clock, split_all, split_no_x, np_both,
                 np_no_x, np_nchw, eager, graph, tf, arrays, repeat, min_time, seed, passes):
    """Time the callables of one case (see :func:`_bench_case`) and add their ratios."""
    import numpy as np

    def tagged(step, tag):  # the layer step, its kernel calls timed
        def run():
            with clock.tagged(tag):
                return step()
        return run

    def slept(step, split):  # the layer step, its kernel calls sleeping the NumPy op's times
        def run():
            with clock.stand_ins(split.seconds()):
                return step()
        return run

    tasks = [
        Task(np_both, f"{label}", NUMPY, "NHWC, all 5 gradients"),
        Task(np_no_x, f"{label}", NUMPY_NO_X, "NHWC, 4 gradients (first layer's)"),
        Task(np_nchw, f"{label}", NUMPY_NCHW, "the core's native layout"),
        Task(eager, f"{label}", EAGER, "GradientTape, DLPack"),
        Task(graph, f"{label}", GRAPH, "tf.numpy_function inside"),
        Task(_numpy_function_floor(tf, arrays, arrays[-1].shape),
             f"{label}", FLOOR, "do-nothing numpy_function op, same structure"),
        Task(tagged(steps[LAYER], LAYER), f"{label}", LAYER, "train_on_batch, SGD; no x grad"),
        Task(steps[PRED], f"{label}", PRED, "its offset/mask predictor alone"),
        Task(tagged(steps[LAYER_2], LAYER_2), f"{label}", LAYER_2,
             "after a 1x1 depthwise conv"),
        Task(steps[PRED_2], f"{label}", PRED_2, "after a 1x1 depthwise conv"),
        Task(steps[CONV], f"{label}", CONV, "train_on_batch, SGD"),
        Task(steps[EMPTY], f"{label}", EMPTY, "x + b model: the loss and its gradient"),
        Task(steps[EMPTY_PRED], f"{label}", EMPTY_PRED, "the same, 2K or 3K channels"),
        # pass 0 runs them after the real layer steps, whose results the stand-ins return
        Task(slept(steps[SLEPT], split_no_x), f"{label}", SLEPT,
             "kernel calls: sleeps of the numpy op's"),
        Task(slept(steps[SLEPT_2], split_all), f"{label}", SLEPT_2,
             "the same, 2nd layer"),
    ]
    timed = {}
    # Each callable in a block of its own, as model.fit runs its steps. In rounds, calls from the
    # main thread (the NumPy op, the eager op) and from TF's threads (tf.function bodies, handed
    # to the adapter's worker thread) took turns, and each switch cost both sides the other
    # thread's workspace: the NumPy op measured 35 ms instead of 22, the
    # tf.function op 40 instead of 25 (N=8, 64 channels, 28x28) -- a cost model.fit never pays.
    # Passes in alternating order, each block 1/passes of --min-time: a slow spell of the
    # machine (they last seconds here), or what the previous block leaves behind, falls on each
    # callable alike. (With two passes, the overhead ratios of runs minutes apart differed by
    # up to 0.15; with four, four runs within an hour of a busy day gave 1.08 to 1.30.)
    blocks = {}
    for p in range(passes):
        for task in (tasks if p % 2 == 0 else tasks[::-1]):
            time.sleep(min(0.3, min_time))  # a smoke run (tiny --min-time) need not wait
            for c in (clock, split_all, split_no_x):  # leave the warm-up call out
                c.new_block()
            (m,) = _timing.measure_interleaved([task], dtype=dtype,
                                               repeat=max(1, repeat // passes),
                                               min_s=min_time / passes)
            blocks.setdefault(task.peer, []).append(m)
    for task in tasks:
        timed[task.peer] = report.add(_timing.merge_blocks(blocks[task.peer]))
    report.notes.append(f"{label} [{dtype}]: kernel calls of the slept steps: "
                        f"{clock.stand_in_calls} slept, {clock.real_under_stand_ins} real")
    if clock.real_under_stand_ins:  # a call of the layer that the NumPy op does not make
        report.notes.append(f"{label} [{dtype}]: some kernel calls of the slept steps ran for "
                            "real (no stand-in for them): the slept rows do not measure what "
                            "they say")
    targeted = tuple(shape) == TARGET_SHAPE
    for (num, den), target in TARGETS.items():
        report.add_ratio(f"{num} / {den}", label, dtype, timed.get(num), timed.get(den),
                         target if targeted else None)
    # Framework overhead for the same work: the layer's net step without its predictor's
    # against the NumPy op with the same gradients. Information: the same without the bias
    # models' correction, the layer's whole cost in model.fit (its net step, predictor
    # included), and the tf.function op net of TF's numpy_function floor.
    target = ("<", 1.2) if targeted else None
    _overhead_ratio(report, label, dtype, timed, LAYER, PRED, NUMPY_NO_X,
                    f"1st layer: DeformConv2D net / {NUMPY_NO_X}", target)
    _overhead_ratio(report, label, dtype, timed, LAYER_2, PRED_2, NUMPY,
                    f"2nd layer: DeformConv2D net / {NUMPY}", target)
    # The same per pass (information): how far this run's own noise moves them.
    _overhead_per_pass(report, label, dtype, blocks, LAYER, PRED, NUMPY_NO_X,
                       f"1st layer: DeformConv2D net / {NUMPY_NO_X}")
    _overhead_per_pass(report, label, dtype, blocks, LAYER_2, PRED_2, NUMPY,
                       f"2nd layer: DeformConv2D net / {NUMPY}")
    # How uncertain the machine's noise leaves the two layer ratios (information).
    rng = np.random.default_rng(seed)
    _add_interval(report, label, dtype, blocks, LAYER, PRED, NUMPY_NO_X,
                  f"1st layer: DeformConv2D net / {NUMPY_NO_X}", rng)
    _add_interval(report, label, dtype, blocks, LAYER_2, PRED_2, NUMPY,
                  f"2nd layer: DeformConv2D net / {NUMPY}", rng)
    # Where the overhead comes from (information). With the kernel calls slept (each a sleep of
    # the NumPy op's own forward or backward time) the ratio is what TF and the adapter add
    # around calls that cost exactly the NumPy op: the floor of the ratios above. The kernel
    # calls' own time inside the real steps says whether the kernels run slower there.
    for layer, pred, den, n in ((SLEPT, PRED, NUMPY_NO_X, "1st"), (SLEPT_2, PRED_2, NUMPY, "2nd")):
        name = f"{n} layer, kernels slept: DeformConv2D net / {den}"
        _overhead_ratio(report, label, dtype, timed, layer, pred, den, name)
        _add_interval(report, label, dtype, blocks, layer, pred, den, name, rng)
    for layer, split, den, n in ((LAYER, split_no_x, NUMPY_NO_X, "1st"),
                                 (LAYER_2, split_all, NUMPY, "2nd")):
        inside, alone = clock.seconds(layer), split.seconds()
        if inside and set(inside) == set(alone) and sum(alone.values()) > 0:
            report.ratios.append(Ratio(f"{n} layer: kernel calls in its step / the {den}'s",
                                       label, dtype,
                                       sum(inside.values()) / sum(alone.values())))
    _net_ratio(report, label, dtype, timed, LAYER, PRED, NUMPY_NO_X)
    _net_ratio(report, label, dtype, timed, LAYER, EMPTY, NUMPY_NO_X)
    _net_ratio(report, label, dtype, timed, GRAPH, FLOOR, NUMPY)
    for num in (GRAPH, LAYER):  # the least disturbed times, for busy machines
        a, b = timed.get(num), timed.get(NUMPY)
        if a is not None and b is not None and b.min_ms > 0:
            report.ratios.append(Ratio(f"{num} / {NUMPY} (min ms)", label, dtype,
                                       a.min_ms / b.min_ms))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run it as: python -m deformops.bench tf")
