"""Captions in two tiers, like a web-scale remote-sensing corpus.

The trusted tier describes a scene accurately: its type, its main classes with coverage words, and
object counts. The coarse tier is what scraping gives: mostly short but correct captions, and a
configurable share of noise of realistic kinds (see :data:`NOISE_KINDS`). The kind of noise is only
recorded in the sample's meta (``truth``), which the purification method never reads.
"""

from __future__ import annotations

import re

import numpy as np

from rssqa.world.classes import (
    BARE_SOIL,
    BUILDING,
    CAR,
    IMPERVIOUS,
    LOW_VEGETATION,
    SCENE_TYPES,
    TREE,
    WATER,
)
from rssqa.world.scene import Scene

NOISE_KINDS: tuple[str, ...] = (
    "mismatched_scene",  # a caption of another kind of place
    "wrong_content",  # the right place, but absent classes named or counts far off
    "boilerplate",  # stock-photo or web-page text
    "filename",  # the image's file name
    "url",  # a link
    "truncated",  # cut off after a few words
    "empty",  # nothing
)

# Phrases per class; a caption names a class only through these (the realism tests parse them back).
VOCAB: dict[int, tuple[str, ...]] = {
    IMPERVIOUS: ("roads", "streets", "paved surfaces"),
    BUILDING: ("buildings", "houses", "rooftops"),
    LOW_VEGETATION: ("grass", "low vegetation", "meadows"),
    TREE: ("trees", "tree cover"),
    CAR: ("cars", "vehicles"),
    WATER: ("water", "open water"),
    BARE_SOIL: ("bare soil", "bare ground"),
}
_COUNTABLE = {BUILDING: "buildings", CAR: "cars"}
SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "dense_urban": ("a dense urban area", "a densely built city centre"),
    "suburban": ("a suburban neighbourhood", "a residential area"),
    "industrial": ("an industrial area", "an industrial estate"),
    "rural": ("a rural landscape", "open countryside"),
    "forest": ("a wooded landscape", "a forested area"),
    "coastal": ("a coastal area", "a stretch of coastline"),
}
_OPENERS = (
    "An aerial image of",
    "A satellite view of",
    "An overhead photo of",
    "A remote sensing image showing",
    "A high-resolution aerial view of",
)
_BOILERPLATE = (
    "Stock photo. High quality image, royalty free.",
    "Click here to see the full resolution version",
    "All rights reserved. Do not reproduce without permission.",
    "Image may contain: outdoor, nature",
    "Photo by user4821 on a photo sharing site",
    "Download this image for free",
    "Wallpaper HD 4k beautiful view",
)
_TYPICAL = {  # classes a caption of each scene type usually names (for mismatched captions)
    "dense_urban": (BUILDING, IMPERVIOUS, CAR),
    "suburban": (BUILDING, LOW_VEGETATION, TREE, IMPERVIOUS),
    "industrial": (BUILDING, IMPERVIOUS, CAR, BARE_SOIL),
    "rural": (LOW_VEGETATION, BARE_SOIL, TREE),
    "forest": (TREE, LOW_VEGETATION),
    "coastal": (WATER, BARE_SOIL, BUILDING),
}
_MIN_SHARE = 0.03  # a class is worth naming from 3% of the image


def _count_phrase(rng: np.random.Generator, n: int, cls: int) -> str:
    word = VOCAB[cls][int(rng.integers(len(VOCAB[cls])))]
    if n == 1:
        return {BUILDING: "a single building", CAR: "one car"}[cls]
    if n <= 10:
        return f"{n} {word}"
    if n <= 30:
        return f"about {int(5 * round(n / 5))} {word}"
    return f"many {word}"


def _area_phrase(rng: np.random.Generator, share: float, cls: int) -> str:
    word = VOCAB[cls][int(rng.integers(len(VOCAB[cls])))]
    if share > 0.4:
        return f"mostly {word}"
    if share > 0.15:
        return f"large areas of {word}"
    return f"some {word}" if rng.random() < 0.5 else f"patches of {word}"


def _mentions(rng: np.random.Generator, scene: Scene, limit: int = 4) -> list[str]:
    shares = scene.class_fractions()
    order = [int(c) for c in np.argsort(-shares) if c in VOCAB]
    phrases = []
    for cls in order:
        if cls in _COUNTABLE:
            n = scene.counts.get(_COUNTABLE[cls], 0)
            if n >= 1:
                phrases.append(_count_phrase(rng, n, cls))
        elif shares[cls] >= _MIN_SHARE:
            phrases.append(_area_phrase(rng, float(shares[cls]), cls))
        if len(phrases) == limit:
            break
    return phrases


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _scene_phrase(rng: np.random.Generator, scene_type: str) -> str:
    options = SCENE_PHRASES[scene_type]
    return options[int(rng.integers(len(options)))]


def trusted_caption(rng: np.random.Generator, scene: Scene) -> str:
    """An accurate, detailed caption: scene type, main classes with coverage, object counts."""
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    phrases = _mentions(rng, scene)
    text = f"{opener} {_scene_phrase(rng, scene.scene_type)}"
    return (text + (f" with {_join(phrases)}" if phrases else "")) + "."


def coarse_clean_caption(rng: np.random.Generator, scene: Scene) -> str:
    """A short but correct caption, as scraped corpora mostly have."""
    phrases = _mentions(rng, scene, limit=2)
    r = rng.random()
    if r < 0.4 or not phrases:
        return f"{['aerial view of', 'satellite image of', 'overhead shot of'][int(rng.integers(3))]} " + _scene_phrase(
            rng, scene.scene_type
        )
    if r < 0.7:
        return _join([p.split(" ", 1)[-1] if p.split(" ")[0] in ("some", "mostly") else p for p in phrases])
    return f"{_scene_phrase(rng, scene.scene_type)} seen from above"


def noisy_caption(rng: np.random.Generator, scene: Scene, kind: str, sample_index: int) -> str:
    """A caption with noise of ``kind`` (one of :data:`NOISE_KINDS`) for ``scene``."""
    if kind == "mismatched_scene":
        other = [s for s in SCENE_TYPES if s != scene.scene_type][int(rng.integers(len(SCENE_TYPES) - 1))]
        return _typical_caption(rng, other)
    if kind == "wrong_content":
        return _wrong_content(rng, scene)
    if kind == "boilerplate":
        return _BOILERPLATE[int(rng.integers(len(_BOILERPLATE)))]
    if kind == "filename":
        n = int(rng.integers(10_000))
        return [f"DJI_{n:04d}.JPG", f"IMG_2019{n % 12 + 1:02d}{n % 28 + 1:02d}_{n:06d}.jpg", f"tile_{n % 97}_{n}.tif",
                f"scan{n:05d}.png"][int(rng.integers(4))]  # fmt: skip
    if kind == "url":
        return f"https://maps.example.org/tiles/{17 + sample_index % 3}/{int(rng.integers(1e5))}/{sample_index}.png"
    if kind == "truncated":
        words = trusted_caption(rng, scene).split()
        return " ".join(words[: int(rng.integers(2, 5))])
    if kind == "empty":
        return "" if rng.random() < 0.7 else " "
    raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")


def _typical_caption(rng: np.random.Generator, scene_type: str) -> str:
    classes = _TYPICAL[scene_type]
    picked = [c for c in classes if rng.random() < 0.75] or [classes[0]]
    phrases = [
        _count_phrase(rng, int(rng.integers(2, 25)), c) if c in _COUNTABLE else _area_phrase(rng, rng.uniform(0.05, 0.6), c)
        for c in picked
    ]
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    return f"{opener} {_scene_phrase(rng, scene_type)} with {_join(phrases)}."


def _wrong_content(rng: np.random.Generator, scene: Scene) -> str:
    shares = scene.class_fractions()
    absent = [c for c in VOCAB if shares[c] == 0 and not (c in _COUNTABLE and scene.counts.get(_COUNTABLE[c], 0))]
    phrases = _mentions(rng, scene, limit=2)
    if absent:
        for c in rng.permutation(absent)[: int(rng.integers(1, 3))]:
            c = int(c)
            wrong = _count_phrase(rng, int(rng.integers(3, 40)), c) if c in _COUNTABLE else _area_phrase(
                rng, rng.uniform(0.2, 0.6), c
            )
            phrases.insert(0, wrong)
    else:  # everything is present: get the counts badly wrong instead
        n = max(scene.counts.values()) if scene.counts else 0
        phrases.insert(0, _count_phrase(rng, n * 5 + 20, BUILDING))
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    return f"{opener} {_scene_phrase(rng, scene.scene_type)} with {_join(phrases)}."


_SINGULAR = {BUILDING: ("building",), CAR: ("car",)}
_PATTERNS = {
    c: re.compile(r"\b(" + "|".join(re.escape(p) for p in ps + _SINGULAR.get(c, ())) + r")\b")
    for c, ps in VOCAB.items()
}


def mentioned_classes(caption: str) -> set[int]:
    """Master classes a caption names through :data:`VOCAB` (for evaluation and tests)."""
    text = caption.lower()
    return {c for c, pat in _PATTERNS.items() if pat.search(text)}
