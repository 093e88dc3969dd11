"""A picture of a benchmark's ratios: ``python -m deformops.bench <subcommand> --plot PATH``.

One horizontal bar per ratio of the report, in the report's order, labelled with its op, name
and dtype and its value; green where it meets its target, red where it misses it, grey where it
is information only. A target is drawn as a black tick across its bar, and 1 (as fast as the
peer) as a dashed line. The axis is logarithmic where the ratios span more than a factor of 10
(deformops against torchvision spans 1 to 100), else linear. Matplotlib draws it without pyplot
(no GUI backend, no global state); the file type follows PATH's suffix (.png, .svg, .pdf).
"""

from __future__ import annotations

import math

from ._timing import Report, fmt_ratio

COLORS = {True: "#2a9d4b", False: "#d1343b", None: "#9a9a9a"}  # meets / misses / no target
BAR_HEIGHT_IN = 0.28  # inches per bar
LOG_SPAN = 10.0  # a logarithmic axis where the largest ratio exceeds the least this many times


def _label(ratio) -> str:
    return f"{ratio.op}: {ratio.name} [{ratio.dtype}]"


def _near_after(value, bound, log, span):
    """Whether ``bound`` lies just right of ``value``, where the value's label would cover it."""
    if log:
        return value <= bound < value * 1.35
    return value <= bound < value + 0.12 * span


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

    fig = Figure(figsize=(10, 1.2 + BAR_HEIGHT_IN * len(ratios)), layout="constrained")
    ax = fig.subplots()
    rows = range(len(ratios))
    ax.barh(rows, values, color=[COLORS[r.ok] for r in ratios], height=0.7)
    for i, r in enumerate(ratios):
        end = r.value  # the label after the bar, or after a target tick that it would cover
        if r.target is not None and _near_after(r.value, r.target[1], log, high - low):
            end = r.target[1]
        ax.annotate(f"{fmt_ratio(r.value)}×", (end, i), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7)
        if r.target is not None:
            ax.plot([r.target[1]] * 2, [i - 0.45, i + 0.45], color="black", lw=1.5)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    legend = [Patch(color=COLORS[True], label="meets its target"),
              Patch(color=COLORS[False], label="misses it"),
              Patch(color=COLORS[None], label="information"),
              Line2D([], [], color="black", lw=1.5, label="target"),
              Line2D([], [], color="black", lw=0.8, ls="--", label="1×")]
    ax.legend(handles=legend, loc="lower right", fontsize=7, framealpha=0.9)
    ax.set_yticks(list(rows), [_label(r) for r in ratios], fontsize=7)
    ax.invert_yaxis()  # the report's first ratio on top
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.5, high * 2.0)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(min(0.0, low * 1.1), high * 1.15)
    ax.set_xlabel("ratio (log scale)" if log else "ratio")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    return fig
