"""Benchmarks of deformops against named peers, run as ``python -m deformops.bench``.

Subcommands (one per op family; see ``python -m deformops.bench --help``):

- ``sample``: ``deformops.sample`` / ``sample_backward`` against ``scipy.ndimage.map_coordinates``
  and ``torch.nn.functional.grid_sample`` (CPU).

Speed is reported as ratios measured in one run on one machine, never as absolute targets.
Importing this package imports neither SciPy nor any framework; the subcommands load their peers
when they run.
"""
