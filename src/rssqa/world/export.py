"""Write the world to disk: corpus shards per tier, each source in its real data set's layout, and
large georeferenced scenes per source (:mod:`rssqa.world.geoscenes`).

Work is split into independent jobs (one shard, one block of tiles, or one block of a scene), run in
a process pool; the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from rssqa.data.shards import write_shard, write_sizes
from rssqa.runs import atomic_write_json, write_summary
from rssqa.world.generate import CorpusConfig, Tile, make_pair, make_tile
from rssqa.world.geoscenes import ScenesConfig, export_scenes
from rssqa.world.sources import DEEPGLOBE_PALETTE, DEEPGLOBE_UNKNOWN, IGNORE_INDEX, ISPRS_PALETTE, SOURCES

_URBAN = {"dense_urban", "suburban", "industrial"}


@dataclass
class SourcesConfig:
    """The segmentation sources.

    Attributes:
        image_size: tile side in pixels.
        n_images: tiles per source (one number for all, or per source name).
        val_fraction: share of tiles in the validation folder, for layouts that have one (LoveDA).
        names: which sources to write.
    """

    image_size: int = 64
    n_images: int | dict[str, int] = 96
    val_fraction: float = 0.2
    names: list[str] = field(default_factory=lambda: list(SOURCES))

    def count(self, name: str) -> int:
        """Tiles of source ``name``."""
        return self.n_images[name] if isinstance(self.n_images, dict) else self.n_images


@dataclass
class WorldConfig:
    """The whole embedded world: one seed, a corpus, the segmentation sources and their large scenes."""

    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)


# --------------------------------------------------------------------------------------------- corpus
def _corpus_job(args: tuple[int, str, int, int, CorpusConfig, str]) -> tuple[str, int, Counter]:
    seed, tier, start, stop, cfg, path = args
    samples = [make_pair(seed, tier, i, cfg) for i in range(start, stop)]
    write_shard(path, samples)
    stats: Counter = Counter()
    for s in samples:
        t = s["json"]["truth"]
        stats[f"scene/{t['scene']}"] += 1
        stats[f"noise/{t['noise'] or 'clean'}"] += 1
    return Path(path).name, len(samples), stats


def export_corpus(cfg: CorpusConfig, seed: int, out: Path, workers: int = 1) -> dict[str, Any]:
    """Write ``out/{trusted,coarse}/shard-*.tar`` and their ``sizes.json``; return counts."""
    n_trusted = cfg.n_trusted()
    summary: dict[str, Any] = {}
    for tier, n in (("trusted", n_trusted), ("coarse", cfg.n_samples - n_trusted)):
        folder = out / tier
        jobs = [
            (seed, tier, s, min(s + cfg.shard_size, n), cfg, str(folder / f"shard-{k:06d}.tar"))
            for k, s in enumerate(range(0, n, cfg.shard_size))
        ]
        sizes, stats = {}, Counter()
        for name, count, st in _run(jobs, _corpus_job, workers, f"corpus/{tier}"):
            sizes[name] = count
            stats.update(st)
        write_sizes(folder, sizes)
        summary[tier] = {"n": n, "n_shards": len(sizes), **dict(sorted(stats.items()))}
    return summary


# -------------------------------------------------------------------------------------------- sources
def _save(path: Path, array: np.ndarray, fmt: str, **kw: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format=fmt, **kw)
    os.replace(tmp, path)


def _palette_mask(mask: np.ndarray, palette: tuple[tuple[int, int, int], ...], unknown=(0, 0, 0)) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    table[IGNORE_INDEX] = unknown
    return table[mask]


def _write_tile(name: str, root: Path, i: int, tile: Tile, val: bool) -> str:
    """Write one tile in the source's real layout; return the image id used."""
    if name == "vaihingen":
        stem = f"top_mosaic_09cm_area{i + 1}"
        _save(root / "top" / f"{stem}.tif", tile.image, "TIFF")
        _save(root / "gts_for_participants" / f"{stem}.tif", _palette_mask(tile.mask, ISPRS_PALETTE), "TIFF")
        return stem
    if name == "potsdam":
        a, b = 2 + i // 14, 7 + i % 14
        _save(root / "2_Ortho_RGB" / f"top_potsdam_{a}_{b}_RGB.tif", tile.image, "TIFF")
        _save(root / "5_Labels_all" / f"top_potsdam_{a}_{b}_label.tif", _palette_mask(tile.mask, ISPRS_PALETTE), "TIFF")
        return f"top_potsdam_{a}_{b}"
    if name == "loveda":
        domain = "Urban" if tile.scene_type in _URBAN else "Rural"
        split = "Val" if val else "Train"
        index_mask = np.where(tile.mask == IGNORE_INDEX, 0, tile.mask + 1).astype(np.uint8)  # 0 = no-data
        _save(root / split / domain / "images_png" / f"{i}.png", tile.image, "PNG")
        _save(root / split / domain / "masks_png" / f"{i}.png", index_mask, "PNG")
        return str(i)
    if name == "deepglobe":
        uid = 100000 + i * 37
        _save(root / "train" / f"{uid}_sat.jpg", tile.image, "JPEG", quality=95)
        _save(root / "train" / f"{uid}_mask.png", _palette_mask(tile.mask, DEEPGLOBE_PALETTE, DEEPGLOBE_UNKNOWN), "PNG")
        return str(uid)
    raise ValueError(f"unknown source {name!r}")


def _source_job(args: tuple[int, str, int, int, int, float, str]) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    seed, name, start, stop, size, val_fraction, root = args
    spec = SOURCES[name]
    source_index = list(SOURCES).index(name)
    rows = []
    for i in range(start, stop):
        tile = make_tile(seed, spec, source_index, i, size)
        val = np.random.default_rng([seed, 99, source_index, i]).random() < val_fraction
        image_id = _write_tile(name, Path(root), i, tile, val)
        hist = np.bincount(tile.mask.ravel(), minlength=256)[: len(spec.classes)]
        meta = {"scene": tile.scene_type, "gsd_m": round(tile.gsd_m, 4), "sensor": tile.sensor, "val": bool(val)}
        rows.append((image_id, meta, hist))
    return rows


def export_sources(cfg: SourcesConfig, seed: int, out: Path, workers: int = 1) -> dict[str, Any]:
    """Write ``out/<source>/`` for every source in its real layout, plus ``world_meta.json``."""
    summary = {}
    for name in cfg.names:
        if name not in SOURCES:
            raise ValueError(f"sources.names: unknown source {name!r}; choose from {list(SOURCES)}")
        n, spec = cfg.count(name), SOURCES[name]
        jobs = [(seed, name, s, min(s + 32, n), cfg.image_size, cfg.val_fraction, str(out / name)) for s in range(0, n, 32)]
        meta, hist = {}, np.zeros(len(spec.classes), np.int64)
        for rows in _run(jobs, _source_job, workers, f"sources/{name}"):
            for image_id, m, h in rows:
                meta[image_id] = m
                hist += h
        atomic_write_json(out / name / "world_meta.json", meta)
        fractions = hist / max(hist.sum(), 1)
        summary[name] = {
            "layout": spec.layout,
            "n_images": n,
            "class_fractions": {c: round(float(f), 4) for c, f in zip(spec.classes, fractions, strict=True)},
            "scenes": dict(sorted(Counter(m["scene"] for m in meta.values()).items())),
        }
    return summary


# ---------------------------------------------------------------------------------------------- world
def _run(jobs: list, fn, workers: int, desc: str):
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=None, leave=False)
    if workers <= 1:
        for job in jobs:
            yield fn(job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(fn, jobs):
                yield result
                bar.update()
    bar.close()


def generate_world(cfg: WorldConfig, out: str | os.PathLike, workers: int = 1) -> dict[str, Any]:
    """Write the corpus, the sources and the scenes under ``out`` and, last, ``out/summary.json``.

    Args:
        cfg: the world's configuration.
        out: the run folder (e.g. ``runs/smoke/world``).
        workers: processes to use; the output does not depend on it.

    Returns:
        The summary: counts per tier and noise kind, per source and class, the scenes (counts,
        sizes, bytes), and timing.
    """
    out = Path(out)
    t0 = time.perf_counter()
    corpus = export_corpus(cfg.corpus, cfg.seed, out / "corpus", workers)
    t1 = time.perf_counter()
    sources = export_sources(cfg.sources, cfg.seed, out / "sources", workers)
    t2 = time.perf_counter()
    scenes = export_scenes(cfg.scenes, cfg.seed, cfg.sources.names, out, workers)
    t3 = time.perf_counter()
    n_tiles = sum(s["n_images"] for s in sources.values())
    summary = {
        "seed": cfg.seed,
        "config": asdict(cfg),
        "corpus": corpus,
        "sources": sources,
        "scenes": scenes,
        "workers": workers,
        "corpus_samples_per_s": round(cfg.corpus.n_samples / max(t1 - t0, 1e-9), 1),
        "source_tiles_per_s": round(n_tiles / max(t2 - t1, 1e-9), 1),
        "scene_seconds": round(t3 - t2, 2),
        "seconds": round(t3 - t0, 2),
    }
    write_summary(out, summary)
    return summary
