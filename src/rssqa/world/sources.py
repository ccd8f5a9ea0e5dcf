"""The four segmentation sources of the world, each shaped like a real data set.

A source differs from the others the way real sets do: its class schema (ISPRS six classes, LoveDA
seven with a no-data value, DeepGlobe seven land-cover classes), its ground sample distance, its mix
of scene types and its sensor (IRRG false colour, JPEG-compressed satellite tiles, hazy mosaics). Each
is written in the folder layout of its real counterpart, so the loaders that read the real sets read
these too. GSDs are those of a real patch downsampled to the small tiles used here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rssqa.world.classes import CLASSES, NUM_CLASSES, SCENE_TYPES
from rssqa.world.render import SensorStyle

IGNORE_INDEX = 255

ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
LOVEDA_PALETTE = ((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0),
                  (255, 195, 128))  # fmt: skip
DEEPGLOBE_CLASSES = ("urban_land", "agriculture_land", "rangeland", "forest_land", "water", "barren_land")
DEEPGLOBE_PALETTE = ((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255))
DEEPGLOBE_UNKNOWN = (0, 0, 0)
URBAN_SCENES = ("dense_urban", "suburban", "industrial")


@dataclass(frozen=True)
class SourceSpec:
    """One segmentation source.

    Attributes:
        name: short name (``vaihingen``, ``potsdam``, ``loveda``, ``deepglobe``).
        layout: the real data set whose folder layout the export follows.
        classes: the source's class names; masks hold indices into this (or its palette).
        mapping: master class name -> source class name.
        scene_overrides: scene type -> {master class name -> source class name} exceptions.
        gsd_m: (low, high) metres per pixel of the small tiles.
        scene_mix: scene type -> weight.
        style: the source's sensor.
        class_ranges: source class -> (low, high) expected mean pixel share (checked by the tests).
        palette: one RGB colour per class, in class order (the real set's colour code).
    """

    name: str
    layout: str
    classes: tuple[str, ...]
    mapping: dict[str, str]
    gsd_m: tuple[float, float]
    scene_mix: dict[str, float]
    style: SensorStyle
    scene_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    class_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    palette: tuple[tuple[int, int, int], ...] = ()

    def lookup(self, scene_type: str) -> np.ndarray:
        """Master-class -> source-class index table for one scene type, shape ``(NUM_CLASSES,)``."""
        m = {**self.mapping, **self.scene_overrides.get(scene_type, {})}
        return np.array([self.classes.index(m[c]) for c in CLASSES], np.uint8)

    def scene_probs(self) -> np.ndarray:
        """Probability of each of :data:`SCENE_TYPES`."""
        w = np.array([self.scene_mix.get(s, 0.0) for s in SCENE_TYPES], float)
        return w / w.sum()


_ISPRS_MAP = {
    "impervious": "impervious_surfaces",
    "building": "building",
    "low_vegetation": "low_vegetation",
    "tree": "tree",
    "car": "car",
    "water": "clutter",
    "bare_soil": "clutter",
    "clutter": "clutter",
}

SOURCES: dict[str, SourceSpec] = {
    "vaihingen": SourceSpec(
        name="vaihingen",
        layout="ISPRS Vaihingen",
        classes=ISPRS_CLASSES,
        palette=ISPRS_PALETTE,
        mapping=_ISPRS_MAP,
        gsd_m=(0.35, 0.55),
        scene_mix={"suburban": 0.5, "dense_urban": 0.3, "industrial": 0.1, "rural": 0.1},
        style=SensorStyle(bands="IRRG", difficulty=(2.0, 3.0), haze=(0.0, 0.35), blur=(0.0, 1.4),
                          noise=(0.005, 0.05), resolution=(1.0, 2.2), color_drift=0.1),
        class_ranges={"impervious_surfaces": (0.1, 0.45), "building": (0.1, 0.45), "low_vegetation": (0.1, 0.45),
                      "tree": (0.03, 0.3), "car": (0.002, 0.06), "clutter": (0.0, 0.12)},
    ),
    "potsdam": SourceSpec(
        name="potsdam",
        layout="ISPRS Potsdam",
        classes=ISPRS_CLASSES,
        palette=ISPRS_PALETTE,
        mapping=_ISPRS_MAP,
        gsd_m=(0.25, 0.4),
        scene_mix={"dense_urban": 0.45, "suburban": 0.25, "industrial": 0.3},
        style=SensorStyle(bands="RGB", difficulty=(1.5, 3.5), haze=(0.0, 0.25), blur=(0.0, 1.0),
                          noise=(0.003, 0.04), resolution=(1.0, 1.8), color_drift=0.07),
        class_ranges={"impervious_surfaces": (0.2, 0.6), "building": (0.15, 0.55), "low_vegetation": (0.02, 0.3),
                      "tree": (0.01, 0.2), "car": (0.005, 0.08), "clutter": (0.0, 0.1)},
    ),
    "loveda": SourceSpec(
        name="loveda",
        layout="LoveDA",
        classes=LOVEDA_CLASSES,
        palette=LOVEDA_PALETTE,
        mapping={"impervious": "road", "building": "building", "low_vegetation": "agriculture", "tree": "forest",
                 "car": "background", "water": "water", "bare_soil": "barren", "clutter": "background"},
        scene_overrides={s: {"low_vegetation": "background"} for s in URBAN_SCENES},
        gsd_m=(0.8, 1.2),
        scene_mix={"dense_urban": 0.15, "suburban": 0.2, "industrial": 0.1, "rural": 0.3, "forest": 0.1,
                   "coastal": 0.15},
        style=SensorStyle(bands="RGB", difficulty=(2.5, 2.5), haze=(0.0, 0.55), blur=(0.0, 1.8),
                          noise=(0.01, 0.07), resolution=(1.0, 2.8), color_drift=0.12),
        class_ranges={"background": (0.05, 0.35), "building": (0.03, 0.3), "road": (0.03, 0.3), "water": (0.02, 0.25),
                      "barren": (0.02, 0.25), "forest": (0.05, 0.4), "agriculture": (0.05, 0.45)},
    ),
    "deepglobe": SourceSpec(
        name="deepglobe",
        layout="DeepGlobe Land Cover",
        classes=DEEPGLOBE_CLASSES,
        palette=DEEPGLOBE_PALETTE,
        mapping={"impervious": "urban_land", "building": "urban_land", "low_vegetation": "agriculture_land",
                 "tree": "forest_land", "car": "urban_land", "water": "water", "bare_soil": "barren_land",
                 "clutter": "urban_land"},
        scene_overrides={s: {"low_vegetation": "rangeland"} for s in ("forest", "coastal", *URBAN_SCENES)},
        gsd_m=(1.6, 2.4),
        scene_mix={"rural": 0.45, "forest": 0.2, "coastal": 0.15, "suburban": 0.15, "industrial": 0.05},
        style=SensorStyle(bands="RGB", difficulty=(2.0, 2.5), haze=(0.0, 0.45), blur=(0.2, 1.5),
                          noise=(0.005, 0.05), resolution=(1.0, 2.0), jpeg=(92, 35), color_drift=0.14),
        class_ranges={"urban_land": (0.03, 0.35), "agriculture_land": (0.15, 0.6), "rangeland": (0.03, 0.3),
                      "forest_land": (0.1, 0.45), "water": (0.02, 0.2), "barren_land": (0.03, 0.3)},
    ),
}  # fmt: skip

assert all(len(s.lookup(t)) == NUM_CLASSES for s in SOURCES.values() for t in SCENE_TYPES)
assert all(len(s.palette) == len(s.classes) for s in SOURCES.values())
