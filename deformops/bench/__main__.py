"""Command line of the benchmarks: ``python -m deformops.bench <subcommand> [options]``.

Each subcommand is a module of this package listed in :data:`SUBCOMMANDS`. The module provides

- ``HELP``: one line for ``--help``;
- ``add_arguments(parser)``: its own options (may do nothing);
- ``RATIOS`` (optional, default True): False where the report has no ratios (``--plot`` is
  then refused before the run);
- ``run(args) -> _timing.Report``: the benchmark. ``args`` carries the common options already
  resolved: ``args.dtypes`` (tuple of dtype names), ``args.repeat`` (``None`` = the subcommand's
  defaults), ``args.threads`` (already applied to Numba; pass it to ``_timing.load_torch``).

The module must import heavy or optional packages (SciPy, torch, TensorFlow, CuPy) inside
``run``, not at module level. Adding a subcommand is one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import _timing

# subcommand name -> module implementing it (relative to this package)
SUBCOMMANDS = {
    "sample": ".sampling",
    "conv": ".conv",
    "torch": ".torch_step",
    "tf": ".tf",
    "gpu": ".gpu",
    "jit": ".jit",
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument(
        "--dtype",
        choices=(*_timing.DTYPES, "both"),
        default="both",
        help="floating dtype to time (default: both)",
    )
    g.add_argument(
        "--repeat",
        type=_timing.positive_int,
        default=None,
        metavar="N",
        help="timed calls per measurement after one warm-up call; the median is reported "
        "(default: per subcommand, e.g. 20 for deformops and torch, 3 for slow loops "
        "such as scipy)",
    )
    g.add_argument(
        "--threads",
        type=_timing.positive_int,
        default=None,
        metavar="N",
        help="threads for Numba (numba.set_num_threads) and torch (torch.set_num_threads); "
        "default: all cores (NUMBA_NUM_THREADS)",
    )
    g.add_argument(
        "--json", metavar="PATH", default=None, help="also write the results as JSON to PATH"
    )
    g.add_argument(
        "--plot", metavar="PATH", default=None,
        help="also draw the ratios as a bar chart to PATH (.png, .svg or .pdf; needs matplotlib)",
    )
    return common


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name], __package__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deformops.bench",
        description="Time deformops kernels against named peers in one run and print ratios.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    common = _common_options()
    for name in SUBCOMMANDS:
        mod = _load(name)
        p = sub.add_parser(
            name,
            parents=[common],
            help=mod.HELP,
            description=(mod.__doc__ or mod.HELP).strip().split("\n\n")[0],
        )
        mod.add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dtypes = _timing.DTYPES if args.dtype == "both" else (args.dtype,)

    limit = _timing.max_threads()
    if args.threads is None:
        args.threads = limit
    elif args.threads > limit:
        parser.error(
            f"--threads {args.threads} exceeds Numba's limit of {limit} "
            "(raise it with the environment variable NUMBA_NUM_THREADS)"
        )
    _timing.set_threads(args.threads)
    if args.plot:  # before the run, not after minutes of timing
        _check_plot(parser, args)

    machine = _timing.machine_info()  # before the run: its load is other processes'
    other = _timing.OtherLoad().start()
    report = _load(args.command).run(args)
    machine["busy_cpus_during_run"] = other.stop()
    _timing.update_machine_info(machine)
    print()
    print(f"## deformops.bench {args.command}")
    print()
    print(_timing.format_machine(machine))
    if report.config:
        print("config: " + ", ".join(f"{k}={v}" for k, v in report.config.items()))
    print()
    print(report.render())
    if args.json:
        _timing.write_json(args.json, {"machine": machine, **report.to_json()})
        print(f"\nwrote {args.json}")
    plotted = True
    if args.plot:
        from ._plot import plot_ratios

        title = (f"python -m deformops.bench {args.command}: {machine['cpu']}, "
                 f"{machine['usable_cpus']} CPUs, Numba threads {machine['numba_threads']}")
        try:
            plot_ratios(report, title, args.plot)
            print(f"\nwrote {args.plot}")
        except ValueError as e:
            print(f"\n{e}: no plot written", file=sys.stderr)
            plotted = False
    if not report.ok:
        print("\nFAILED: a numerical check did not pass (see the check lines above)")
        return 1
    return 0 if plotted else 2


def _check_plot(parser, args) -> None:
    """``--plot``: an argparse error (exit 2) now, where the run could not end in a chart."""
    from ._plot import check_path

    if not getattr(_load(args.command), "RATIOS", True):
        parser.error(f"--plot: bench {args.command} reports no ratios to draw")
    why = check_path(args.plot)
    if why:
        parser.error(why)
    mod, reason = _timing.optional_import("matplotlib")
    if mod is None:
        parser.error(f"--plot needs matplotlib, which is not importable ({reason}): pip install "
                     "matplotlib (or the 'examples' extra), or leave out --plot")


if __name__ == "__main__":
    sys.exit(main())
