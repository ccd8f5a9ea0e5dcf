"""The world's contracts: reproducible bytes, real layouts, and its realism claims."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rssqa.data.shards import iter_shard, list_shards, read_sizes
from rssqa.runs import read_summary
from rssqa.world import (
    CLASSES,
    NOISE_KINDS,
    SCENE_TYPES,
    SOURCES,
    CorpusConfig,
    generate_world,
    make_pair,
    make_tile,
    mentioned_classes,
    sample_pairs,
    sample_scenes,
)
from rssqa.world.captions import VOCAB
from tests.conftest import tiny_world_config


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def test_same_seed_same_bytes_whatever_the_workers(tiny_world, tmp_path):
    generate_world(tiny_world_config(), tmp_path / "again", workers=2)
    a, b = _digests(tiny_world), _digests(tmp_path / "again")
    assert len(a) > 100 and a == b


def test_other_seed_other_world(tmp_path):
    cfg = CorpusConfig(n_samples=8, image_size=32)
    assert not np.array_equal(make_pair(0, "coarse", 3, cfg)["jpg"], make_pair(1, "coarse", 3, cfg)["jpg"])


def test_summary_counts_match_the_shards(tiny_world):
    summary = read_summary(tiny_world)
    cfg = tiny_world_config().corpus
    for tier, n in (("trusted", cfg.n_trusted()), ("coarse", cfg.n_samples - cfg.n_trusted())):
        sizes = read_sizes(tiny_world / "corpus" / tier)
        assert sum(sizes.values()) == n == summary["corpus"][tier]["n"]
        keys = [s["__key__"] for url in list_shards(tiny_world / "corpus" / tier) for s in iter_shard(url)]
        assert len(keys) == len(set(keys)) == n
    assert set(summary["sources"]) == set(SOURCES)


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("vaihingen", ["top/top_mosaic_09cm_area*.tif", "gts_for_participants/top_mosaic_09cm_area*.tif"]),
        ("potsdam", ["2_Ortho_RGB/top_potsdam_*_*_RGB.tif", "5_Labels_all/top_potsdam_*_*_label.tif"]),
        ("loveda", ["*/*/images_png/*.png", "*/*/masks_png/*.png"]),
        ("deepglobe", ["train/*_sat.jpg", "train/*_mask.png"]),
    ],
)
def test_sources_are_written_in_their_real_layout(tiny_world, name, pattern):
    root = tiny_world / "sources" / name
    images, masks = (sorted(root.glob(p)) for p in pattern)
    assert len(images) == len(masks) == 16
    im, mk = Image.open(images[0]), Image.open(masks[0])
    assert im.mode == "RGB" and im.size == mk.size == (32, 32)
    if name == "loveda":
        assert mk.mode == "L" and np.asarray(mk).max() <= 7
    else:
        assert mk.mode == "RGB"


def test_loveda_domains_follow_scene_types(tiny_world):
    import json

    meta = json.loads((tiny_world / "sources" / "loveda" / "world_meta.json").read_text())
    for path in (tiny_world / "sources" / "loveda").glob("*/*/images_png/*.png"):
        urban = meta[path.stem]["scene"] in ("dense_urban", "suburban", "industrial")
        assert path.parts[-3] == ("Urban" if urban else "Rural")


@pytest.mark.parametrize("name", list(SOURCES))
def test_class_frequencies_in_configured_ranges(name):
    spec = SOURCES[name]
    hist = np.zeros(len(spec.classes))
    for i in range(80):
        mask = make_tile(0, spec, list(SOURCES).index(name), i, 64).mask
        hist += np.bincount(mask[mask != 255].ravel(), minlength=len(spec.classes))[: len(spec.classes)]
    share = hist / hist.sum()
    for cls, (lo, hi) in spec.class_ranges.items():
        got = share[spec.classes.index(cls)]
        assert lo <= got <= hi, f"{name}/{cls}: {got:.3f} not in [{lo}, {hi}]"


def test_sources_differ_in_sensor_and_gsd():
    def stats(name):
        tiles = [make_tile(0, SOURCES[name], list(SOURCES).index(name), i, 48) for i in range(12)]
        return np.mean([t.gsd_m for t in tiles]), np.mean([t.image[..., 0].mean() for t in tiles])

    gsd = {n: stats(n)[0] for n in SOURCES}
    assert gsd["potsdam"] < gsd["vaihingen"] < gsd["loveda"] < gsd["deepglobe"]
    # IRRG false colour: vegetation is bright in the first band, so Vaihingen's first band is brightest
    assert stats("vaihingen")[1] > stats("potsdam")[1]


def test_trusted_captions_name_only_present_classes():
    cfg = CorpusConfig(image_size=48)
    named = Counter()
    for i in range(150):
        s = make_pair(0, "trusted", i, cfg)
        truth = s["json"]["truth"]
        present = {CLASSES.index(c) for c, f in truth["class_fractions"].items() if f > 0}
        mentioned = mentioned_classes(s["txt"])
        assert mentioned <= present, (s["txt"], truth["class_fractions"])
        assert any(p in s["txt"] for p in _scene_words(truth["scene"]))
        named.update(mentioned)
    assert len(named) >= 6  # the vocabulary is used, not one stock phrase


def _scene_words(scene: str) -> tuple[str, ...]:
    from rssqa.world.captions import SCENE_PHRASES

    return SCENE_PHRASES[scene]


def test_noise_rates_as_configured():
    cfg = CorpusConfig(image_size=16, noise_rate=0.4)
    n = 1500
    kinds = Counter(make_pair(7, "coarse", i, cfg)["json"]["truth"]["noise"] for i in range(n))
    noisy = n - kinds[None]
    assert abs(noisy / n - 0.4) < 4 * np.sqrt(0.4 * 0.6 / n)
    total_w = sum(cfg.noise_kinds.values())
    for kind in NOISE_KINDS:
        p = cfg.noise_kinds[kind] / total_w
        assert abs(kinds[kind] / noisy - p) < 4 * np.sqrt(p * (1 - p) / noisy) + 0.01, kind


def test_wrong_content_names_an_absent_class_or_wrong_count():
    cfg = CorpusConfig(image_size=48, noise_rate=1.0, noise_kinds={"wrong_content": 1.0})
    for i in range(40):
        s = make_pair(3, "coarse", i, cfg)
        present = {CLASSES.index(c) for c, f in s["json"]["truth"]["class_fractions"].items() if f > 0}
        assert (mentioned_classes(s["txt"]) - present) or "many" in s["txt"] or "about" in s["txt"], s["txt"]


def test_vocab_covers_every_class_but_clutter():
    assert {CLASSES[c] for c in VOCAB} == set(CLASSES) - {"clutter"}


def test_difficulty_degrades_the_image():
    # the same scene through the drawn sensor vs an ideal one: the loss grows with difficulty
    import copy
    import dataclasses

    from rssqa.world import generate_scene
    from rssqa.world.render import render, sample_sensor

    style = SOURCES["loveda"].style
    d, err = [], []
    for i in range(60):
        rng = np.random.default_rng(i)
        scene = generate_scene(rng, 64, 1.0, SCENE_TYPES[i % 6])
        sensor = sample_sensor(rng, style)
        ideal = dataclasses.replace(sensor, haze=0.0, blur_sigma=0.0, noise_sigma=0.0, resolution=1.0, jpeg_quality=None)
        a = render(copy.deepcopy(rng), scene, sensor, style).astype(float)
        b = render(copy.deepcopy(rng), scene, ideal, style).astype(float)
        d.append(sensor.difficulty)
        err.append(np.sqrt(np.mean((a - b) ** 2)))
    assert np.corrcoef(d, err)[0, 1] > 0.5


def test_held_out_sets():
    images, labels, names = sample_scenes(12, 32, seed=0)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert sorted(Counter(labels.tolist()).values()) == [2] * 6 and len(names) == len(SCENE_TYPES)
    pairs = sample_pairs(4, 32, seed=0)
    corpus = make_pair(0, "trusted", 0, CorpusConfig(image_size=32))
    assert not any(np.array_equal(p["image"], corpus["jpg"]) for p in pairs)
    assert all(not p["json"]["truth"]["noisy"] for p in pairs)
