"""The world's master land-cover classes and scene types.

Every source maps these eight classes to its own schema (see :mod:`rssqa.world.sources`), the way
ISPRS, LoveDA and DeepGlobe each cut the same ground into different label sets.
"""

from __future__ import annotations

import numpy as np

IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, WATER, BARE_SOIL, CLUTTER = range(8)
CLASSES: tuple[str, ...] = (
    "impervious",
    "building",
    "low_vegetation",
    "tree",
    "car",
    "water",
    "bare_soil",
    "clutter",
)
NUM_CLASSES = len(CLASSES)

SCENE_TYPES: tuple[str, ...] = ("dense_urban", "suburban", "industrial", "rural", "forest", "coastal")

# Mean surface reflectance per class in (R, G, B, NIR), 0..1. Vegetation is bright in NIR, which is
# what makes the IRRG false-colour source (Vaihingen-like) look red where plants grow.
REFLECTANCE = np.array(
    [
        [0.42, 0.42, 0.43, 0.35],  # impervious: asphalt / concrete grey
        [0.55, 0.38, 0.33, 0.40],  # building: roof (overridden per building)
        [0.36, 0.52, 0.24, 0.70],  # low vegetation: grass, crops
        [0.14, 0.30, 0.12, 0.62],  # tree: dark canopy
        [0.60, 0.60, 0.62, 0.40],  # car (overridden per car)
        [0.08, 0.20, 0.28, 0.04],  # water: dark, NIR-absorbing
        [0.60, 0.50, 0.38, 0.50],  # bare soil: tan
        [0.45, 0.38, 0.34, 0.38],  # clutter: mixed
    ],
    dtype=np.float32,
)

# Amplitude of the per-pixel texture of each class (trees are rough, water is smooth).
TEXTURE = np.array([0.05, 0.04, 0.07, 0.16, 0.02, 0.02, 0.08, 0.12], dtype=np.float32)
