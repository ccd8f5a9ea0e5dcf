"""Cheap, vectorised random fields: smooth value noise and a per-cell hash for procedural layouts."""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def cell_key(*cells: np.ndarray) -> np.ndarray:
    """Fold integer cell coordinates (any shape, broadcast) into one int64 key per element."""
    key = np.zeros(np.broadcast_shapes(*(np.shape(c) for c in cells)), np.int64)
    for c in cells:
        key = key * 1_000_003 + np.asarray(c, dtype=np.int64)
    return key


def cell_hash(seed: int, key: np.ndarray) -> np.ndarray:
    """Hash int64 cell keys (from :func:`cell_key`) to uniform floats in [0, 1).

    The same (seed, key) always gives the same value, so every pixel of one procedural cell (a lot,
    a parking slot, a field) agrees on that cell's random parameters without a Python loop. Different
    seeds give independent values for the same cells (splitmix64 finaliser).
    """
    with np.errstate(over="ignore"):
        h = key.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * _GOLDEN
        h = (h ^ (h >> np.uint64(30))) * _M1
        h = (h ^ (h >> np.uint64(27))) * _M2
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A ``size×size`` float32 field in [0, 1] varying smoothly over about ``cells`` cells per side.

    Bilinear interpolation of a ``(cells+1)²`` lattice of uniform values with smoothstep weights.
    """
    cells = max(1, int(cells))
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0.0, cells, size, endpoint=False, dtype=np.float32)
    i = t.astype(np.int64)
    f = t - i
    f = f * f * (3.0 - 2.0 * f)
    rows = lattice[i] * (1.0 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1.0 - f) + rows[:, i + 1] * f


def fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of :func:`smooth_noise` octaves (each twice as fine, half as strong), rescaled to [0, 1]."""
    total = np.zeros((size, size), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * smooth_noise(rng, size, min(cells * 2**o, size))
        norm += amp
        amp *= 0.5
    return total / norm
