"""Compute backends: ``cpu`` (Numba) and, later, ``cuda`` (CuPy). Imported on first use only."""
