"""``rssqa scene``: windowed scoring of a georeferenced scene, on the scorer a tiny stage run exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from rssqa.cli import main  # noqa: E402
from rssqa.errors import RSSQAError  # noqa: E402
from rssqa.intervals import bounds  # noqa: E402
from rssqa.scene import LAYERS, NODATA, owned_bounds, taper, window_offsets  # noqa: E402
from tests.conftest import patch_scorer_load  # noqa: E402

TRANSFORM = from_origin(500000.0, 5800000.0, 0.5, 0.5)
CRS_UTM = CRS.from_epsg(32633)


def _tile(scorer) -> int:
    return int(min(scorer.config.get("image_size") or [scorer.min_size]))


def write_scene(path: Path, h: int, w: int, bands: int = 3, dtype: str = "uint8", georef: bool = True, seed: int = 0) -> np.ndarray:
    """A smooth random scene with a nodata triangle in the upper-left corner (all bands 0)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 255, (bands, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :h, :w] + rng.normal(0, 12, (bands, h, w))
    img = np.clip(img, 1, 250).astype(dtype)
    yy, xx = np.mgrid[:h, :w]
    img[:, (yy + xx) < min(h, w) // 3] = 0
    kw = {"crs": CRS_UTM, "transform": TRANSFORM} if georef else {}
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=dtype, nodata=0, **kw) as d:
        d.write(img)
    return img


def test_windows_cover_the_scene_and_owners_partition_it():
    offs = window_offsets(200, 64, 16)
    assert offs[0] == 0 and offs[-1] == 200 - 64
    assert all(b - a <= 48 for a, b in zip(offs, offs[1:], strict=False))
    own = owned_bounds(offs, 64, 200)
    assert own[0][0] == 0 and own[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(own, own[1:], strict=False))
    assert all(o <= lo and hi <= o + 64 for o, (lo, hi) in zip(offs, own, strict=True))
    assert np.all(taper(8, 0) == 1) and taper(8, 3)[0, 0] < taper(8, 3)[4, 4] == 1
    with pytest.raises(Exception, match="smaller than one"):
        window_offsets(50, 64, 0)


@pytest.mark.parametrize("by", ["score", "fixed"])
def test_scene_outputs_are_georeferenced_and_fused_is_the_chosen_methods(scorer, run_root, tmp_path, monkeypatch, by):
    """Each window's method is the one its scores rank first (``--by-score``) or, where the scorer's
    validation chose it (its ``recommend_policy``), the scorer's fixed method everywhere."""
    from rssqa.scorer import Scorer

    if by == "fixed":
        policy = {"policy": "fixed", "model": "with_agreement_ranking", "method": scorer.methods("alpha")[1], "val_vs_best_fixed": {}}
        monkeypatch.setitem(scorer.config, "recommend_policy", policy)
        original = Scorer.load

        def load(*a, **k):
            s = original(*a, **k)
            monkeypatch.setitem(s.config, "recommend_policy", policy)
            return s

        monkeypatch.setattr(Scorer, "load", load)
    tile = _tile(scorer)
    h, w = 2 * tile, 3 * tile
    scene = tmp_path / "scene.tif"
    img = write_scene(scene, h, w)
    valid = img.any(0)
    n_classes = scorer.method(scorer.methods("alpha")[0], "alpha").segmenter.num_classes
    gt = np.random.default_rng(5).integers(0, n_classes, (h, w)).astype(np.uint8)
    gt[~valid] = 255
    gt[: tile // 2, -tile // 2 :] = 255  # an unlabelled patch inside the data
    truth = tmp_path / "truth.tif"
    with rasterio.open(truth, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", nodata=255,
                       crs=CRS_UTM, transform=TRANSFORM) as d:  # fmt: skip
        d.write(gt, 1)
    out = tmp_path / "out"
    rc = main(["scene", str(scene), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--out", str(out),
               "--overlap", "0", "--tile", str(tile), "--truth", str(truth), "--quiet",
               *(["--by-score"] if by == "score" else [])])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "scene.json").read_text())
    assert summary["recommended_by"] == ("score" if by == "score" else f"fixed: {scorer.methods('alpha')[1]} (the scorer's validation)")
    assert summary["windows"]["total"] == 6 and summary["georeferenced"]
    assert not (out / ".scene-work").exists()
    for name in LAYERS:
        with rasterio.open(out / f"{name}.tif") as d:
            assert d.crs == CRS_UTM and d.transform == TRANSFORM
            assert (d.height, d.width, d.count) == (h, w, 1)
            assert d.dtypes[0] == {"quality": "float32", "best_method": "uint8", "fused": "uint8", "error": "float32"}[name]
            assert d.nodata == NODATA[name]
            a = d.read(1)
            assert np.all(a[~valid] == NODATA[name]) and np.all(a[valid] != NODATA[name])
            if name == "best_method":
                assert json.loads(d.tags()["methods"]) == summary["methods"]
                assert d.colormap(1)[0][:3] != (0, 0, 0)
            if name in ("quality", "error"):
                assert np.all((a[valid] >= 0) & (a[valid] <= 1))
    with rasterio.open(out / "fused.tif") as d:
        fused = d.read(1)
    with rasterio.open(out / "best_method.tif") as d:
        best = d.read(1)
    # window by window: the fused classes are the recommended method's prediction of that window
    pixels = img.transpose(1, 2, 0)
    names = summary["methods"]
    hits, chosen_hits, oracle_hits, labelled = np.zeros(len(names)), 0, 0, 0
    fitted = scorer.interval(scorer.recommend_head(len(names)))
    band = np.zeros((2, len(names)))  # the windows' interval ends, summed per method
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            win = np.ascontiguousarray(pixels[r : r + tile, c : c + tile])
            ranked = scorer.recommend([win], names, summary["source"], policy=by == "fixed")[0]
            chosen = ranked[0][0]
            band += np.stack(bounds(np.array([dict(ranked)[m] for m in names]), fitted))
            owned = best[r : r + tile, c : c + tile][valid[r : r + tile, c : c + tile]]
            assert set(owned.tolist()) == {names.index(chosen)}
            seg = scorer.method(chosen, summary["source"]).segmenter
            x = torch.from_numpy(win).permute(2, 0, 1)[None].float().div(255).contiguous()
            with torch.no_grad():
                pred = scorer.quality_inputs.statistics(seg, x, keep_probs=True)["pred"][0].numpy()
            v = valid[r : r + tile, c : c + tile]
            assert np.array_equal(fused[r : r + tile, c : c + tile][v], pred[v])
            # the evaluation, recomputed: every method's correct pixels in the window
            g = gt[r : r + tile, c : c + tile]
            lab = g != 255
            correct = []
            for m in names:
                xs = scorer.quality_inputs.statistics(scorer.method(m, "alpha").segmenter, x, keep_probs=True)
                correct.append(int((xs["pred"][0].numpy()[lab] == g[lab]).sum()))
            hits += correct
            chosen_hits += correct[names.index(chosen)]
            oracle_hits += max(correct)
            labelled += int(lab.sum())
    ev = summary["evaluation"]
    assert ev["labelled_pixels"] == labelled
    assert ev["per_method_oa"] == pytest.approx(dict(zip(names, hits / labelled, strict=True)))
    assert ev["chosen_oa"] == pytest.approx(chosen_hits / labelled) == pytest.approx(ev["fused_oa"])
    assert ev["oracle_oa"] == pytest.approx(oracle_hits / labelled)
    assert ev["fused_vs_best_single"]["low"] <= ev["fused_vs_best_single"]["diff"] <= ev["fused_vs_best_single"]["high"]
    assert set(ev["error_auroc"]) == {"error_head", "max_prob", "entropy", "disagreement"}
    assert (out / "quicklook.png").is_file()
    # the scene mean's band: the mean of the windows' intervals, and whether each method's true OA lies in it
    mean_band = summary["mean_predicted_oa_interval"]
    assert mean_band["level"] == fitted["level"]
    assert [mean_band["low"][m] for m in names] == pytest.approx(band[0] / 6)
    assert [mean_band["high"][m] for m in names] == pytest.approx(band[1] / 6)
    assert all(mean_band["low"][m] <= summary["mean_predicted_oa"][m] <= mean_band["high"][m] for m in names)
    assert ev["in_mean_interval"] == {m: mean_band["low"][m] <= ev["per_method_oa"][m] <= mean_band["high"][m] for m in names}


def test_scene_resumes_after_an_interruption(scorer, run_root, tmp_path, monkeypatch):
    from rssqa.scene import job as scene_mod

    tile = _tile(scorer)
    path = tmp_path / "scene.tif"
    img = write_scene(path, 3 * tile, 2 * tile, seed=3)
    truth = tmp_path / "truth.tif"
    gt = np.where(img.any(0), (img[0] // 64) % 3, 255).astype(np.uint8)
    with rasterio.open(truth, "w", driver="GTiff", width=2 * tile, height=3 * tile, count=1, dtype="uint8", nodata=255,
                       crs=CRS_UTM, transform=TRANSFORM) as d:  # fmt: skip
        d.write(gt, 1)
    out = tmp_path / "out"
    args = ["scene", str(path), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--out", str(out),
            "--tile", str(tile), "--truth", str(truth), "--quiet"]  # fmt: skip
    assert main(args) == 0
    first = {n: rasterio.open(out / f"{n}.tif").read(1) for n in LAYERS}
    shutil_out = tmp_path / "out2"
    calls = {"n": 0, "fail_at": 3}
    real = scene_mod.SceneJob._judge

    def failing(self, images, evaluate=False):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return real(self, images, evaluate)

    monkeypatch.setattr(scene_mod, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(scene_mod.SceneJob, "_judge", failing)
    at = args.index("--out") + 1
    args2 = [*args[:at], str(shutil_out), *args[at + 1 :]]
    assert main(args2) == 130
    assert not any((shutil_out / f"{n}.tif").exists() for n in LAYERS)  # nothing under a final name
    assert json.loads((shutil_out / ".scene-work" / "state.json").read_text())["strips_done"] == 2
    calls.update(n=0, fail_at=-1)
    assert main(args2) == 0
    strips = len(window_offsets(3 * tile, tile, tile // 4))
    assert calls["n"] == strips - 2  # only the unfinished strips ran again
    for n in LAYERS:
        assert np.array_equal(rasterio.open(shutil_out / f"{n}.tif").read(1), first[n]), n
    # the evaluation carried over the interruption: the same figures as the uninterrupted run
    resumed = json.loads((shutil_out / "scene.json").read_text())["evaluation"]
    assert resumed == json.loads((out / "scene.json").read_text())["evaluation"]


def test_scene_without_georeferencing_warns_once_and_works(run_root, scorer, tmp_path, capsys):
    tile = _tile(scorer)
    path = tmp_path / "plain.tif"
    write_scene(path, tile + 10, tile + 20, georef=False)
    out = tmp_path / "out"
    assert main(["scene", str(path), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("no georeferencing") == 1
    assert json.loads((out / "scene.json").read_text())["georeferenced"] is False


def test_scene_is_read_as_the_scorers_source_was_read(run_root, scorer, tmp_path, capsys, monkeypatch):
    """Where the scorer's source was resampled on read (``read`` in ``scorer.json``), the scene and its truth
    are read resampled by that factor (said once on stderr) and the maps lie on that grid, georeferenced
    (the transform's pixel scaled); ``--scale 1`` reads the scene at its own resolution, without a word."""
    tile = _tile(scorer)
    h, w = 2 * (tile + 10), 2 * (tile + 20)
    path, truth = tmp_path / "s.tif", tmp_path / "truth.tif"
    write_scene(path, h, w)
    with rasterio.open(truth, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", nodata=255,
                       crs=CRS_UTM, transform=TRANSFORM) as d:  # fmt: skip
        d.write(np.random.default_rng(5).integers(0, 2, (h, w)).astype(np.uint8), 1)
    args = ["scene", str(path), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--quiet", "--truth", str(truth)]
    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"scale": 0.5}}))
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count("the scene and its maps resampled by 0.5 when read") == 1
    summary = json.loads((tmp_path / "a" / "scene.json").read_text())
    assert summary["scale"] == 0.5 and summary["size"] == [h // 2, w // 2] and summary["evaluation"]["fused_oa"] >= 0
    for name in LAYERS:
        with rasterio.open(tmp_path / "a" / f"{name}.tif") as d:
            assert (d.height, d.width) == (h // 2, w // 2) and d.crs == CRS_UTM
            assert d.transform == TRANSFORM * rasterio.Affine.scale(2, 2)
    assert main([*args, "--out", str(tmp_path / "b"), "--scale", "1"]) == 0
    assert "resampled" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "scene.json").read_text())["size"] == [h, w]


def test_scene_is_read_at_the_ground_sample_distance_the_methods_were_trained_at(run_root, scorer, tmp_path, capsys, monkeypatch):
    """A scorer that records the ground sample distance its methods saw (a source with ``gsd``) reads a scene in
    a metric CRS at that distance: 0.5 m pixels for a 1 m scorer, a factor of 0.5 (said so); a scene without
    georeferencing falls back to the source's factor (here 1: read as it is, nothing said)."""
    from rssqa.data.segsets.rasters import ground_sample_distance as scene_gsd

    tile = _tile(scorer)
    path, plain = tmp_path / "s.tif", tmp_path / "plain.tif"
    write_scene(path, 2 * tile, 2 * tile + 8)
    write_scene(plain, tile + 4, tile + 4, georef=False)
    assert scene_gsd(path) == 0.5 and scene_gsd(plain) is None and scene_gsd(tmp_path / "missing.tif") is None
    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"scale": 1.0, "gsd": 1.0}}))
    args = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--quiet"]
    assert main(["scene", str(path), "--out", str(tmp_path / "a"), *args]) == 0
    assert "resampled by 0.5 when read, its 0.5 m pixels to the 1 m the scorer's methods were trained at" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "scene.json").read_text())["size"] == [tile, tile + 4]
    assert main(["scene", str(plain), "--out", str(tmp_path / "b"), *args]) == 0
    assert "resampled" not in capsys.readouterr().err


def test_resampled_raster_reads_whole_or_by_strips_alike_and_close_to_the_sources(tmp_path):
    """:class:`rssqa.scene.common.Resampled` gives the same pixels read whole or strip by strip, within a grey
    level of the sources' own resampling on read (Pillow's), and classes by nearest neighbour."""
    from rssqa.data.segsets.source import resample_image, resample_mask
    from rssqa.scene.common import Resampled

    img = write_scene(tmp_path / "s.tif", 200, 240)
    Window = rasterio.windows.Window
    with rasterio.open(tmp_path / "s.tif") as ds:
        r = Resampled(ds, 0.25)
        assert (r.height, r.width) == (50, 60) and r.transform == TRANSFORM * rasterio.Affine.scale(4, 4)
        whole = r.read([1, 2, 3], Window(0, 0, 60, 50))
        strips = np.concatenate([r.read([1, 2, 3], Window(0, row, 60, 10)) for row in range(0, 50, 10)], 1)
        assert np.array_equal(whole, strips) and r.dataset_mask(Window(0, 0, 60, 10)).shape == (10, 60)
    pillow = resample_image(np.ascontiguousarray(img.transpose(1, 2, 0)), 50, 60).transpose(2, 0, 1)
    yy, xx = np.mgrid[:50, :60]
    inside = 4 * (yy + xx) > 200 // 3 + 16  # away from the nodata corner, which GDAL leaves out of its kernel
    assert np.abs(whole.astype(int) - pillow)[:, inside].mean() < 1.0
    classes = (np.arange(200)[:, None] // 8 + np.arange(240)[None] // 8).astype(np.uint8) % 5
    with rasterio.open(tmp_path / "c.tif", "w", driver="GTiff", width=240, height=200, count=1, dtype="uint8") as d:
        d.write(classes, 1)
    with rasterio.open(tmp_path / "c.tif") as ds:
        got = Resampled(ds, 0.25, categorical=True).read(1, Window(0, 0, 60, 50))
    assert set(np.unique(got)) <= set(range(5))
    assert (got == resample_mask(classes, 50, 60)).mean() > 0.9


def _bad_scenes(tmp: Path, tile: int) -> dict[str, tuple[Path, list[str], str]]:
    four = tmp / "four.tif"
    write_scene(four, tile, tile, bands=4)
    u16 = tmp / "u16.tif"
    write_scene(u16, tile, tile, dtype="uint16")
    small = tmp / "small.tif"
    write_scene(small, tile - 1, tile + 5)
    trunc = tmp / "trunc.tif"
    write_scene(trunc, 4 * tile, 4 * tile)
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp / "notes.tif"
    text.write_text("not a raster")
    return {
        "bands": (four, [], "4 band(s)"),
        "bands_option": (four, ["--bands", "1,2,9"], "--bands"),
        "dtype": (u16, [], "--rescale"),
        "rescale_order": (u16, ["--rescale", "900,100"], "HIGH must be above LOW"),
        "small": (small, [], "smaller than one"),
        "truncated": (trunc, [], "trunc.tif"),
        "unreadable": (text, [], "not a readable raster"),
        "missing": (tmp / "nope.tif", [], "not found"),
    }


@pytest.mark.parametrize("case", ["bands", "bands_option", "dtype", "rescale_order", "small", "truncated", "unreadable", "missing"])
def test_bad_scenes_are_one_line_errors_and_leave_nothing(run_root, scorer, tmp_path, capsys, case):
    path, extra, words = _bad_scenes(tmp_path, _tile(scorer))[case]
    out = tmp_path / "out"
    rc = main(["scene", str(path), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not any((out / f"{n}.tif").exists() for n in LAYERS) and not (out / "scene.json").exists()


def test_sixteen_bit_scene_is_rescaled_to_what_the_scorer_reads(run_root, scorer, tmp_path, capsys, monkeypatch):
    """A uint16 scene with --rescale LOW,HIGH scores as the same scene in 8 bits (v -> (v - LOW) * 255 / (HIGH - LOW));
    so does it without the flag where the scorer's source (of uint16 files) was read with that range (said on stderr),
    and the 8-bit scene, read as it is there."""
    tile = _tile(scorer)
    eight = tmp_path / "eight.tif"
    img = write_scene(eight, tile, 2 * tile, seed=7)
    sixteen = tmp_path / "sixteen.tif"
    with rasterio.open(sixteen, "w", driver="GTiff", width=2 * tile, height=tile, count=3, dtype="uint16", nodata=0,
                       crs=CRS_UTM, transform=TRANSFORM) as d:  # fmt: skip
        d.write(np.where(img > 0, img.astype(np.uint16) * 4 + 100, 0).astype(np.uint16))
    common = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--quiet"]
    assert main(["scene", str(eight), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["scene", str(sixteen), "--out", str(tmp_path / "b"), "--rescale", "100,1120", *common]) == 0
    assert "mapped to 0-255" not in capsys.readouterr().err
    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"rescale": [100.0, 1120.0], "pixels": ["uint16"]}}))
    assert main(["scene", str(sixteen), "--out", str(tmp_path / "c"), *common]) == 0
    assert "values 100..1120 mapped to 0-255, as the scorer's source was read for training" in capsys.readouterr().err
    assert main(["scene", str(eight), "--out", str(tmp_path / "d"), *common]) == 0  # the range is for uint16 files
    assert "an 8-bit scene read as it is, the scorer's value range is for its other pixel types" in capsys.readouterr().err
    for n in LAYERS:
        for other in ("b", "c", "d"):
            with rasterio.open(tmp_path / "a" / f"{n}.tif") as a, rasterio.open(tmp_path / other / f"{n}.tif") as b:
                assert np.array_equal(a.read(1), b.read(1)), (n, other)


def test_quicklook_shows_the_bands_and_pixels_the_methods_read(tmp_path):
    """The quicklook's scene panel of a 4-band uint16 scene read with --bands and --rescale is the 8-bit
    scene the methods saw, not the first three bands as stored (a white panel for 16-bit pixels)."""
    from rssqa.scene.quicklook import scene_rgb

    eight = tmp_path / "eight.tif"
    img = write_scene(eight, 64, 96, seed=3)
    four = tmp_path / "four.tif"
    stored = np.where(img > 0, img.astype(np.uint16) * 4 + 100, 0).astype(np.uint16)  # red, green, blue
    other = np.full((1, 64, 96), 4000, np.uint16)  # e.g. near infrared, stored first
    with rasterio.open(four, "w", driver="GTiff", width=96, height=64, count=4, dtype="uint16", nodata=0,
                       crs=CRS_UTM, transform=TRANSFORM) as d:  # fmt: skip
        d.write(np.concatenate([other, stored[::-1]]))  # bands: other, blue, green, red
    want = scene_rgb(eight, side=96)
    assert want.dtype == np.uint8 and want.shape == (64, 96, 3) and np.array_equal(want, img.transpose(1, 2, 0))
    assert np.array_equal(scene_rgb(four, bands=[4, 3, 2], rescale=(100, 1120), side=96), want)
    assert not np.array_equal(scene_rgb(four, side=96), want)


def test_scenes_are_read_with_a_block_cache_of_megabytes():
    from rasterio._env import get_gdal_config

    from rssqa.scene.common import GDAL_CACHE_MB, gdal_env

    with gdal_env():  # what GDAL holds, in bytes: not GDAL_CACHE_MB bytes
        assert get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_MB * 1024 * 1024


def test_pooled_figures_are_the_scenes_own_margins_averaged():
    from rssqa.scene.evaluate import _error_figures, pooled_figures

    rng = np.random.default_rng(0)

    def pool(n: int, fused_p: float, best_p: float) -> dict:
        lab = rng.integers(50, 100, n)
        pixels = []
        for _ in range(n):
            wrong = (rng.uniform(size=64) < 0.3).astype(float)
            pixels.append(np.stack([wrong, wrong * 0.4 + rng.uniform(size=64), rng.uniform(size=64), rng.uniform(size=64),
                                    wrong * 0.2 + rng.uniform(size=64)], 1))  # fmt: skip
        return {"fused": np.stack([rng.binomial(lab, fused_p), lab], 1), "best": np.stack([rng.binomial(lab, best_p), lab], 1),
                "oracle": np.stack([lab, lab], 1), "pixels": pixels, "agreement": True}  # fmt: skip

    a, b = pool(200, 0.8, 0.6), pool(150, 0.7, 0.7)
    oa = lambda x: x[:, 0].sum() / x[:, 1].sum()  # noqa: E731
    out = pooled_figures([a, b])
    d = out["fused_minus_best_single"]
    assert out["n_scenes"] == 2
    assert d["diff"] == pytest.approx(((oa(a["fused"]) - oa(a["best"])) + (oa(b["fused"]) - oa(b["best"]))) / 2)
    assert d["low"] <= d["diff"] <= d["high"] and d["verdict"] == "ahead"
    assert out["oracle_minus_best_single"] == pytest.approx((1 - oa(a["best"]) + 1 - oa(b["best"])) / 2)
    # the error map: the head (column 1) reads the truth, the best baseline is disagreement (column 4)
    assert out["error_auroc_best_baseline"] == "disagreement" and out["error_auroc_margin"]["verdict"] == "ahead"
    # one scene alone: the same figures as the scene's own evaluation
    assert pooled_figures([a])["error_auroc_margin"] == _error_figures([a["pixels"]], True, 1000)["error_auroc_margin"]
    assert pooled_figures([]) == {}


def test_split_images_become_scenes_as_the_source_reads_them(tmp_path):
    from PIL import Image

    from rssqa.data.segsets.source import resample_mask
    from rssqa.data.sqed import TABLE, TABLE_COLUMNS
    from rssqa.runs import write_summary
    from rssqa.scene import export_split_scenes

    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    classes = {}
    for stem, (h, w) in {"areaA_1": (40, 48), "areaB_1": (40, 48), "areaB_2": (36, 30)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / "images" / f"{stem}.png")
        classes[stem] = rng.integers(0, 3, (h, w)).astype(np.uint8)
        Image.fromarray(np.asarray(palette, np.uint8)[classes[stem]]).save(data / "masks" / f"{stem}.png")
    options = {"images": "images", "masks": "masks", "image_glob": "*.png", "mask_glob": "*.png", "classes": ["a", "b", "c"],
               "palette": palette, "scale": 0.5, "patch_size": 8, "group_pattern": "(area[AB])_"}  # fmt: skip
    sqed = tmp_path / "sqed"
    sqed.mkdir()
    write_summary(sqed, {"config": {"sources": [{"name": "s", "root": "data", "layout": "folder", "options": options}]}})
    rows = [",".join(TABLE_COLUMNS)]
    for key, split, group in (("areaA_1_0_0", "train", "areaA"), ("areaB_1_0_0", "test", "areaB"), ("areaB_2_0_0", "test", "areaB")):
        rows.append(f"s/{key},{key},s,fpn,0.5,{split},{group},64,0.5,0.5,0.5,f,0,i,0")
    (sqed / TABLE).write_text("\n".join(rows) + "\n")

    index, info = export_split_scenes(sqed, tmp_path, tmp_path / "scenes", "test", min_side=16)
    entries = json.loads(index.read_text())["scenes"]
    # areaB's images only; the 30 px wide one is 15 px as read, under one 16 px window: left out and said
    assert [e["id"] for e in entries] == ["areaB_1"] and info["scenes"] == 1
    assert len(info["skipped"]) == 1 and "areaB_2" in info["skipped"][0] and "16 px window" in info["skipped"][0]
    e = entries[0]
    assert e["classes"] == ["a", "b", "c"] and e["palette"] == palette
    with rasterio.open(tmp_path / e["image"]) as d:
        assert (d.count, d.height, d.width, d.dtypes[0]) == (3, 20, 24, "uint8")
    with rasterio.open(tmp_path / e["truth"]) as d:
        assert d.nodata == 255 and np.array_equal(d.read(1), resample_mask(classes["areaB_1"], 20, 24))
    with pytest.raises(RSSQAError, match="no val images"):
        export_split_scenes(sqed, tmp_path, tmp_path / "none", "val")


def test_split_scenes_keep_a_geotiffs_georeferencing_rescaled(tmp_path):
    from rssqa.scene.split import _georef

    path = tmp_path / "g.tif"
    with rasterio.open(path, "w", driver="GTiff", width=48, height=40, count=3, dtype="uint8", crs=CRS_UTM, transform=TRANSFORM) as d:
        d.write(np.zeros((3, 40, 48), np.uint8))
    geo = _georef(path, 20, 24)  # read at half the resolution: pixels twice as large, same origin
    assert geo["crs"] == CRS_UTM and geo["transform"] == from_origin(500000.0, 5800000.0, 1.0, 1.0)
    plain = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain)
    assert _georef(plain, 4, 4) == {}
