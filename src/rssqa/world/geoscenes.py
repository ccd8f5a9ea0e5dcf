"""Large georeferenced scenes: whole GeoTIFF scenes of each source, for windowed scoring.

A scene is what a segmentation method meets after deployment: one big raster, much larger than the
tiles it was trained on, whose content and conditions change across it. It is a mosaic of blocks,
each rendered by the world's own renderer (:func:`rssqa.world.scene.generate_scene`,
:func:`rssqa.world.render.render`) at the source's ground sample distance, in the source's sensor
style and class schema, so a block looks like one of the source's tiles:

- scene types follow a smooth zoning field over the block grid, ordered from urban core to forest,
  so neighbouring blocks tend to share a type and each type covers about its share of the source's
  scene mix (every type of the mix appears once the grid has enough blocks);
- every block draws its own acquisition difficulty (haze, blur, noise, loss of resolution, JPEG
  quality) while the scene shares one illumination, tone curve and sun position;
- block borders are displaced by smooth noise, so blocks meet along wavy lines rather than a grid
  (the truth follows the same lines: image and truth always come from the same block);
- one corner triangle is no-data: 0 in every band (rendered pixels are clipped to at least 1, so
  no real pixel is 0 in all bands) and 255 in the truth.

Scenes come from their own seed stream (``STREAMS["geo_scenes"]``), never from the tiles'. Each
scene has one integer seed (recorded in ``scenes.json``) from which everything in it follows; the
process pool renders blocks, the main process pastes them into the one scene it holds and writes
the GeoTIFFs, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError
from rssqa.runs import atomic_write_json
from rssqa.world.generate import STREAMS
from rssqa.world.noise import fractal_noise, smooth_noise
from rssqa.world.render import render, sample_sensor
from rssqa.world.scene import generate_scene
from rssqa.world.sources import IGNORE_INDEX, SOURCES, SourceSpec

INDEX_NAME = "scenes.json"
IMAGE_NODATA = 0
TIFF_BLOCK = 256
MIN_SIZE = TIFF_BLOCK
MIN_BLOCK = 64

# Scene types from urban core to open land: the zoning field is mapped onto this order.
URBANNESS = ("dense_urban", "industrial", "suburban", "coastal", "rural", "forest")

# Where each source's scenes lie: a projected CRS of the real set's region (EPSG code) and the
# north-west corner of the first scene in it (easting, northing in metres); further scenes of a
# source sit side by side to the east.
PLACES: dict[str, tuple[int, float, float]] = {
    "vaihingen": (25832, 497_000.0, 5_420_000.0),  # Vaihingen an der Enz, ETRS89 / UTM zone 32N
    "potsdam": (25833, 368_000.0, 5_806_000.0),  # Potsdam, ETRS89 / UTM zone 33N
    "loveda": (32650, 668_000.0, 3_548_000.0),  # Nanjing, WGS 84 / UTM zone 50N
    "deepglobe": (32647, 715_000.0, 1_659_000.0),  # central Thailand, WGS 84 / UTM zone 47N
}
BAND_NAMES = {"RGB": ("red", "green", "blue"), "IRRG": ("nir", "red", "green")}
SHARED_SENSOR = ("illumination", "gamma", "sun_azimuth", "sun_elevation")


@dataclass
class ScenesConfig:
    """Large georeferenced scenes per source; off by default, so older configs write the same world.

    Attributes:
        size: scene side in pixels (0: no scenes); otherwise at least 256 (one GeoTIFF tile).
        per_source: scenes per source (0: no scenes).
        block: approximate side in pixels of the mosaic's blocks (one scene type and one sensor
            draw each); a scene has ``max(2, round(size / block))`` blocks per side.
    """

    size: int = 1024
    per_source: int = 0
    block: int = 256

    def __post_init__(self) -> None:
        for key in ("size", "per_source", "block"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RSSQAError(f"world.scenes.{key}: expected an integer >= 0, got {value!r}")
        if self.enabled and self.size < MIN_SIZE:
            raise RSSQAError(f"world.scenes.size: {self.size} px is below {MIN_SIZE} (use 0 to turn scenes off)")
        if self.enabled and self.block < MIN_BLOCK:
            raise RSSQAError(f"world.scenes.block: {self.block} px is below {MIN_BLOCK}")

    @property
    def enabled(self) -> bool:
        """Whether any scene is written."""
        return self.size > 0 and self.per_source > 0

    def grid(self) -> tuple[int, int]:
        """``(blocks per side, block side in pixels)``; the blocks cover the scene."""
        n = max(2, round(self.size / max(self.block, 1)))
        return n, math.ceil(self.size / n)


@dataclass
class ScenePlan:
    """Everything one scene is made from, drawn in the main process from the scene's seed.

    Attributes:
        source: the source's name.
        scene_id: unique id, ``<source>_<k:03d>``.
        seed: the scene's own seed (everything in the scene follows from it).
        size: side in pixels.
        gsd_m: metres per pixel (also the GeoTIFF's pixel size).
        n: blocks per side.
        block: block side in pixels; each block is rendered ``margin`` pixels larger on every side.
        margin: how far a block border may move (and the extra rendered around each block).
        scene_types: the ``n×n`` blocks' scene types, row-major.
        shared_sensor: the acquisition conditions every block shares.
        nodata_corner: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
        nodata_reach: the no-data triangle's legs as a share of the side.
    """

    source: str
    scene_id: str
    seed: int
    size: int
    gsd_m: float
    n: int
    block: int
    margin: int
    scene_types: list[str]
    shared_sensor: dict[str, float]
    nodata_corner: int
    nodata_reach: float


def scene_seed(world_seed: int, source_index: int, k: int) -> int:
    """The seed of scene ``k`` of source number ``source_index``: a stream of its own, not the tiles'."""
    rng = np.random.default_rng([world_seed, STREAMS["geo_scenes"], source_index, k])
    return int(rng.integers(2**32))


def plan_scene(spec: SourceSpec, scene_id: str, seed: int, cfg: ScenesConfig) -> ScenePlan:
    """Draw a scene's GSD, block scene types, shared sensor conditions and no-data corner."""
    rng = np.random.default_rng([seed, 0])
    gsd = round(float(np.exp(rng.uniform(np.log(spec.gsd_m[0]), np.log(spec.gsd_m[1])))), 4)
    n, block = cfg.grid()
    # zoning: rank the blocks by a smooth field and give each type its share of the ranks
    zoning = smooth_noise(rng, n, max(1, n // 2)).ravel()
    rank = np.empty(n * n, np.int64)
    rank[np.argsort(zoning, kind="stable")] = np.arange(n * n)
    types = [t for t in URBANNESS if spec.scene_mix.get(t, 0.0) > 0]
    weights = np.array([spec.scene_mix[t] for t in types], float)
    cumulative = np.cumsum(weights) / weights.sum()
    pick = np.minimum(np.searchsorted(cumulative, (rank + 0.5) / (n * n)), len(types) - 1)
    base = sample_sensor(rng, spec.style)
    return ScenePlan(
        source=spec.name,
        scene_id=scene_id,
        seed=seed,
        size=cfg.size,
        gsd_m=gsd,
        n=n,
        block=block,
        margin=max(8, block // 8),
        scene_types=[types[int(i)] for i in pick],
        shared_sensor={k: getattr(base, k) for k in SHARED_SENSOR},
        nodata_corner=int(rng.integers(4)),
        nodata_reach=float(rng.uniform(0.2, 0.4)),
    )


def render_block(plan: ScenePlan, index: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Render block ``index`` (row-major) of ``plan`` with its margin.

    Returns:
        image ``S×S×3`` uint8 (every value >= 1), truth ``S×S`` uint8 in the source's class order,
        and the block's sensor difficulty, where ``S = block + 2 * margin``.
    """
    spec = SOURCES[plan.source]
    rng = np.random.default_rng([plan.seed, 2 + index])
    scene_type = plan.scene_types[index]
    scene = generate_scene(rng, plan.block + 2 * plan.margin, plan.gsd_m, scene_type)
    sensor = dataclasses.replace(sample_sensor(rng, spec.style), **plan.shared_sensor)
    image = np.maximum(render(rng, scene, sensor, spec.style), 1)
    return image, spec.lookup(scene_type)[scene.label], sensor.difficulty


def block_map(plan: ScenePlan) -> np.ndarray:
    """``size×size`` int32 block index of every pixel: the block grid with borders moved by smooth noise."""
    rng = np.random.default_rng([plan.seed, 1])
    pixels = np.arange(plan.size, dtype=np.float32)
    index = []
    for axis in (0, 1):
        shift = fractal_noise(rng, plan.size, 2 * plan.n, octaves=2) - 0.5
        shift *= 3 * plan.margin
        np.clip(shift, -plan.margin, plan.margin, out=shift)
        shift += pixels[:, None] if axis == 0 else pixels[None, :]
        # truncation only differs from floor below 0, which clips to the first block either way
        index.append(np.clip(shift.astype(np.int32) // plan.block, 0, plan.n - 1))
    return index[0] * plan.n + index[1]


def nodata_mask(plan: ScenePlan) -> np.ndarray:
    """``size×size`` bool: the no-data triangle in the plan's corner."""
    t = np.arange(plan.size, dtype=np.float32) / plan.size
    v = t[::-1] if plan.nodata_corner >= 2 else t
    u = t[::-1] if plan.nodata_corner % 2 else t
    return (v[:, None] + u[None, :]) < plan.nodata_reach


def _block_job(args: tuple[ScenePlan, int]) -> tuple[int, np.ndarray, np.ndarray, float]:
    plan, index = args
    return (index, *render_block(plan, index))


def assemble_scene(
    plan: ScenePlan, blocks: Iterator[tuple[int, np.ndarray, np.ndarray, float]]
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Paste rendered blocks (any order) into one scene and cut its no-data corner.

    Returns:
        image ``H×W×3`` uint8 (0 in every band exactly where no-data), truth ``H×W`` uint8
        (255 where no-data), and the blocks' difficulties, row-major.
    """
    size, m = plan.size, plan.margin
    owner = block_map(plan)
    image = np.zeros((size, size, 3), np.uint8)
    truth = np.full((size, size), IGNORE_INDEX, np.uint8)
    difficulty = [0.0] * (plan.n * plan.n)
    filled = 0
    for index, block_image, block_truth, d in blocks:
        r, c = divmod(index, plan.n)
        y0, x0 = r * plan.block - m, c * plan.block - m  # the rendered block's top-left in the scene
        ys = slice(max(y0, 0), min(y0 + plan.block + 2 * m, size))
        xs = slice(max(x0, 0), min(x0 + plan.block + 2 * m, size))
        mine = owner[ys, xs] == index
        local = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        image[ys, xs][mine] = block_image[local][mine]
        truth[ys, xs][mine] = block_truth[local][mine]
        difficulty[index] = round(float(d), 4)
        filled += int(mine.sum())
    if filled != size * size:  # the margin covers every moved border; anything else is a bug
        raise RSSQAError(f"scene {plan.scene_id}: blocks covered {filled} of {size * size} pixels")
    hole = nodata_mask(plan)
    image[hole] = IMAGE_NODATA
    truth[hole] = IGNORE_INDEX
    return image, truth, difficulty


# ------------------------------------------------------------------------------------------- GeoTIFF
def scene_transform(plan: ScenePlan, k: int) -> tuple[str, tuple[float, ...]]:
    """The CRS (``"EPSG:n"``) and north-up affine transform ``(a, b, c, d, e, f)`` of scene ``k``."""
    epsg, east, north = PLACES[plan.source]
    step = 1000.0 * (math.ceil(plan.size * SOURCES[plan.source].gsd_m[1] / 1000.0) + 1)
    return f"EPSG:{epsg}", (plan.gsd_m, 0.0, east + k * step, 0.0, -plan.gsd_m, north)


def write_geotiff(
    path: Path,
    bands: np.ndarray,
    *,
    crs: str,
    transform: tuple[float, ...],
    nodata: int,
    descriptions: tuple[str, ...],
    tags: dict[str, str],
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> None:
    """Write ``bands`` (``C×H×W`` uint8) as a tiled (256), deflate-compressed GeoTIFF, atomically.

    GDAL's side files (``.aux.xml``) are turned off so that the one file holds everything.
    """
    import rasterio
    from rasterio.transform import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.tif")
    count, height, width = bands.shape
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": "uint8",
        "crs": crs,
        "transform": Affine(*transform),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": TIFF_BLOCK,
        "blockysize": TIFF_BLOCK,
        "compress": "deflate",
        "predictor": 2 if count > 1 else 1,
        "interleave": "pixel",
    }
    try:
        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(tmp, "w", **profile) as dst:
            dst.write(bands)
            dst.descriptions = descriptions
            dst.update_tags(**tags)
            if colormap is not None:
                dst.write_colormap(1, colormap)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_scene(
    root: Path, plan: ScenePlan, k: int, image: np.ndarray, truth: np.ndarray, difficulty: list[float]
) -> dict[str, Any]:
    """Write one scene's image and truth GeoTIFFs under ``root/scenes/<source>/``; return its index entry."""
    spec = SOURCES[plan.source]
    crs, transform = scene_transform(plan, k)
    folder = Path("scenes") / plan.source
    image_rel, truth_rel = folder / f"{plan.scene_id}.tif", folder / f"{plan.scene_id}_truth.tif"
    tags = {"rssqa_source": plan.source, "rssqa_scene": plan.scene_id, "rssqa_seed": str(plan.seed)}
    write_geotiff(
        root / image_rel,
        np.moveaxis(image, -1, 0),
        crs=crs,
        transform=transform,
        nodata=IMAGE_NODATA,
        descriptions=BAND_NAMES[spec.style.bands],
        tags={**tags, "rssqa_bands": spec.style.bands},
    )
    colormap = {i: (*rgb, 255) for i, rgb in enumerate(spec.palette)}
    colormap[IGNORE_INDEX] = (0, 0, 0, 0)
    write_geotiff(
        root / truth_rel,
        truth[None],
        crs=crs,
        transform=transform,
        nodata=IGNORE_INDEX,
        descriptions=("class",),
        tags={**tags, "rssqa_classes": ",".join(spec.classes)},
        colormap=colormap,
    )
    n = plan.n
    return {
        "source": plan.source,
        "id": plan.scene_id,
        "image": image_rel.as_posix(),
        "truth": truth_rel.as_posix(),
        "size": [plan.size, plan.size],
        "crs": crs,
        "transform": list(transform),
        "gsd_m": plan.gsd_m,
        "bands": spec.style.bands,
        "classes": list(spec.classes),
        "palette": [list(rgb) for rgb in spec.palette],
        "nodata": {"image": IMAGE_NODATA, "truth": IGNORE_INDEX},
        "seed": plan.seed,
        "blocks": {
            "grid": [n, n],
            "size": plan.block,
            "scene_types": [plan.scene_types[r * n : (r + 1) * n] for r in range(n)],
            "difficulty": [difficulty[r * n : (r + 1) * n] for r in range(n)],
        },
    }


# --------------------------------------------------------------------------------------------- export
def _blocks(
    plan: ScenePlan, pool: ProcessPoolExecutor | None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, float]]:
    jobs = [(plan, i) for i in range(plan.n * plan.n)]
    run: Callable = map if pool is None else pool.map
    yield from run(_block_job, jobs)


def export_scenes(
    cfg: ScenesConfig, seed: int, names: list[str], out: str | os.PathLike, workers: int = 1
) -> dict[str, Any]:
    """Write ``cfg.per_source`` scenes of every source in ``names`` under ``out/scenes/``.

    Writes ``out/scenes/<source>/<id>.tif`` (image) and ``<id>_truth.tif`` (class index, 255 =
    ignore) one scene at a time, then ``out/scenes/scenes.json`` last. Nothing is written when
    ``cfg`` is off.

    Args:
        cfg: the scenes' configuration.
        seed: the world's seed.
        names: the sources to write scenes of.
        out: the world folder (paths in ``scenes.json`` are relative to it).
        workers: processes rendering blocks; the bytes written do not depend on it.

    Returns:
        The summary: counts, sizes, bytes, time, and per source the ids, block scene types,
        no-data share and class fractions.
    """
    out = Path(out)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"n": 0, "size": cfg.size if cfg.enabled else 0, "per_source": cfg.per_source}
    if not cfg.enabled:
        return summary
    for name in names:
        if name not in SOURCES or name not in PLACES:
            raise RSSQAError(f"world.sources.names: no scenes for unknown source {name!r}; choose from {list(PLACES)}")
    n, block = cfg.grid()
    entries, per_source, n_bytes = [], {}, 0
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for name in names:
            spec, source_index = SOURCES[name], list(SOURCES).index(name)
            hist, nodata, types, ids = np.zeros(len(spec.classes), np.int64), 0, Counter(), []
            for k in range(cfg.per_source):
                scene_id = f"{name}_{k:03d}"
                plan = plan_scene(spec, scene_id, scene_seed(seed, source_index, k), cfg)
                image, truth, difficulty = assemble_scene(plan, _blocks(plan, pool))
                entry = _write_scene(out, plan, k, image, truth, difficulty)
                entries.append(entry)
                n_bytes += sum((out / entry[key]).stat().st_size for key in ("image", "truth"))
                hist += np.bincount(truth.ravel(), minlength=256)[: len(spec.classes)]
                nodata += int((truth == IGNORE_INDEX).sum())
                types.update(plan.scene_types)
                ids.append(scene_id)
                del image, truth  # one scene in memory at a time
            total = cfg.per_source * cfg.size * cfg.size
            per_source[name] = {
                "n": cfg.per_source,
                "ids": ids,
                "crs": f"EPSG:{PLACES[name][0]}",
                "block_scene_types": dict(sorted(types.items())),
                "nodata_share": round(nodata / total, 4),
                "class_fractions": {
                    c: round(float(f), 4) for c, f in zip(spec.classes, hist / max(hist.sum(), 1), strict=True)
                },
            }
    finally:
        if pool is not None:
            pool.shutdown()
    atomic_write_json(out / "scenes" / INDEX_NAME, {"scenes": entries})
    seconds = time.perf_counter() - t0
    summary.update(
        n=len(entries),
        block=block,
        grid=[n, n],
        bytes=n_bytes,
        megapixels=round(len(entries) * cfg.size * cfg.size / 1e6, 3),
        megapixels_per_s=round(len(entries) * cfg.size * cfg.size / 1e6 / max(seconds, 1e-9), 2),
        seconds=round(seconds, 2),
        sources=per_source,
    )
    return summary
