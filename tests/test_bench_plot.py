"""``python -m deformops.bench <subcommand> --plot PATH``: the bar chart of a report's ratios.

Oracles: the report's own ratios (one bar each, in order, as long as its value, coloured by its
verdict against its target); the PNG file signature; the command's exit status and messages.
"""

import math
import os
import subprocess
import sys

import pytest

from deformops.bench import _timing
from deformops.bench._timing import Ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _report(*ratios):
    report = _timing.Report(command="t")
    report.ratios.extend(ratios)
    return report


def test_one_bar_per_ratio_with_its_value_and_verdict(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from deformops.bench._plot import COLORS, plot_ratios

    ratios = [Ratio("torchvision / deformops", "conv fwd", "float32", 14.0, (">", 1.0)),
              Ratio("deformops / conv2d", "conv fwd", "float32", 2.6, ("<", 2.5)),
              Ratio("info", "conv bwd", "float64", 0.8),
              Ratio("not measured", "conv bwd", "float64", math.nan)]
    path = tmp_path / "ratios.png"
    fig = plot_ratios(_report(*ratios), "title", str(path))
    assert path.read_bytes()[:8] == PNG
    (ax,) = fig.axes
    bars = list(ax.patches)
    drawn = ratios[:3]  # NaN has no bar
    # bar i on row i, the first on top, as long as its ratio, coloured by its verdict
    assert [b.get_y() + b.get_height() / 2 for b in bars] == pytest.approx([0, 1, 2])
    assert ax.yaxis_inverted()
    assert [b.get_width() for b in bars] == pytest.approx([r.value for r in drawn])
    assert [to_hex(b.get_facecolor()) for b in bars] == [COLORS[True], COLORS[False], COLORS[None]]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{r.op}: {r.name} [{r.dtype}]" for r in drawn]
    assert [t.get_text() for t in ax.texts] == ["14.0×", "2.60×", "0.80×"]
    assert ax.get_xscale() == "log"  # 0.8 .. 14 spans more than 10x
    # a target drawn at its bound, across its own bar (rows 0 and 1)
    ticks = sorted((tuple(line.get_xdata()), tuple(line.get_ydata()))
                   for line in ax.get_lines() if line.get_linestyle() == "-")
    assert ticks == [((1.0, 1.0), (-0.45, 0.45)), ((2.5, 2.5), (0.55, 1.45))]


def test_linear_axis_for_a_narrow_span_and_svg(tmp_path):
    """A narrow span, or a negative ratio: a linear axis holding every bar; a label that would
    cover its target's tick is written after the tick; a negative bar's label before its end."""
    pytest.importorskip("matplotlib")
    from deformops.bench._plot import plot_ratios

    path = tmp_path / "ratios.svg"
    ratios = [Ratio("a / b", "op", "float32", 1.15, ("<", 1.2)),
              Ratio("c / d", "op", "float32", 1.05)]
    fig = plot_ratios(_report(*ratios), "t", str(path))
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear"
    assert path.read_text()[:200].lstrip().startswith("<?xml")
    first, second = ax.texts
    assert first.xy == (1.2, 0) and second.xy == (1.05, 1)
    assert first.get_horizontalalignment() == "left"

    fig = plot_ratios(_report(Ratio("net", "op", "float32", -0.3), *ratios), "t",
                      str(tmp_path / "neg.png"))
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    assert ax.get_xscale() == "linear" and lo < -0.3 and hi > 1.2
    assert ax.texts[0].xy == (-0.3, 0) and ax.texts[0].get_horizontalalignment() == "right"


def test_no_ratio_to_draw_is_a_value_error(tmp_path):
    pytest.importorskip("matplotlib")
    from deformops.bench._plot import plot_ratios

    with pytest.raises(ValueError, match="--plot"):
        plot_ratios(_report(Ratio("a", "op", "float32", math.inf)), "t", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def _run(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["jit", "--plot", "x.png"], "--plot: bench jit reports no ratios to draw"),
    (["sample", "--plot", "x.txt"], "must end in one of .png, .svg, .pdf"),
    (["sample", "--plot", os.path.join("no-such-folder", "x.png")], "does not exist"),
])
def test_plot_that_cannot_be_drawn_is_refused_before_the_run(args, message):
    r = _run(["-m", "deformops.bench", *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stdout == "" and "Traceback" not in r.stderr


def test_bench_command_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sample.png"
    r = _run(["-m", "deformops.bench", "sample", "--size", "1", "3", "9", "7", "--repeat", "1",
              "--no-torch", "--dtype", "float32", "--plot", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"wrote {path}" in r.stdout and path.read_bytes()[:8] == PNG


def test_plot_without_matplotlib_stops_before_timing(tmp_path):
    """Exit 2 with what to install, before any timing (no report printed), not a traceback
    after the run."""
    code = ("import sys; sys.modules['matplotlib'] = None; from deformops.bench.__main__ import "
            f"main; sys.exit(main(['sample', '--plot', {str(tmp_path / 'x.png')!r}]))")
    r = _run(["-c", code])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--plot needs matplotlib, which is not importable" in r.stderr
    assert "leave out --plot" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # no report: nothing was timed
