"""Sample generation: one image-text pair or one segmentation tile from (seed, stream, index).

Every sample has its own generator, ``default_rng([seed, stream, index])``, so a sample is the same
whatever order, process or shard produces it; evaluation sets use their own streams and never
overlap the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rssqa.world.captions import NOISE_KINDS, coarse_clean_caption, noisy_caption, trusted_caption
from rssqa.world.classes import CLASSES, SCENE_TYPES
from rssqa.world.render import SensorStyle, render, sample_sensor
from rssqa.world.scene import Scene, generate_scene
from rssqa.world.sources import IGNORE_INDEX, SourceSpec

STREAMS = {"trusted": 1, "coarse": 2, "eval_scenes": 100, "eval_pairs": 101, "source": 10, "geo_scenes": 200}

# Web imagery: every kind of sensor, from crisp aerial to hazy, compressed satellite.
CORPUS_STYLE = SensorStyle(bands="RGB", difficulty=(2.0, 3.0), haze=(0.0, 0.45), blur=(0.0, 1.5),
                           noise=(0.005, 0.05), resolution=(1.0, 2.2), jpeg=(95, 45), color_drift=0.1)  # fmt: skip


@dataclass
class CorpusConfig:
    """The image-text corpus.

    Attributes:
        n_samples: pairs in both tiers together.
        image_size: side in pixels.
        shard_size: samples per shard.
        trusted_fraction: share of pairs in the trusted tier (the paper: about 15%).
        noise_rate: share of coarse-tier captions that are noisy.
        noise_kinds: relative weight of each kind of noise (see ``rssqa.world.captions.NOISE_KINDS``).
        gsd_m: (low, high) ground sample distance, drawn log-uniformly.
    """

    n_samples: int = 512
    image_size: int = 64
    shard_size: int = 128
    trusted_fraction: float = 0.15
    noise_rate: float = 0.4
    noise_kinds: dict[str, float] = field(
        default_factory=lambda: {
            "mismatched_scene": 0.25,
            "wrong_content": 0.2,
            "boilerplate": 0.12,
            "filename": 0.12,
            "url": 0.1,
            "truncated": 0.13,
            "empty": 0.08,
        }
    )
    gsd_m: tuple[float, float] = (0.3, 2.5)

    def __post_init__(self) -> None:
        unknown = set(self.noise_kinds) - set(NOISE_KINDS)
        if unknown:
            raise ValueError(f"corpus.noise_kinds: unknown kinds {sorted(unknown)}; choose from {NOISE_KINDS}")
        if not 0 < self.trusted_fraction < 1:
            raise ValueError(f"corpus.trusted_fraction must be in (0, 1), got {self.trusted_fraction}")

    def n_trusted(self) -> int:
        """Number of trusted-tier pairs."""
        return round(self.n_samples * self.trusted_fraction)


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one sample."""
    return np.random.default_rng([seed, stream, index])


def _scene(rng: np.random.Generator, size: int, gsd: tuple[float, float], probs: np.ndarray | None) -> Scene:
    scene_type = SCENE_TYPES[int(rng.choice(len(SCENE_TYPES), p=probs))]
    gsd_m = float(np.exp(rng.uniform(np.log(gsd[0]), np.log(gsd[1]))))
    return generate_scene(rng, size, gsd_m, scene_type)


def make_pair(seed: int, tier: str, index: int, cfg: CorpusConfig, stream: int | None = None) -> dict[str, Any]:
    """One corpus sample ``{"__key__", "jpg": H×W×3 uint8, "txt": caption, "json": meta}``.

    ``meta["truth"]`` holds what only evaluation may read: whether the caption is noisy, the noise
    kind, the scene type, an accurate caption, class fractions, counts and sensor conditions.
    """
    rng = sample_rng(seed, STREAMS[tier] if stream is None else stream, index)
    scene = _scene(rng, cfg.image_size, cfg.gsd_m, None)
    sensor = sample_sensor(rng, CORPUS_STYLE)
    image = render(rng, scene, sensor, CORPUS_STYLE)
    clean = trusted_caption(rng, scene)
    noise = None
    if tier == "trusted":
        caption = clean
    elif rng.random() < cfg.noise_rate:
        kinds = list(cfg.noise_kinds)
        w = np.array([cfg.noise_kinds[k] for k in kinds], float)
        noise = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        caption = noisy_caption(rng, scene, noise, index)
    else:
        caption = coarse_clean_caption(rng, scene)
    meta = {
        "tier": tier,
        "gsd_m": round(scene.gsd_m, 4),
        "truth": {
            "noisy": noise is not None,
            "noise": noise,
            "scene": scene.scene_type,
            "clean_caption": clean,
            "class_fractions": {c: round(float(f), 4) for c, f in zip(CLASSES, scene.class_fractions(), strict=True)},
            "counts": scene.counts,
            "sensor": sensor.as_dict(),
        },
    }
    return {"__key__": f"{tier[0]}{index:08d}", "jpg": image, "txt": caption, "json": meta}


@dataclass
class Tile:
    """One segmentation tile: image, mask in the source's schema, and its conditions."""

    image: np.ndarray  # H×W×3 uint8
    mask: np.ndarray  # H×W uint8 source class index, IGNORE_INDEX where no data
    scene_type: str
    gsd_m: float
    sensor: dict[str, Any]


def make_tile(seed: int, spec: SourceSpec, source_index: int, index: int, size: int) -> Tile:
    """Tile ``index`` of source ``spec`` at ``size×size`` pixels."""
    rng = sample_rng(seed, STREAMS["source"] + source_index, index)
    scene = _scene(rng, size, spec.gsd_m, spec.scene_probs())
    sensor = sample_sensor(rng, spec.style)
    image = render(rng, scene, sensor, spec.style)
    mask = spec.lookup(scene.scene_type)[scene.label]
    if rng.random() < 0.06:  # a no-data strip along one edge, as at the border of a mosaic
        width = int(size * rng.uniform(0.05, 0.25))
        side = int(rng.integers(4))
        sl = [np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]][side]
        image[sl], mask[sl] = 0, IGNORE_INDEX
    return Tile(image, mask, scene.scene_type, scene.gsd_m, sensor.as_dict())


def sample_pairs(n: int, image_size: int, seed: int = 0, tier: str = "trusted") -> list[dict[str, Any]]:
    """Held-out image-text pairs (their own stream, never in the corpus), e.g. for retrieval.

    Returns:
        ``n`` dicts ``{"image": H×W×3 uint8, "txt": str, "json": meta}``.
    """
    cfg = CorpusConfig(image_size=image_size, noise_rate=0.0 if tier == "trusted" else 0.4)
    out = []
    for i in range(n):
        s = make_pair(seed, tier, i, cfg, stream=STREAMS["eval_pairs"] + (tier == "coarse"))
        out.append({"image": s["jpg"], "txt": s["txt"], "json": s["json"]})
    return out


def sample_scenes(n: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A held-out, balanced scene-classification set (zero-shot evaluation).

    Returns:
        images ``N×H×W×3`` uint8, labels ``N`` int64 indices into the class names, the class names
        (the scene types, with ``_`` as spaces).
    """
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(SCENE_TYPES)
    for i in range(n):
        rng = sample_rng(seed, STREAMS["eval_scenes"], i)
        gsd = float(np.exp(rng.uniform(np.log(0.3), np.log(2.5))))
        scene = generate_scene(rng, image_size, gsd, SCENE_TYPES[labels[i]])
        images[i] = render(rng, scene, sample_sensor(rng, CORPUS_STYLE), CORPUS_STYLE)
    return images, labels, [s.replace("_", " ") for s in SCENE_TYPES]
