"""Large georeferenced scenes: valid GeoTIFFs, the source's schema, no-data, an index, same bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from rssqa.errors import RSSQAError
from rssqa.runs import read_summary
from rssqa.world import (
    SOURCES,
    CorpusConfig,
    ScenesConfig,
    SourcesConfig,
    WorldConfig,
    export_scenes,
    generate_world,
)
from rssqa.world.geoscenes import PLACES, TIFF_BLOCK, scene_seed
from tests.conftest import ROOT

TINY = ScenesConfig(size=256, per_source=1)  # 2×2 blocks of 128 px
ENTRY_KEYS = {
    "source", "id", "image", "truth", "size", "crs", "transform", "gsd_m", "bands", "classes", "palette",
    "nodata", "seed", "blocks",
}  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Tiny scenes of every source, written by one worker."""
    out = tmp_path_factory.mktemp("scenes")
    export_scenes(TINY, 0, list(SOURCES), out, workers=1)
    return out


def _index(root: Path) -> list[dict]:
    return json.loads((root / "scenes" / "scenes.json").read_text())["scenes"]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_index_lists_every_scene(scenes):
    entries = _index(scenes)
    assert [e["source"] for e in entries] == list(SOURCES)
    assert len({e["id"] for e in entries}) == len(entries)
    for e in entries:
        spec = SOURCES[e["source"]]
        assert set(e) == ENTRY_KEYS
        assert e["image"] == f"scenes/{e['source']}/{e['id']}.tif"
        assert e["truth"] == f"scenes/{e['source']}/{e['id']}_truth.tif"
        assert (scenes / e["image"]).is_file() and (scenes / e["truth"]).is_file()
        assert e["size"] == [256, 256] and e["classes"] == list(spec.classes)
        assert e["palette"] == [list(c) for c in spec.palette] and isinstance(e["seed"], int)
        assert e["nodata"] == {"image": 0, "truth": 255}
    files = {p.relative_to(scenes).as_posix() for p in (scenes / "scenes").rglob("*") if p.is_file()}
    assert files == {"scenes/scenes.json"} | {e[k] for e in entries for k in ("image", "truth")}  # no temporaries


@pytest.mark.parametrize("name", list(SOURCES))
def test_geotiffs_are_georeferenced_in_the_sources_schema(scenes, name):
    entry = next(e for e in _index(scenes) if e["source"] == name)
    spec = SOURCES[name]
    with rasterio.open(scenes / entry["image"]) as img, rasterio.open(scenes / entry["truth"]) as tru:
        for ds, count, nodata in ((img, 3, 0), (tru, 1, 255)):
            assert ds.count == count and ds.dtypes == ("uint8",) * count and ds.nodata == nodata
            assert ds.crs.to_epsg() == PLACES[name][0] and ds.crs.is_projected and entry["crs"] == ds.crs.to_string()
            assert ds.crs.linear_units == "metre"
            assert ds.transform.a == pytest.approx(entry["gsd_m"]) and ds.transform.e == pytest.approx(-entry["gsd_m"])
            assert ds.transform.b == ds.transform.d == 0 and list(ds.transform)[:6] == pytest.approx(entry["transform"])
            assert ds.block_shapes == [(TIFF_BLOCK, TIFF_BLOCK)] * count and ds.compression.value == "DEFLATE"
            assert (ds.height, ds.width) == tuple(entry["size"])
        assert spec.gsd_m[0] <= entry["gsd_m"] <= spec.gsd_m[1]
        image, truth = img.read(), tru.read(1)
    hole = (image == 0).all(axis=0)
    assert 0.01 < hole.mean() < 0.15  # a corner triangle
    assert np.array_equal(hole, truth == 255)  # the same no-data in image and truth, and nowhere else
    assert image[:, ~hole].min() >= 1  # real content is never 0 in any band
    labels = np.unique(truth[~hole])
    assert labels.max() < len(spec.classes) and len(labels) >= 3


def test_scenes_are_heterogeneous(scenes):
    for e in _index(scenes):
        types = {t for row in e["blocks"]["scene_types"] for t in row}
        difficulty = [d for row in e["blocks"]["difficulty"] for d in row]
        assert e["blocks"]["grid"] == [2, 2] and len(types) >= 2, e["id"]
        assert types <= set(SOURCES[e["source"]].scene_mix) and len(set(difficulty)) == 4


def test_same_seed_same_bytes_whatever_the_workers(scenes, tmp_path):
    export_scenes(TINY, 0, list(SOURCES), tmp_path / "again", workers=2)
    assert _digests(scenes) == _digests(tmp_path / "again")
    export_scenes(TINY, 1, ["potsdam"], tmp_path / "other", workers=1)
    entry = _index(tmp_path / "other")[0]
    assert _digests(tmp_path / "other")[entry["image"]] != _digests(scenes)[entry["image"]]


def test_scene_seeds_are_a_stream_of_their_own():
    seeds = {scene_seed(w, s, k) for w in range(2) for s in range(len(SOURCES)) for k in range(3)}
    assert len(seeds) == 2 * len(SOURCES) * 3


def test_generate_world_writes_scenes_and_summary(tmp_path):
    cfg = WorldConfig(
        corpus=CorpusConfig(n_samples=16, image_size=16, shard_size=16),
        sources=SourcesConfig(image_size=16, n_images=2, names=["potsdam", "loveda"]),
        scenes=TINY,
    )
    summary = generate_world(cfg, tmp_path, workers=1)
    assert read_summary(tmp_path)["scenes"] == summary["scenes"]
    scenes = summary["scenes"]
    assert scenes["n"] == 2 and scenes["size"] == 256 and scenes["grid"] == [2, 2] and scenes["bytes"] > 0
    assert set(scenes["sources"]) == {"potsdam", "loveda"} and [e["source"] for e in _index(tmp_path)] == ["potsdam", "loveda"]
    assert sum(scenes["sources"]["loveda"]["block_scene_types"].values()) == 4


def test_scenes_are_off_by_default(tiny_world):
    assert read_summary(tiny_world)["scenes"]["n"] == 0 and not (tiny_world / "scenes").exists()
    assert not ScenesConfig().enabled and not ScenesConfig(size=0, per_source=3).enabled


@pytest.mark.parametrize("kwargs", [{"size": 100, "per_source": 1}, {"per_source": -1}, {"block": 16, "per_source": 1}])
def test_bad_scene_config_is_one_line(kwargs):
    with pytest.raises(RSSQAError, match=r"^world\.scenes\.\w+: ") as err:
        ScenesConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("profile, size", [("smoke", 384), ("demo", 2048)])
def test_profiles_configure_scenes(profile, size):
    world = yaml.safe_load((ROOT / "conf" / profile / "world.yaml").read_text())["world"]
    cfg = ScenesConfig(**world["scenes"])
    assert cfg.enabled and cfg.size == size and cfg.per_source == 1
