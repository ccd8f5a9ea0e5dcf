"""Images and masks as aerial and satellite imagery often comes: GeoTIFF with four bands of 16 bits, float
pixels, class masks with a colour table; read through rasterio, the bands chosen and the values mapped to
0-255 (``bands``, ``rescale``), on tiny files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rssqa.data.segsets import build_source, read_image
from rssqa.data.segsets.rasters import header, read_mask_pixels, to_8bit
from rssqa.errors import RSSQAError

rasterio = pytest.importorskip("rasterio")

PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]
CLASSES = ["road", "roof", "tree"]


def _tif(path: Path, bands_first: np.ndarray, colormap: dict | None = None) -> None:
    """A GeoTIFF (a projected CRS, 0.5 m pixels) of ``B×H×W`` pixels, LZW-compressed and tiled as delivered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    b, h, w = bands_first.shape
    profile = dict(driver="GTiff", width=w, height=h, count=b, dtype=bands_first.dtype.name, compress="lzw",
                   tiled=True, blockxsize=16, blockysize=16, crs="EPSG:32640",
                   transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 2780000))  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands_first)
        if colormap:
            dst.write_colormap(1, colormap)


def _scene(seed: int, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB pixels and class labels."""
    rng = np.random.default_rng(seed)
    labels = ((np.arange(h)[:, None] // 8 + np.arange(w)[None, :] // 8 + seed) % 3).astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), labels


def write_sets(root: Path, names=("a1_x", "a1_y", "a2_x")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same images twice: 8-bit RGB PNGs with RGB-colour masks (``png/``), and four-band uint16 GeoTIFFs
    (near-infrared, blue, green, red; each value 16 times the 8-bit one) with single-band class masks that
    carry the palette as a colour table (``tif/``)."""
    truth = {}
    for i, name in enumerate(names):
        rgb, labels = _scene(i)
        Image.fromarray(rgb).save(_mk(root / "png" / "images" / f"{name}.png"))
        Image.fromarray(np.asarray(PALETTE, np.uint8)[labels]).save(_mk(root / "png" / "masks" / f"{name}.png"))
        nir = np.full(labels.shape, 4000, np.uint16)
        wide = np.stack([nir, *(rgb[..., c].astype(np.uint16) * 16 for c in (2, 1, 0))])
        _tif(root / "tif" / "images" / f"{name}.tif", wide)
        table = {k: (*c, 255) for k, c in enumerate(PALETTE)}
        _tif(root / "tif" / "masks" / f"{name}.tif", labels[None], colormap=table)
        truth[name] = (rgb, labels)
    return truth


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _source(root: Path, kind: str, **kw):
    glob = "*.tif" if kind == "tif" else "*.png"
    return build_source("folder", root / kind, image_glob=glob, mask_glob=glob, classes=CLASSES, palette=PALETTE, **kw)


def test_sixteen_bit_four_band_geotiffs_read_like_their_eight_bit_copies(tmp_path):
    """Bands 3, 2, 1 (red, green, blue) of uint16 GeoTIFFs, 0..4080 mapped to 0..255, read the same pixels and
    classes as the 8-bit PNGs they were made from; patches and resampling follow as for any file."""
    truth = write_sets(tmp_path)
    tif = _source(tmp_path, "tif", bands=[3, 2, 1], rescale=[0, 4080], patch_size=16, scale=0.5)
    png = _source(tmp_path, "png", patch_size=16, scale=0.5)
    assert len(tif) == len(png) == 3 * 4  # 20 x 24 px as read: four 16 px patches per file (the last ones flush)
    for i in range(len(png)):
        for a, b in zip(tif.read(i), png.read(i), strict=True):
            assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    image, mask = _source(tmp_path, "tif", bands=[3, 2, 1], rescale=[0, 4080]).read(0)
    assert np.array_equal(image, truth["a1_x"][0]) and np.array_equal(mask, truth["a1_x"][1])
    # what the scorer records, and what changes the cached pixels
    assert tif.reading() == {"scale": 0.5, "bands": [3, 2, 1], "rescale": [0.0, 4080.0], "pixels": ["uint16"]}
    assert tif.read_options() == {"resample": 0.5, "rescale": [0.0, 4080.0], "bands": [3, 2, 1]}
    assert png.reading() == {"scale": 0.5} and _source(tmp_path, "png").reading() == {}


def test_pixels_that_are_not_8_bit_need_rescale(tmp_path):
    write_sets(tmp_path)
    with pytest.raises(RSSQAError, match=r"a1_x\.tif: uint16 pixels; expected 8-bit images \(set rescale: \[low, high\]"):
        _source(tmp_path, "tif", bands=[3, 2, 1])
    with pytest.raises(RSSQAError, match=r"^folder: no usable image/mask pairs \(3 bad\)"):  # skipped and counted
        _source(tmp_path, "tif", bands=[3, 2, 1], on_bad="skip")
    for bad, said in (([100, 100], r"high must be above low"), ([0], r"is not two numbers"), ("wide", r"is not two numbers")):
        with pytest.raises(RSSQAError, match=rf"^folder: rescale .*{said}"):
            _source(tmp_path, "tif", bands=[3, 2, 1], rescale=bad)
    with pytest.raises(RSSQAError, match=r"a1_x\.tif: 4 bands; expected 3 \(set bands to choose three\)"):
        _source(tmp_path, "tif", rescale=[0, 4080])


def test_float_and_single_band_images(tmp_path):
    """Reflectance as float32 in 0..1 maps with rescale 0,1; values beyond the range are clipped."""
    rgb, _ = _scene(3, 16, 16)
    values = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    values[0, 0, 0] = 1.7  # a saturated pixel
    _tif(tmp_path / "f.tif", values)
    got = read_image(tmp_path / "f.tif", rescale=[0.0, 1.0])
    expected = rgb.copy()
    expected[0, 0, 0] = 255
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    with pytest.raises(RSSQAError, match=r"f\.tif: float32 pixels; expected 8-bit"):
        read_image(tmp_path / "f.tif")
    assert header(tmp_path / "f.tif", "image") == (16, 16, 3, "float32")
    assert to_8bit(np.array([-5, 0, 50, 100, 300]), (0, 100)).tolist() == [0, 0, 128, 255, 255]
    # a 16-bit single-band PNG (Pillow) needs three bands all the same
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "g.png")
    assert header(tmp_path / "g.png", "image")[2:] == (1, "uint16")
    with pytest.raises(RSSQAError, match=r"g\.png: 1 bands; expected 3"):
        read_image(tmp_path / "g.png", rescale=[0, 2000])
    assert read_image(tmp_path / "g.png", bands=[0, 0, 0], rescale=[0, 2000])[0, 0].tolist() == [128, 128, 128]


def test_tiffs_read_by_rasterio_equal_pillow_and_masks_keep_indices(tmp_path):
    """An 8-bit RGB TIFF reads the same pixels through rasterio as through Pillow; a single-band mask with a
    colour table reads as its colours for a palette codec and as its indices otherwise; an unreadable TIFF is
    one line naming it."""
    rgb, labels = _scene(5)
    Image.fromarray(rgb).save(tmp_path / "p.tif")
    assert np.array_equal(read_image(tmp_path / "p.tif"), np.asarray(Image.open(tmp_path / "p.tif")))
    _tif(tmp_path / "m.tif", labels[None], colormap={k: (*c, 255) for k, c in enumerate(PALETTE)})
    assert np.array_equal(read_mask_pixels(tmp_path / "m.tif", palette=True), np.asarray(PALETTE, np.uint8)[labels])
    assert np.array_equal(read_mask_pixels(tmp_path / "m.tif", palette=False), labels)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(RSSQAError, match=r"bad\.tif: unreadable image \("):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(RSSQAError, match=r"none\.tif: mask not found"):
        read_mask_pixels(tmp_path / "none.tif", palette=True)


def test_the_reading_travels_to_the_scorer(tmp_path):
    """Bands and value range change the cached pixels (the sqed stage's fingerprint) and reach ``scorer.json``'s
    ``read`` as lists, the scale and ground sample distance as numbers."""
    from types import SimpleNamespace

    from rssqa.tasks.sqa.export import _pool_records
    from rssqa.tasks.sqed.sources import _files_fingerprint

    write_sets(tmp_path)
    plain = _source(tmp_path, "tif", bands=[3, 2, 1], rescale=[0, 4080])
    assert _files_fingerprint(plain, [0]) != _files_fingerprint(_source(tmp_path, "tif", bands=[3, 2, 1], rescale=[0, 4000]), [0])
    assert _files_fingerprint(plain, [0]) != _files_fingerprint(_source(tmp_path, "tif", bands=[3, 1, 2], rescale=[0, 4080]), [0])
    pools = {"tif": {"classes": CLASSES, "read": plain.reading() | {"scale": 1, "gsd": 2}}, "png": {"classes": CLASSES}}
    data = SimpleNamespace(source_of=np.array(["png", "tif", "tif"]), sqed=SimpleNamespace(pool=pools.__getitem__))
    records = _pool_records(data)
    assert records["read"] == {"tif": {"bands": [3, 2, 1], "rescale": [0.0, 4080.0], "pixels": ["uint16"], "scale": 1.0, "gsd": 2.0}}
    assert isinstance(records["read"]["tif"]["scale"], float) and records["classes"]["png"] == {"names": CLASSES}


def test_jpeg2000_reads_through_rasterio_with_only_the_chosen_bands(tmp_path):
    """A four-band 12-bit JPEG 2000 (lossless), as satellite products deliver bands, reads the chosen bands
    rescaled; a band the file does not have is one line naming the file."""
    rgb, _ = _scene(9, 32, 32)
    stored = np.stack([np.full((32, 32), 4000, np.uint16), *(rgb[..., c].astype(np.uint16) * 16 for c in (2, 1, 0))])
    with rasterio.open(tmp_path / "s.jp2", "w", driver="JP2OpenJPEG", width=32, height=32, count=4, dtype="uint16",
                       QUALITY=100, REVERSIBLE="YES") as d:  # fmt: skip
        d.write(stored)
    assert header(tmp_path / "s.jp2", "image") == (32, 32, 4, "uint16")
    assert np.array_equal(read_image(tmp_path / "s.jp2", bands=[3, 2, 1], rescale=[0, 4080]), rgb)
    with pytest.raises(RSSQAError, match=r"s\.jp2: bands \[4, 2, 1\] \(counted from 0\) do not pick three of its 4 bands$"):
        read_image(tmp_path / "s.jp2", bands=[4, 2, 1], rescale=[0, 4080])


def test_rescale_auto_measures_the_range_once_on_the_sources_images(tmp_path, caplog):
    """``rescale: auto``: the 1st to the 99th percentile of the chosen bands' values over the source's images (a
    subsample), then fixed: pixels mapped with it, recorded for the scorer, in the cache fingerprint, the same
    when built again; flat images are a one-line error asking for a range."""
    from rssqa.data.segsets.rasters import auto_range, read_bands

    write_sets(tmp_path)
    with caplog.at_level("INFO"):
        src = _source(tmp_path, "tif", bands=[3, 2, 1], rescale="auto")
    files = sorted((tmp_path / "tif" / "images").glob("*.tif"))
    values = np.concatenate([read_bands(f, [3, 2, 1])[::4, ::4].reshape(-1) for f in files]).astype(float)
    lo, hi = np.percentile(values, [1, 99])
    assert src.rescale == pytest.approx((lo, hi)) and 0 <= lo < hi <= 4080  # the NIR band (4000 everywhere) not read
    assert "rescale auto: values" in caplog.text
    assert src.reading()["rescale"] == list(src.rescale) and src.read_options()["rescale"] == list(src.rescale)
    assert _source(tmp_path, "tif", bands=[3, 2, 1], rescale="auto").rescale == src.rescale
    image, _ = src.read(0)
    assert np.array_equal(image, to_8bit(read_bands(files[0], [3, 2, 1]), src.rescale))
    ends = np.concatenate([read_bands(f, [3, 2, 1])[::4, ::4].reshape(-1) for f in (files[0], files[2])]).astype(float)
    assert auto_range(files, [3, 2, 1], files=2) == pytest.approx(tuple(np.percentile(ends, [1, 99])))  # the first and last
    with pytest.raises(RSSQAError, match=r"^rescale auto: the images' values are flat \(4000 to 4000 in 1 files\); give rescale"):
        auto_range(files[:1], [0, 0, 0])


def test_pixels_without_imagery_are_not_scored(tmp_path):
    """Where a GeoTIFF image has no data (its nodata value: a mosaic's empty border), the source's mask holds the
    ignore index, before resampling; a patch that is border only is left out as unlabelled; an image without
    nodata, or a PNG, keeps every label."""
    from rssqa.data.segsets import IGNORE_INDEX
    from rssqa.data.segsets.rasters import read_bands_valid

    rgb, labels = _scene(11, 32, 48)
    rgb = np.maximum(rgb, 1)
    rgb[:, :16] = 0  # the border: every band 0
    for folder, nodata in (("with", 0), ("without", None)):
        root = tmp_path / folder
        kw = {} if nodata is None else {"nodata": nodata}
        (root / "images").mkdir(parents=True)
        with rasterio.open(root / "images" / "a.tif", "w", driver="GTiff", width=48, height=32, count=3, dtype="uint8", **kw) as d:
            d.write(rgb.transpose(2, 0, 1))
        _tif(root / "masks" / "a.tif", labels[None])
    src = build_source("folder", tmp_path / "with", image_glob="*.tif", mask_glob="*.tif", classes=CLASSES)
    _, mask = src.read(0)
    assert (mask[:, :16] == IGNORE_INDEX).all() and np.array_equal(mask[:, 16:], labels[:, 16:])
    plain = build_source("folder", tmp_path / "without", image_glob="*.tif", mask_glob="*.tif", classes=CLASSES)
    assert np.array_equal(plain.read(0)[1], labels) and read_bands_valid(tmp_path / "without" / "images" / "a.tif")[1] is None
    patches = build_source("folder", tmp_path / "with", image_glob="*.tif", mask_glob="*.tif", classes=CLASSES, patch_size=16)
    assert [s.window[1] for s in patches.samples] == [0, 16, 32] * 2
    assert [patches.samples[i].window[1] for i in patches.check()] == [16, 32] * 2 and len(patches.unlabelled) == 2
    half = build_source("folder", tmp_path / "with", image_glob="*.tif", mask_glob="*.tif", classes=CLASSES, scale=0.5)
    assert (half.read(0)[1][:, :8] == IGNORE_INDEX).all()
