"""The deployable scorer and the ``rssqa`` console script, on the scorer a tiny stage run exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rssqa import intervals
from rssqa.cli import main
from rssqa.errors import RSSQAError
from tests.conftest import patch_scorer_load
from tests.tasks.test_sqa import METHODS


def _tile_of(scorer) -> int:
    return int(min(scorer.config.get("image_size") or [scorer.min_size]))


def _image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(_image(i)).save(d / f"tile_{i}.png")
    Image.fromarray(_image(9, 80)).save(d / "sub_big.png")  # another size in the same folder
    return d


def test_score_is_bit_identical_alone_and_in_any_batch(scorer):
    a, others = _image(0), [_image(s) for s in range(1, 20)]
    alone = scorer.score([a], source="alpha")
    assert alone.shape == (1, len(METHODS))
    assert np.all((alone > 0) & (alone < 1))
    for batch, pos in (([a, *others[:3]], 0), ([*others[:5], a, *others[5:]], 5), ([*others, a], 19)):
        together = scorer.score(batch, source="alpha")
        assert np.array_equal(together[pos], alone[0]), pos
    again = scorer.score([a], source="alpha")
    assert np.array_equal(again, alone)


def test_a_whole_image_larger_than_the_tiles_runs_without_padded_copies(scorer, monkeypatch):
    """An image with more pixels than ``seg_chunk`` training tiles runs in segmenter batches of its own
    (not padded to ``seg_chunk`` blank copies, a multiple of the work and memory), alone or among others
    the same; training-size tiles keep the fixed batch RS-SQED labelled them with."""
    from rssqa.models import segmenters

    tile, chunk = _tile_of(scorer), scorer.quality_inputs.seg_chunk
    assert scorer.rows_for((tile, tile)) == scorer.chunk
    side = tile * 4 + 8  # (4 tiles + a margin)^2 > seg_chunk tiles' pixels wherever seg_chunk <= 16
    big = [_image(s, side) for s in (11, 12, 13)]
    rows = scorer.rows_for((side, side))
    assert rows == max(1, min(scorer.chunk, chunk * tile * tile // (side * side))) < scorer.chunk
    seen: list[tuple[int, ...]] = []
    forward = segmenters.Segmenter.forward
    monkeypatch.setattr(segmenters.Segmenter, "forward", lambda self, x: seen.append(tuple(x.shape)) or forward(self, x))
    alone = scorer.score(big[:1], source="alpha", tiles=False)  # the image as one input, not its windows
    assert seen and all(s[0] <= rows and s[2:] == (side, side) for s in seen)
    n_alone = len(seen)
    together = scorer.score([_image(0), *big, _image(1)], source="alpha", tiles=False)  # tiles and whole images in one call
    assert np.array_equal(together[1], alone[0])
    assert np.array_equal(together[2], scorer.score(big[1:2], source="alpha", tiles=False)[0])
    assert n_alone == len(METHODS)  # one image: one forward per method, of at most ``rows`` images


def test_an_image_larger_than_the_tiles_is_scored_as_its_windows(scorer):
    """Its windows of the training size cover it; its score is theirs averaged by the pixels each owns."""
    from rssqa.scene.common import trained_tile
    from rssqa.scene.windows import owned_bounds, window_offsets

    tile = _tile_of(scorer)
    assert trained_tile(scorer.config, "alpha") == tile
    h, w = 2 * tile + 8, 3 * tile
    big = _image(21, max(h, w))[:h, :w]
    rows, cols = window_offsets(h, tile, 0), window_offsets(w, tile, 0)
    assert rows == [0, tile, tile + 8] and cols == [0, tile, 2 * tile]
    windows = [big[r : r + tile, c : c + tile] for r in rows for c in cols]
    own = np.array([(b - a) * (d - c) for a, b in owned_bounds(rows, tile, h) for c, d in owned_bounds(cols, tile, w)], float)
    assert own.sum() == h * w
    expected = (own / (h * w)) @ scorer.score(windows, source="alpha")
    got = scorer.score([_image(0), big], source="alpha")
    assert np.allclose(got[1], expected, rtol=0, atol=1e-12)
    assert np.array_equal(got[0], scorer.score([_image(0)], source="alpha")[0])  # a tile-size image: itself
    assert not np.allclose(scorer.score([big], source="alpha", tiles=False)[0], expected)
    ranked = scorer.recommend([big], source="beta", policy=False)[0]
    by_windows = scorer.score([big], list(METHODS), source="beta", ranking=True)[0]
    assert [m for m, _ in ranked] == [METHODS[j] for j in np.argsort(-by_windows, kind="stable")]
    # its interval: the windows' bounds averaged by the same shares (a tile-size image: its own bounds)
    fitted = scorer.interval(scorer.model)
    score, low, high = scorer.score([_image(0), big], source="alpha", interval=fitted)
    assert np.array_equal(score, got)
    w_low, w_high = intervals.bounds(scorer.score(windows, source="alpha"), fitted)
    assert np.allclose(low[1], (own / (h * w)) @ w_low, atol=1e-12) and np.allclose(high[1], (own / (h * w)) @ w_high, atol=1e-12)
    assert np.allclose(np.stack([low[0], high[0]]), np.stack(intervals.bounds(got[0], fitted)), atol=1e-12)
    ranking_fit = scorer.interval(scorer.ranking_model)
    banded = scorer.recommend([big], source="beta", policy=False, interval=ranking_fit)[0]
    _, r_low, r_high = scorer.score([big], list(METHODS), source="beta", ranking=True, interval=ranking_fit)
    assert [e[:2] for e in banded] == ranked
    assert all((lo, hi) == (r_low[0, METHODS.index(m)], r_high[0, METHODS.index(m)]) for m, _, lo, hi in banded)


def test_methods_differ_and_recommend_ranks_them(scorer):
    imgs = [_image(0), _image(1)]
    # three methods and a scorer with a ranking head: recommendation ranks by that head
    scores = scorer.score(imgs, list(METHODS), source="beta", ranking=True)
    assert not np.array_equal(scores, scorer.score(imgs, list(METHODS), source="beta"))
    ranked = scorer.recommend(imgs, source="beta", policy=False)
    for row, ranking in zip(scores, ranked, strict=True):
        assert [m for m, _ in ranking] == [METHODS[j] for j in np.argsort(-row, kind="stable")]
        assert sorted(s for _, s in ranking) == sorted(row.tolist())


def _with_policy(monkeypatch, scorer, policy: str, method: str) -> None:
    vs = {"diff": -0.01, "low": -0.03, "high": 0.01, "verdict": "tie"}
    monkeypatch.setitem(scorer.config, "recommend_policy",
                        {"policy": policy, "model": "with_agreement_ranking", "method": method, "val_vs_best_fixed": vs})  # fmt: skip


def test_recommend_puts_the_fixed_method_first_where_validation_chose_it(scorer, monkeypatch):
    """A scorer whose recommender was not ahead of the best fixed method on val recommends that method;
    the others follow by score. ``policy=False`` and a ``model`` policy rank by the scores alone."""
    imgs = [_image(0), _image(1)]
    by_score = scorer.recommend(imgs, source="beta", policy=False)
    fixed = by_score[0][-1][0]  # the method the first image ranks last
    _with_policy(monkeypatch, scorer, "fixed", fixed)
    for got, ranking in zip(scorer.recommend(imgs, source="beta"), by_score, strict=True):
        assert got[0][0] == fixed and got[1:] == [kv for kv in ranking if kv[0] != fixed]
    assert scorer.recommend(imgs, source="beta", policy=False) == by_score
    assert scorer.recommend(imgs, [m for m in METHODS if m != fixed], source="beta") == [
        [kv for kv in r if kv[0] != fixed] for r in scorer.recommend(imgs, [m for m in METHODS if m != fixed], source="beta", policy=False)
    ]  # the fixed method not among those ranked: by the scores
    _with_policy(monkeypatch, scorer, "model", fixed)
    assert scorer.recommend(imgs, source="beta") == by_score


def test_cli_recommend_says_when_the_fixed_method_comes_first(run_root, folder, capsys, monkeypatch):
    from rssqa.scorer import Scorer

    path = run_root / "sqa" / "scorer"
    config = Scorer.load(path).config.get("recommend_policy")
    assert config and config["policy"] in ("model", "fixed")  # the stage writes one
    img = str(folder / "tile_0.png")
    args = ["recommend", img, "--scorer", str(path), "--source", "beta", "--json"]
    patch_scorer_load(monkeypatch, lambda s: _with_policy(monkeypatch, s, "fixed", "upernet"))
    assert main(args) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)[0]
    assert got["recommended"] == "upernet" and got["by"] == "fixed"
    assert "was not ahead of always running upernet (-0.010 OA [-0.030, +0.010])" in out.err and "--by-score" in out.err
    assert main([*args, "--by-score"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)[0]
    assert got["by"] == "score" and got["ranking"][0]["score"] == max(x["score"] for x in got["ranking"]) and out.err == ""


def test_scorer_refuses_bad_images_and_sources(scorer):
    with pytest.raises(RSSQAError, match=r"x.png: 32x32 px is smaller than the 64x64 px"):
        scorer.score([_image(0, 32)], source="alpha", names=["x.png"])
    with pytest.raises(RSSQAError, match="three channels"):
        scorer.score([np.zeros((64, 64, 4), np.uint8)], source="alpha")
    with pytest.raises(RSSQAError, match="several sources"):
        scorer.score([_image(0)])
    with pytest.raises(RSSQAError, match="'nope' has no checkpoint"):
        scorer.score([_image(0)], ["nope"], source="alpha")


def test_scorer_refuses_a_clip_it_was_not_trained_with(run_root):
    from rssqa.scorer import Scorer

    with pytest.raises(RSSQAError, match="not the CLIP this scorer was trained with"):
        Scorer.load(run_root / "sqa" / "scorer", clip=run_root / "clip_raw")


def test_user_checkpoint_goes_through_the_shared_adapter(scorer, run_root):
    ckpt = run_root / "sqed" / "methods" / "alpha" / "fpn" / "final.ckpt"
    by_ckpt = scorer.score([_image(3)], [], source="alpha", checkpoints=[str(ckpt)])
    assert by_ckpt.shape == (1, 1) and 0 < by_ckpt[0, 0] < 1


# ------------------------------------------------------------------------------------------- CLI
def test_cli_score_json_on_a_folder(run_root, folder, capsys):
    code = main(["score", str(folder), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha",
                 "--method", "fpn", "--method", "pspnet", "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0
    rows = json.loads(out.out)
    assert len(rows) == 4 * 2 and {r["method"] for r in rows} == {"fpn", "pspnet"}
    assert "img" in out.err  # the progress bar goes to stderr on folders
    # each predicted OA with the interval the paper head's val rows gave it (rssqa.intervals), in [0, 1]
    fitted = json.loads((run_root / "sqa" / "scorer" / "scorer.json").read_text())["intervals"]["model"]
    low, high = intervals.bounds(np.array([r["score"] for r in rows]), fitted)
    assert [r["low"] for r in rows] == pytest.approx(low) and [r["high"] for r in rows] == pytest.approx(high)
    assert all(0 <= r["low"] <= r["high"] <= 1 for r in rows)
    assert main(["score", str(folder / "tile_0.png"), "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--method", "fpn"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "method", "score", "90%", "interval"]
    first = next(r for r in rows if r["image"].endswith("tile_0.png") and r["method"] == "fpn")  # the same image, alone
    assert table[1].split()[-3:] == [f"{first['low']:.3f}", "-", f"{first['high']:.3f}"]


def test_cli_recommend_table(run_root, folder, capsys):
    img = str(folder / "tile_0.png")
    code = main(["recommend", img, "--scorer", str(run_root / "sqa" / "scorer"), "--source", "beta"])
    out = capsys.readouterr()
    assert code == 0
    lines = out.out.strip().splitlines()
    assert lines[0].split()[:2] == ["image", "recommended"] and len(lines) == 2
    assert all(m in lines[1] for m in METHODS)
    # no progress bar for single files; one line on why, where the scorer's policy puts its fixed method first
    policy = json.loads((run_root / "sqa" / "scorer" / "scorer.json").read_text())["recommend_policy"]
    fixed = policy["policy"] == "fixed"
    assert out.err.count("\n") == fixed and (not fixed or f"always running {policy['method']}" in out.err)
    # --json: each method's predicted OA with the interval of the head that ranked them (the ranking head here)
    assert main(["recommend", img, "--scorer", str(run_root / "sqa" / "scorer"), "--source", "beta", "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)[0]["ranking"]
    fitted = json.loads((run_root / "sqa" / "scorer" / "scorer.json").read_text())["intervals"]["ranking_model"]
    low, high = intervals.bounds(np.array([x["score"] for x in ranking]), fitted)
    assert [x["low"] for x in ranking] == pytest.approx(low) and [x["high"] for x in ranking] == pytest.approx(high)


def test_cli_reads_images_as_the_scorers_source_was_read(run_root, tmp_path, capsys, monkeypatch):
    """A scorer whose source was resampled on read (``read`` in ``scorer.json``) resamples new images the
    same way by default, and says so; ``--scale 1`` reads them as they are; a bad factor is one line."""
    from rssqa.data.segsets import resample_by

    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"scale": 0.5}}))
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    image = _image(5, 128)
    Image.fromarray(image).save(big)
    Image.fromarray(resample_by(image, 0.5)).save(small)
    assert resample_by(image, 0.5).shape == (64, 64, 3) and resample_by(image, 1.0) is image
    args = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--method", "fpn", "--json"]

    def score(*extra: str) -> tuple[float, str]:
        assert main(["score", *extra, *args]) == 0
        out = capsys.readouterr()
        return json.loads(out.out)[0]["score"], out.err

    by_default, said = score(str(big))
    assert "images resampled by 0.5 when read" in said and "--scale 1" in said
    as_is, said = score(str(small), "--scale", "1")
    assert as_is == by_default and said == ""
    full, _ = score(str(big), "--scale", "1")  # the same file at twice the training resolution: another score
    assert full != by_default
    assert main(["score", str(big), "--scale", "0", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --scale: must be a positive factor, got 0"]


def test_cli_reads_the_bands_and_values_the_scorers_source_was_read_with(run_root, tmp_path, capsys, monkeypatch):
    """A scorer whose source was read from four-band uint16 GeoTIFFs (``bands`` and ``rescale`` in its ``read``)
    reads a new such file the same way by default, and says so: the same score as the 8-bit RGB image it was made
    from; ``--bands`` / ``--rescale`` choose otherwise; without a recorded range a uint16 file is one line."""
    rasterio = pytest.importorskip("rasterio")
    rgb = _image(6, 64)
    png, tif = tmp_path / "rgb.png", tmp_path / "nir_b_g_r.tif"
    Image.fromarray(rgb).save(png)
    stored = np.stack([np.full(rgb.shape[:2], 3000, np.uint16), *(rgb[..., c].astype(np.uint16) * 8 + 40 for c in (2, 1, 0))])
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16") as d:
        d.write(stored)
    args = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--method", "fpn", "--json"]

    def score(*extra: str) -> tuple[int, float | None, str]:
        rc = main(["score", *extra, *args])
        out = capsys.readouterr()
        return rc, (json.loads(out.out)[0]["score"] if rc == 0 else None), out.err

    _, eight, _ = score(str(png))
    rc, _, said = score(str(tif))  # this scorer read 8-bit RGB files: the file needs --bands and --rescale
    assert rc == 2 and said.strip().splitlines() == [f"error: {tif}: 4 bands; expected 3 (choose three: a source's bands option, --bands R,G,B)"]
    rc, flags, said = score(str(tif), "--bands", "4,3,2", "--rescale", "40,2080")
    assert rc == 0 and flags == eight and said == ""
    rc, _, said = score(str(tif), "--bands", "4,3,2")
    assert rc == 2 and "uint16 pixels; expected 8-bit images (map them to 0-255: a source's rescale option, --rescale LOW,HIGH)" in said
    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"bands": [3, 2, 1], "rescale": [40.0, 2080.0]}}))
    rc, recorded, said = score(str(tif))
    assert rc == 0 and recorded == eight
    assert "bands 4,3,2 and values 40..2080 mapped to 0-255, as the scorer's source was read for training" in said
    rc, other, _ = score(str(tif), "--rescale", "0,4000")  # the flag wins over the record
    assert rc == 0 and other != eight
    # a range recorded for uint16 files: an 8-bit image is read as it is (said), a uint16 one through the range
    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"rescale": [40.0, 2080.0], "pixels": ["uint16"]}}))
    rc, plain, said = score(str(png))
    assert rc == 0 and plain == eight and "8-bit images read as they are, the scorer's value range is for its other pixel types" in said
    rc, wide, said = score(str(tif), "--bands", "4,3,2")
    assert rc == 0 and wide == eight and "read as they are" not in said
    for bad, words in ((["--bands", "0,1,2"], "whole band numbers, the first band 1"), (["--rescale", "9"], "2 comma-separated numbers")):
        rc, _, said = score(str(tif), *bad)
        assert rc == 2 and words in said


def test_cli_methods_lists_each_sources_methods_and_how_it_reads_images(run_root, tmp_path, capsys):
    """``rssqa methods``: a line per source, its methods, and the reading the scorer records (none: nothing said)."""
    scorer = run_root / "sqa" / "scorer"
    assert main(["methods", "--scorer", str(scorer)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    config = json.loads((scorer / "scorer.json").read_text())
    assert lines == [f"{s}: {' '.join(sorted(m))}" for s, m in sorted(config["checkpoints"].items())]
    copy = tmp_path / "scorer"
    copy.mkdir()
    first = sorted(config["checkpoints"])[0]
    config["read"] = {first: {"scale": 0.25, "gsd": 1.2, "bands": [3, 2, 1], "rescale": [0.0, 3000.0]}}
    (copy / "scorer.json").write_text(json.dumps(config))
    assert main(["methods", "--scorer", str(copy)]) == 0
    read = capsys.readouterr().out.strip().splitlines()
    assert read[0] == lines[0] + " (images read: resampled by 0.25, 1.2 m pixels as trained, bands 4,3,2, values 0..3000 mapped to 0-255)"
    assert read[1:] == lines[1:]
    assert main(["methods", "--scorer", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'scorer.json'}: scorer config not found"


def test_cli_reads_geotiffs_at_the_ground_sample_distance_the_methods_were_trained_at(run_root, tmp_path, capsys, monkeypatch):
    """A scorer that records the ground sample distance its methods saw (1 m) reads a GeoTIFF of 0.5 m pixels at
    half its size (said once for the two files), as the image resampled beforehand and read with ``--scale 1``;
    a PNG of the same pixels has no distance and is read at the source's factor (1)."""
    rasterio = pytest.importorskip("rasterio")
    from rssqa.data.segsets import resample_by

    patch_scorer_load(monkeypatch, lambda s: s.config.update(read={"alpha": {"scale": 1.0, "gsd": 1.0}}))
    image = _image(8, 128)
    for name in ("a.tif", "b.tif"):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 5800000)) as d:  # fmt: skip
            d.write(image.transpose(2, 0, 1))
    Image.fromarray(image).save(tmp_path / "full.png")
    Image.fromarray(resample_by(image, 0.5)).save(tmp_path / "half.png")
    args = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--method", "fpn", "--json", "--quiet"]

    def score(*extra: str) -> tuple[list[float], str]:
        assert main(["score", *extra, *args]) == 0
        out = capsys.readouterr()
        return [r["score"] for r in json.loads(out.out)], out.err

    tifs, said = score(str(tmp_path / "a.tif"), str(tmp_path / "b.tif"))
    assert said.count("georeferenced images of 0.5 m pixels resampled by 0.5 when read, to the 1 m the scorer's methods were trained at") == 1
    half, _ = score(str(tmp_path / "half.png"), "--scale", "1")
    assert tifs == half * 2
    full, said = score(str(tmp_path / "full.png"))
    assert "resampled" not in said and full != half
    as_is, said = score(str(tmp_path / "a.tif"), "--scale", "1")
    assert as_is == full and "resampled" not in said


def test_cli_score_with_other_methods_uses_agreement(run_root, folder, capsys):
    img, scorer = str(folder / "tile_0.png"), str(run_root / "sqa" / "scorer")
    args = ["score", img, "--scorer", scorer, "--source", "beta", "--method", "fpn", "--json"]
    assert main(args) == 0
    paper = json.loads(capsys.readouterr().out)[0]["score"]
    assert main([*args, "--with", "pspnet,upernet"]) == 0
    with_agreement = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in with_agreement] == ["fpn"] and with_agreement[0]["score"] != paper
    fitted = json.loads((Path(scorer) / "scorer.json").read_text())["intervals"]["agreement_model"]  # the agreement head's
    assert [with_agreement[0]["low"], with_agreement[0]["high"]] == pytest.approx(intervals.bounds(with_agreement[0]["score"], fitted))
    assert main([*args, "--with", "pspnet"]) == 2
    assert "agreement needs at least 3 methods in all, got 2" in capsys.readouterr().err
    assert main([*args, "--with", "fpn,pspnet"]) == 2  # the scored method named again counts once
    assert "agreement needs at least 3 methods in all, got 2" in capsys.readouterr().err


def test_cli_score_by_the_error_map(run_root, folder, capsys):
    """``--error-map``: 1 - the mean of the pixel error head's map, as the scorer draws it."""
    from rssqa.scorer import Scorer

    img, scorer = str(folder / "tile_0.png"), str(run_root / "sqa" / "scorer")
    args = ["score", img, "--scorer", scorer, "--source", "beta", "--method", "fpn", "--json", "--error-map"]
    assert main([*args, "--with", "pspnet,upernet"]) == 0
    got = json.loads(capsys.readouterr().out)
    maps = Scorer.load(scorer).pixel_error([np.asarray(Image.open(img).convert("RGB"))], ["fpn"], "beta", ["pspnet", "upernet"])[0]
    assert [r["method"] for r in got] == ["fpn"] and got[0]["score"] == pytest.approx(1.0 - float(maps.mean()), abs=1e-6)
    assert "low" not in got[0]  # no interval: the pixel head's val rows trained it
    assert main([*args, "--with", "pspnet"]) == 2  # the head reads agreement: three methods at least
    assert "at least 3 methods" in capsys.readouterr().err


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "garbage.png").write_bytes(b"not an image at all")
    Image.fromarray(_image(0)[..., 0]).save(tmp / "gray.png")
    Image.fromarray(_image(0, 32)).save(tmp / "small.png")
    (tmp / "empty").mkdir()
    return {
        "unreadable": ([str(tmp / "garbage.png")], "garbage.png: unreadable image"),
        "channels": ([str(tmp / "gray.png")], "gray.png: 1 bands; expected 3"),
        "too small": ([str(tmp / "small.png")], "small.png: 32x32 px is smaller than the 64x64 px"),
        "missing": ([str(tmp / "nope.png")], "nope.png: no such file or folder"),
        "empty folder": ([str(tmp / "empty")], "empty: no images"),
    }


@pytest.mark.parametrize("case", ["unreadable", "channels", "too small", "missing", "empty folder"])
def test_cli_bad_input_is_one_line(run_root, tmp_path, capsys, case):
    args, message = _bad_inputs(tmp_path)[case]
    code = main(["score", *args, "--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--method", "fpn"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_skips_the_bad_images_of_a_folder_and_scores_the_others(run_root, folder, tmp_path, capsys):
    """A mask, a broken file and a thumbnail among the images: each skipped in one line, the others scored."""
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    mask = Image.fromarray(np.random.default_rng(0).integers(0, 6, (64, 64), dtype=np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0] * 128)
    mask.save(mixed / "tile_0_mask.png")
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.fromarray(_image(4, 32)).save(mixed / "thumb.png")
    common = ["--scorer", str(run_root / "sqa" / "scorer"), "--source", "alpha", "--json", "--quiet"]
    assert main(["score", str(folder), "--method", "fpn", *common]) == 0
    clean = json.loads(capsys.readouterr().out)
    code = main(["score", str(mixed), "--method", "fpn", *common])
    out = capsys.readouterr()
    assert code == 1
    got = json.loads(out.out)
    assert [Path(r["image"]).name for r in got] == [Path(r["image"]).name for r in clean]  # every good image, in order
    assert [r["score"] for r in got] == [r["score"] for r in clean]
    lines = out.err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("skipped: ") for line in lines[:3])
    assert any("tile_0_mask.png: palette-mode image" in line for line in lines)
    assert any("broken.jpg: unreadable image" in line for line in lines)
    assert any("thumb.png: 32x32 px is smaller than" in line for line in lines)
    assert lines[3].startswith("3 of 7 images skipped")
    assert main(["recommend", str(mixed), *common]) == 1  # recommend skips the same way
    assert len(json.loads(capsys.readouterr().out)) == len(clean)
    assert main(["score", str(mixed), "--method", "fpn", "--on-bad", "error", *common]) == 2  # the first stops it
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "broken.jpg: unreadable image" in err and len(err.splitlines()) == 1
    for name in ("tile_0.png", "tile_1.png", "tile_2.png", "sub_big.png"):
        (mixed / name).unlink()
    assert main(["score", str(mixed), "--method", "fpn", *common]) == 2
    assert "error: none of the 3 images is usable" in capsys.readouterr().err


def test_cli_wrong_clip_and_missing_scorer(run_root, tmp_path, capsys):
    img = tmp_path / "ok.png"
    Image.fromarray(_image(0)).save(img)
    scorer = str(run_root / "sqa" / "scorer")
    assert main(["score", str(img), "--scorer", scorer, "--clip", str(run_root / "clip_raw"), "--method", "fpn"]) == 2
    assert "not the CLIP this scorer was trained with" in capsys.readouterr().err
    assert main(["recommend", str(img), "--scorer", str(tmp_path / "none")]) == 2
    assert "scorer config not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(scorer, broken)
    (broken / "scorer.json").write_text("{")
    assert main(["recommend", str(img), "--scorer", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken/scorer.json: not a scorer config" in err and len(err.strip().splitlines()) == 1


def test_cli_debug_shows_the_traceback(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"junk")
    with pytest.raises(RSSQAError):
        main(["score", str(tmp_path / "garbage.png"), "--scorer", str(tmp_path), "--method", "x", "--debug"])
    # as a script: exit status 2 and one line, no traceback
    cmd = [sys.executable, "-m", "rssqa.cli", "score", str(tmp_path / "garbage.png"), "--scorer", str(tmp_path), "--method", "x"]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
