"""CuPy arrays run with their own GPU made current (outputs, compiled modules and launches follow
the current device), other arrays with nothing changed. Oracle: a stand-in ``cupy`` module that
records which device each call made current; no GPU needed."""

import sys
import types

import numpy as np

from deformops import _arrays


def test_numpy_arrays_change_no_device():
    with _arrays.device_of(np.zeros(3)) as scope:
        assert scope is None


def test_cupy_arrays_make_their_device_current(monkeypatch):
    entered = []

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            entered.append(self.id)
            return self

        def __exit__(self, *exc):
            entered.append(-1)

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    array_type = type("ndarray", (), {"__module__": "cupy._core.core",
                                       "device": types.SimpleNamespace(id=1)})
    with _arrays.device_of(array_type()) as dev:
        assert dev.id == 1 and entered == [1]
    assert entered == [1, -1]
