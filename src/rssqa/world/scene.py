"""Procedural land-cover scenes: label maps with plausible geometry, generated without Python loops.

Geometry is laid out in metres and rasterised at the sample's ground sample distance (GSD), so a
coarse-GSD source sees small cars as a pixel or two and a fine-GSD source sees roof ridges: the same
reason real sets differ in what is hard to segment. Urban scenes are a rotated street grid whose
blocks split into lots; every lot, parking slot and field draws its own parameters from a hash of its
cell coordinates (:func:`rssqa.world.noise.cell_hash`), which keeps generation vectorised and fast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from rssqa.world.classes import (
    BARE_SOIL,
    BUILDING,
    CAR,
    CLUTTER,
    IMPERVIOUS,
    LOW_VEGETATION,
    NUM_CLASSES,
    SCENE_TYPES,
    TREE,
    WATER,
)
from rssqa.world.noise import cell_hash, cell_key, fractal_noise, smooth_noise


@dataclass
class Scene:
    """One land-cover scene.

    Attributes:
        label: ``H×W`` uint8 master class map (see :data:`rssqa.world.classes.CLASSES`).
        instance: ``H×W`` int64 id of the building, car or field a pixel belongs to (-1 elsewhere).
        roof_side: ``H×W`` int8, +1/-1 on the two halves of pitched roofs (sun-lit / shaded), 0 elsewhere.
        scene_type: one of :data:`rssqa.world.classes.SCENE_TYPES`.
        gsd_m: metres per pixel.
        counts: visible object counts, ``{"buildings": n, "cars": n}``.
    """

    label: np.ndarray
    instance: np.ndarray
    roof_side: np.ndarray
    scene_type: str
    gsd_m: float
    counts: dict[str, int] = field(default_factory=dict)

    def class_fractions(self) -> np.ndarray:
        """Share of pixels per master class, shape ``(NUM_CLASSES,)``."""
        return np.bincount(self.label.ravel(), minlength=NUM_CLASSES) / self.label.size


# Street-grid parameters per urban scene type, in metres: (block_u, block_v, road width, lot width,
# lot occupancy, building depth as a share of the lot (min, max), pitched roofs, car density).
_GRIDS = {
    "dense_urban": dict(block=(45, 75), road=(8, 13), lot=(9, 16), occ=0.9, depth=(0.7, 0.95), pitched=0.5, cars=0.45),
    "suburban": dict(block=(60, 100), road=(6, 9), lot=(15, 24), occ=0.8, depth=(0.3, 0.55), pitched=0.9, cars=0.15),
    "industrial": dict(block=(90, 170), road=(10, 15), lot=(35, 80), occ=0.75, depth=(0.45, 0.8), pitched=0.0, cars=0.25),
    "coastal": dict(block=(70, 110), road=(6, 9), lot=(16, 26), occ=0.7, depth=(0.3, 0.5), pitched=0.8, cars=0.1),
}


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


class _Frame:
    """Pixel coordinates in metres, rotated by the scene's grid angle and shifted by a random origin."""

    def __init__(self, rng: np.random.Generator, size: int, gsd: float, angle: float):
        y, x = (g * gsd for g in _pixel_grid(size))
        self.x, self.y = x, y
        ox, oy = rng.uniform(0, 2000, 2)
        c, s = np.cos(angle), np.sin(angle)
        self.u = (x + ox) * c + (y + oy) * s
        self.v = -(x + ox) * s + (y + oy) * c
        self.size, self.gsd = size, gsd


def generate_scene(rng: np.random.Generator, size: int, gsd_m: float, scene_type: str) -> Scene:
    """Generate one scene of ``size×size`` pixels at ``gsd_m`` metres per pixel.

    Args:
        rng: the sample's own generator (seeded per sample, so samples are independent of order).
        size: image side in pixels.
        gsd_m: ground sample distance in metres per pixel.
        scene_type: one of :data:`rssqa.world.classes.SCENE_TYPES`.
    """
    if scene_type not in SCENE_TYPES:
        raise ValueError(f"unknown scene type {scene_type!r}; choose from {SCENE_TYPES}")
    seed = int(rng.integers(2**31))
    angle = 0.0 if rng.random() < 0.4 else rng.uniform(0, np.pi / 2)
    frame = _Frame(rng, size, gsd_m, angle)
    label = np.full((size, size), LOW_VEGETATION, np.uint8)
    instance = np.full((size, size), -1, np.int64)
    roof = np.zeros((size, size), np.int8)
    if scene_type in _GRIDS:
        _street_grid(rng, seed, frame, scene_type, label, instance, roof)
    elif scene_type == "rural":
        _rural(rng, seed, frame, label, instance, roof)
    else:
        _forest(rng, frame, label)
    if scene_type == "coastal":
        _coast(rng, frame, label, instance, roof)
    _clutter(rng, frame, label)
    return Scene(label, instance, roof, scene_type, gsd_m, _count(label, instance))


def _street_grid(rng, seed, f: _Frame, kind: str, label, instance, roof) -> None:
    p = _GRIDS[kind]
    bu_m, bv_m = rng.uniform(*p["block"]), rng.uniform(*p["block"]) * rng.uniform(1.0, 1.6)
    road_w, lot_w = rng.uniform(*p["road"]), rng.uniform(*p["lot"])
    bu, lu = np.divmod(f.u, bu_m)
    bv, lv = np.divmod(f.v, bv_m)
    road_u, road_v = lu < road_w, lv < road_w  # bands of constant u / constant v
    depth = (bu_m - road_w) / 2
    row = (lu - road_w) >= depth
    lot_u = np.where(row, bu_m - lu, lu - road_w)  # distance from the lot's own street
    lot_i, lot_v = np.divmod(lv - road_w, lot_w)
    cell = cell_key(bu, bv, row, lot_i)
    occupied = cell_hash(seed, cell) < p["occ"]
    frac = p["depth"][0] + (p["depth"][1] - p["depth"][0]) * cell_hash(seed + 1, cell)
    b_depth = depth * frac
    setback = (depth - b_depth) * cell_hash(seed + 2, cell) * (0.25 if kind == "dense_urban" else 0.6)
    side = lot_w * (0.03 if kind == "dense_urban" else 0.12) * (1 + cell_hash(seed + 3, cell))
    in_lot = ~road_u & ~road_v & (lot_v < lot_w)
    building = in_lot & occupied & (lot_u >= setback) & (lot_u < setback + b_depth)
    building &= (lot_v >= side) & (lot_v < lot_w - side)

    yard = LOW_VEGETATION if kind in ("suburban", "coastal") else IMPERVIOUS
    label[in_lot] = yard
    if kind == "industrial":  # open ground on some industrial lots
        label[in_lot & (cell_hash(seed + 4, cell) < 0.2)] = BARE_SOIL
    elif kind == "dense_urban":  # courtyards with some green
        label[in_lot & (cell_hash(seed + 4, cell) < 0.25)] = LOW_VEGETATION
    label[in_lot & ~occupied & (cell_hash(seed + 5, cell) < 0.3)] = BARE_SOIL  # empty lots, building sites
    _trees(rng, f, label, cover={"dense_urban": 0.08, "suburban": 0.3, "industrial": 0.05, "coastal": 0.2}[kind])
    label[road_u | road_v] = IMPERVIOUS
    label[building] = BUILDING
    instance[building] = (cell_hash(seed + 6, cell)[building] * 2**40).astype(np.int64)
    pitched = building & (cell_hash(seed + 7, cell) < p["pitched"])
    roof[pitched] = np.where(lot_u[pitched] - setback[pitched] < b_depth[pitched] / 2, 1, -1)
    _street_cars(seed, road_u, road_v, lu, lv, f, road_w, p["cars"], label, instance)
    if kind == "industrial":
        _parking(seed, f, label, instance, density=0.35)


def _street_cars(seed, road_u, road_v, lu, lv, f: _Frame, road_w, density, label, instance) -> None:
    # cars parked/driving in two lanes of each street: 6 m slots along the street (road pixels only)
    lane_w = road_w / 2
    for band, across, along, tag in ((road_u & ~road_v, lu, f.v, 11), (road_v & ~road_u, lv, f.u, 13)):
        idx = np.flatnonzero(band)
        lane, pos = np.divmod(across.ravel()[idx], lane_w)
        slot, along_pos = np.divmod(along.ravel()[idx], 6.0)
        block = cell_key(np.floor(f.u.ravel()[idx] / 500), np.floor(f.v.ravel()[idx] / 500))
        h = cell_hash(seed + tag, cell_key(slot, lane, block))
        car = (h < density) & (along_pos > 0.7) & (along_pos < 5.2) & (np.abs(pos - lane_w / 2) < 0.95)
        label.ravel()[idx[car]] = CAR
        instance.ravel()[idx[car]] = (h[car] * 2**40).astype(np.int64) + tag


def _parking(seed, f: _Frame, label, instance, density: float) -> None:
    # 2.6 m × 5.5 m bays on open impervious ground
    bay_i, bu = np.divmod(f.u, 2.6)
    bay_j, bv = np.divmod(f.v, 5.5)
    h = cell_hash(seed + 17, cell_key(bay_i, bay_j))
    zone = smooth_noise(np.random.default_rng(seed), f.size, 2) > 0.6
    car = (label == IMPERVIOUS) & zone & (h < density) & (bu > 0.4) & (bu < 2.2) & (bv > 0.5) & (bv < 5.0)
    label[car] = CAR
    instance[car] = (h[car] * 2**40).astype(np.int64) + 17


def _trees(rng, f: _Frame, label, cover: float) -> None:
    # canopy = blobs of fractal noise above the quantile that gives the wanted cover, on open ground
    crown_cells = max(2, int(f.size * f.gsd / 12))
    n = fractal_noise(rng, f.size, crown_cells, octaves=2)
    thr = 1.0 - cover * rng.uniform(0.5, 1.5)
    label[(n > np.quantile(n, min(max(thr, 0.0), 1.0))) & (label != IMPERVIOUS)] = TREE


def _rural(rng, seed, f: _Frame, label, instance, roof) -> None:
    # fields: Voronoi cells of a few seeds, each crop (low vegetation) or ploughed (bare soil)
    k = int(rng.integers(3, 9))
    extent = f.size * f.gsd
    seeds = rng.uniform(-0.2 * extent, 1.2 * extent, (k, 2)).astype(np.float32)
    y, x = f.y, f.x
    d = (x[None] - seeds[:, 0, None, None]) ** 2 + (y[None] - seeds[:, 1, None, None]) ** 2
    cell = d.argmin(0)
    ploughed = rng.random(k) < 0.35
    label[:] = np.where(ploughed[cell], BARE_SOIL, LOW_VEGETATION)
    instance[:] = cell + 1000
    second = np.partition(d, 1, axis=0)[:2]
    hedge = np.sqrt(second[1]) - np.sqrt(second[0]) < 2.5 * rng.uniform(0, 1.2)  # field borders
    label[hedge] = TREE
    _trees(rng, f, label, cover=rng.uniform(0.02, 0.12))
    if rng.random() < 0.8:
        road = _line(rng, f, width=rng.uniform(5, 8))
        label[road], instance[road] = IMPERVIOUS, -1
    if rng.random() < 0.5:  # a farmstead: a few buildings on a yard
        cx, cy = rng.uniform(0.2, 0.8, 2) * extent
        yard = (np.abs(x - cx) < 25) & (np.abs(y - cy) < 20)
        label[yard], instance[yard] = IMPERVIOUS, -1
        for i in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(8, 20, 2)
            bx, by = cx + rng.uniform(-15, 15), cy + rng.uniform(-12, 12)
            b = (np.abs(x - bx) < w / 2) & (np.abs(y - by) < h / 2)
            label[b], instance[b] = BUILDING, seed * 8 + i
            roof[b] = np.where(x[b] < bx, 1, -1)
    if rng.random() < 0.2:
        _pond(rng, f, label, instance)


def _forest(rng, f: _Frame, label) -> None:
    label[:] = TREE
    n = fractal_noise(rng, f.size, max(2, int(f.size * f.gsd / 40)), octaves=2)
    label[n < np.quantile(n, rng.uniform(0.05, 0.35))] = LOW_VEGETATION  # clearings
    if rng.random() < 0.5:
        label[_line(rng, f, width=rng.uniform(3, 6))] = BARE_SOIL  # forest track
    if rng.random() < 0.25:
        _pond(rng, f, label, None)


def _coast(rng, f: _Frame, label, instance, roof) -> None:
    # the sea covers one side; a beach of bare soil along a wavy shoreline
    phi = rng.uniform(0, 2 * np.pi)
    y, x = f.y, f.x
    extent = f.size * f.gsd
    d = (x - extent / 2) * np.cos(phi) + (y - extent / 2) * np.sin(phi)
    d += (smooth_noise(rng, f.size, 3) - 0.5) * 0.3 * extent
    shore = rng.uniform(-0.3, 0.25) * extent
    beach = rng.uniform(4, 15)
    water = d > shore
    sand = (d > shore - beach) & ~water
    for m, c in ((sand, BARE_SOIL), (water, WATER)):
        label[m], instance[m], roof[m] = c, -1, 0


def _pond(rng, f: _Frame, label, instance) -> None:
    n = smooth_noise(rng, f.size, 3)
    pond = n > np.quantile(n, rng.uniform(0.88, 0.97))
    label[pond] = WATER
    if instance is not None:
        instance[pond] = -1


def _line(rng, f: _Frame, width: float) -> np.ndarray:
    y, x = f.y, f.x
    extent = f.size * f.gsd
    phi = rng.uniform(0, np.pi)
    px, py = rng.uniform(0.2, 0.8, 2) * extent
    return np.abs((x - px) * np.sin(phi) - (y - py) * np.cos(phi)) < width / 2


def _clutter(rng, f: _Frame, label) -> None:
    if rng.random() < 0.5:
        n = smooth_noise(rng, f.size, max(2, int(f.size * f.gsd / 8)))
        label[n > np.quantile(n, 1 - rng.uniform(0.003, 0.02))] = CLUTTER


def _count(label: np.ndarray, instance: np.ndarray) -> dict[str, int]:
    # an object counts when at least 3 of its pixels are visible
    counts = {}
    for name, cls in (("buildings", BUILDING), ("cars", CAR)):
        ids = instance[label == cls]
        if ids.size:
            _, n = np.unique(ids, return_counts=True)
            counts[name] = int((n >= 3).sum())
        else:
            counts[name] = 0
    return counts
