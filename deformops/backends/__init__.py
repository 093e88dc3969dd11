"""Compute backends: ``cpu`` (Numba) and ``cuda`` (raw CUDA kernels through CuPy), chosen by
``deformops._arrays.backend``. Imported on first use only."""
