"""Shared pytest configuration: hypothesis profiles.

- "ci": derandomized, no deadline (Numba compiles kernels on first call), ~40 examples per test;
- "dev": random, no deadline, hypothesis' default example count.

The "ci" profile is loaded when the environment variable CI is set (to anything non-empty), else
"dev"; ``--hypothesis-profile=NAME`` on the command line overrides both.
"""

import os
import sys

from hypothesis import HealthCheck, settings

# Make tests/_oracles.py importable as ``_oracles`` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=40, print_blob=True, **_common)
settings.register_profile("dev", **_common)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
