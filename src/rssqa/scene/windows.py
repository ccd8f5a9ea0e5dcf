"""Windows over a scene: their offsets, the pixels each owns, the blending taper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rssqa.errors import RSSQAError


def window_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` px covering ``length`` px with at least ``overlap`` px shared.

    The last window is aligned to the end, so every pixel is covered and no window leaves the scene.
    """
    if tile > length:
        raise RSSQAError(f"scene: {length} px is smaller than one {tile} px window")
    if not 0 <= overlap < tile:
        raise RSSQAError(f"--overlap: {overlap} px must be at least 0 and smaller than the {tile} px window")
    stride = tile - overlap
    n = max(1, math.ceil((length - tile) / stride) + 1)
    offsets = [min(i * stride, length - tile) for i in range(n)]
    return sorted(set(offsets))


def owned_bounds(offsets: Sequence[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Per window, the pixel range it owns along one axis: pixels nearest to its centre."""
    centres = [o + tile / 2 for o in offsets]
    cuts = [0, *(math.ceil((a + b) / 2 - 0.5) for a, b in zip(centres, centres[1:], strict=False)), length]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def tile_windows(image: np.ndarray, tile: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """``image`` as the windows of ``tile`` px that cover it (no overlap), and each window's share of the
    image's pixels, those it owns: how a scorer judges an image larger than its training tiles. The image
    itself, share 1, where it is a tile, narrower than one, or ``tile`` is ``None``."""
    h, w = image.shape[:2]
    if tile is None or h < tile or w < tile or (h, w) == (tile, tile):
        return [image], np.ones(1)
    rows, cols = window_offsets(h, tile, 0), window_offsets(w, tile, 0)
    owned = [(b - a) * (d - c) for a, b in owned_bounds(rows, tile, h) for c, d in owned_bounds(cols, tile, w)]
    return [image[r : r + tile, c : c + tile] for r in rows for c in cols], np.array(owned, np.float64) / (h * w)


def taper(tile: int, overlap: int) -> np.ndarray:
    """``tile×tile`` blending weights: 1 inside, falling linearly over the ``overlap`` px at the edges."""
    x = np.arange(tile, dtype=np.float32)
    w = np.minimum(1.0, (np.minimum(x, tile - 1 - x) + 1.0) / (overlap + 1.0))
    return np.outer(w, w)
