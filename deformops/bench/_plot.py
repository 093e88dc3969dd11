"""A picture of a benchmark's ratios: ``python -m deformops.bench <subcommand> --plot PATH``.

One horizontal bar per ratio of the report, in the report's order from the top, labelled with
its op, name and dtype and its value; green where it meets its target, red where it misses it,
grey where it is information only. A target is drawn as a black tick across its bar, and 1 (as
fast as the peer) as a dashed line. The axis is logarithmic where the ratios are all positive
and span more than a factor of 10 (deformops against torchvision spans 1 to 100), else linear.
Matplotlib draws it without pyplot (no GUI backend, no global state); the file type follows
PATH's suffix (:data:`SUFFIXES`).
"""

from __future__ import annotations

import math
import os

from ._timing import Report, fmt_ratio

COLORS = {True: "#2a9d4b", False: "#d1343b", None: "#9a9a9a"}  # meets / misses / no target
SUFFIXES = (".png", ".svg", ".pdf")
BAR_HEIGHT_IN = 0.28  # inches per bar
MIN_HEIGHT_IN = 2.4  # room for the title, the legend and the axis at one bar
LOG_SPAN = 10.0  # a logarithmic axis where the largest ratio exceeds the least this many times
LABEL_WIDTH = 0.07  # a value label's width, as a fraction of the axis


def check_path(path: str) -> str | None:
    """Why ``path`` cannot take a chart (an unsupported suffix, a missing folder), else None:
    checked before a run, which may take minutes."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        return f"--plot: {path!r} must end in one of {', '.join(SUFFIXES)}"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot: the folder {folder!r} does not exist"
    return None


def _label(ratio) -> str:
    return f"{ratio.op}: {ratio.name} [{ratio.dtype}]"


def _covers(value, bound, xlim, log) -> bool:
    """Whether a label written just right of ``value`` would cover a tick at ``bound``."""
    f = math.log10 if log else float
    lo, hi = f(xlim[0]), f(xlim[1])
    return 0 <= f(bound) - f(value) < LABEL_WIDTH * (hi - lo)


def plot_ratios(report: Report, title: str, path: str):
    """Write the chart of ``report.ratios`` (those with a finite value) to ``path``; return the
    matplotlib ``Figure``.

    Raises ``ValueError`` (naming ``--plot``) when the report has no finite ratio to draw.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ratios = [r for r in report.ratios if r.value is not None and math.isfinite(r.value)]
    if not ratios:
        raise ValueError("--plot: the report has no ratio to draw")
    values = [r.value for r in ratios]
    bounds = [r.target[1] for r in ratios if r.target is not None]
    low = min(values + bounds + [1.0])
    high = max(values + bounds + [1.0])
    log = low > 0 and high / low > LOG_SPAN

    height = max(MIN_HEIGHT_IN, 1.6 + BAR_HEIGHT_IN * len(ratios))
    fig = Figure(figsize=(10, height), layout="constrained")
    ax = fig.subplots()
    rows = range(len(ratios))
    ax.barh(rows, values, color=[COLORS[r.ok] for r in ratios], height=0.7)
    ax.set_yticks(list(rows), [_label(r) for r in ratios], fontsize=7)
    ax.invert_yaxis()  # the report's first ratio on top
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.5, high * 2.0)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        span = high - min(0.0, low)
        ax.set_xlim(min(0.0, low - 0.15 * span), high + 0.15 * span)
    xlim = ax.get_xlim()
    for i, r in enumerate(ratios):
        if r.target is not None:
            ax.plot([r.target[1]] * 2, [i - 0.45, i + 0.45], color="black", lw=1.5)
        # the label after the bar's end (before it for a negative bar), or after a target tick
        # that it would cover
        end, right = r.value, r.value >= 0
        if right and r.target is not None and _covers(r.value, r.target[1], xlim, log):
            end = r.target[1]
        ax.annotate(f"{fmt_ratio(r.value)}×", (end, i), xytext=(4 if right else -4, 0),
                    textcoords="offset points", va="center", ha="left" if right else "right",
                    fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    legend = [Patch(color=COLORS[True], label="meets its target"),
              Patch(color=COLORS[False], label="misses it"),
              Patch(color=COLORS[None], label="information"),
              Line2D([], [], color="black", lw=1.5, label="target"),
              Line2D([], [], color="black", lw=0.8, ls="--", label="1×")]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=7,
               frameon=False)
    ax.set_xlabel("ratio (log scale)" if log else "ratio")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    return fig
