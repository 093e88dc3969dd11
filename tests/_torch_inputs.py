"""float64 input tensors for the torch adapter's tests (torch imported by the caller first)."""

import torch


def smooth(rng, shape, span=1):
    """Offsets (or coordinate parts) whose fractional part is 0.5 +- [0.1, 0.3]: never within
    0.1 px of an integer or a half-integer, so central differences never straddle a kink."""
    ints = rng.integers(-span, span + 1, size=shape)
    frac = 0.5 + rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 0.3, size=shape)
    return torch.from_numpy(ints + frac)


def rand(rng, *shape, lo=-1.0, hi=1.0):
    """Uniform values in [lo, hi)."""
    return torch.from_numpy(rng.uniform(lo, hi, size=shape))
