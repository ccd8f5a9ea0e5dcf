"""The source options every layout accepts: resampling on read (``scale``, ``gsd`` + ``target_gsd``),
split groups from the file name (``group_pattern``) and schema classes sent to the ignore index
(``ignore_classes``), on tiny files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rssqa.data.segsets import IGNORE_INDEX, MaskCodec, build_source, list_layouts
from rssqa.data.segsets.source import resampled_size
from rssqa.errors import RSSQAError
from rssqa.tasks.sqed import SourceConfig, SQEDConfig
from rssqa.tasks.sqed.sources import _files_fingerprint, prepare_source
from tests.data.test_segsets import LAYOUTS

PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0], [155, 155, 155]]
CLASSES = ["road", "roof", "tree", "unlabeled"]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _labels(h: int, w: int, n: int = 4) -> np.ndarray:
    return ((np.arange(h)[:, None] // 4 + np.arange(w)[None, :] // 4) % n).astype(np.uint8)


def write_areas(root: Path, names=("area1_a", "area1_b", "area2_a", "area3_a"), size=(42, 50)) -> dict:
    """Colour masks over four classes (the last one "unlabeled"), a black pixel; returns id -> labels."""
    rng = np.random.default_rng(0)
    truth = {}
    for name in names:
        lab = _labels(*size)
        rgb = np.asarray(PALETTE, np.uint8)[lab]
        rgb[0, 0] = 0  # no label
        _save(root / "images" / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        _save(root / "masks" / f"{name}.png", rgb)
        truth[name] = np.where((rgb == 0).all(-1), IGNORE_INDEX, lab).astype(np.uint8)
    return truth


def folder(root: Path, **kw):
    opts = dict(classes=CLASSES, palette=PALETTE, ignore_colors=[[0, 0, 0]])
    return build_source("folder", root, **{**opts, **kw})


# ------------------------------------------------------------------------------------------ defaults
def test_defaults_read_the_files_as_they_are(tmp_path):
    truth = write_areas(tmp_path)
    src = folder(tmp_path)
    assert src.factor == 1 and src.read_options() == {} and src.classes == tuple(CLASSES)
    for i, s in enumerate(src.samples):
        assert s.group == s.image_id  # each file its own split group
        image, mask = src.read(i)
        assert image.shape == (42, 50, 3) and np.array_equal(mask, truth[s.image_id])
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / "images" / f"{s.image_id}.png")))


# ---------------------------------------------------------------------------------------- resampling
def test_resampled_size_rounds_halves_up():
    assert [resampled_size(n, 0.25) for n in (42, 50, 682, 1, 3)] == [11, 13, 171, 1, 1]
    assert resampled_size(682, 0.3 / 1.2) == 171  # 0.3 / 1.2 is 0.2499... in floating point
    assert resampled_size(77, 1) == 77


def test_scale_resamples_images_bilinear_and_masks_nearest(tmp_path):
    truth = write_areas(tmp_path)
    src = folder(tmp_path, scale=0.5)
    assert src.read_options() == {"resample": 0.5}
    for i, s in enumerate(src.samples):
        image, mask = src.read(i)
        assert image.shape == (21, 25, 3) and mask.shape == (21, 25)
        original = Image.open(tmp_path / "images" / f"{s.image_id}.png")
        assert np.array_equal(image, np.asarray(original.resize((25, 21), Image.Resampling.BILINEAR)))
        expected = np.asarray(Image.fromarray(truth[s.image_id]).resize((25, 21), Image.Resampling.NEAREST))
        assert np.array_equal(mask, expected)
        assert set(np.unique(mask)) <= set(np.unique(truth[s.image_id]))  # no blended labels


def test_downsampling_is_antialiased(tmp_path):
    """A one-pixel checkerboard shrunk 4x is mid grey (aliasing would give black or white)."""
    board = (((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2) * 255).astype(np.uint8)
    _save(tmp_path / "images" / "a.png", np.repeat(board[..., None], 3, 2))
    _save(tmp_path / "masks" / "a.png", np.zeros((64, 64), np.uint8))
    image = build_source("folder", tmp_path, num_classes=2, scale=0.25)[0]["image"]
    assert image.shape == (16, 16, 3) and np.abs(image[2:-2, 2:-2].astype(int) - 128).max() <= 8


def test_target_gsd_is_scale_gsd_over_target(tmp_path):
    write_areas(tmp_path)
    by_scale = folder(tmp_path, scale=0.25)
    by_gsd = folder(tmp_path, gsd=0.3, target_gsd=1.2)
    assert by_gsd.factor == pytest.approx(0.25)
    for i in range(len(by_scale)):
        for a, b in zip(by_scale.read(i), by_gsd.read(i), strict=True):
            assert a.shape == (11, 13, *a.shape[2:]) and np.array_equal(a, b)
    assert folder(tmp_path, gsd=0.5)[0]["image"].shape == (42, 50, 3)  # gsd alone: no resampling
    # what a scorer records of the reading: the factor, and the ground sample distance as read where known
    assert folder(tmp_path).reading() == {}
    assert folder(tmp_path, scale=0.25).reading() == {"scale": 0.25}
    assert by_gsd.reading() == {"scale": pytest.approx(0.25), "gsd": pytest.approx(1.2)}
    assert folder(tmp_path, gsd=0.5).reading() == {"scale": 1.0, "gsd": 0.5}


def test_patches_are_cut_after_resampling(tmp_path):
    write_areas(tmp_path, names=("area1_a",), size=(40, 64))
    src = folder(tmp_path, scale=0.5, patch_size=16, stride=8)  # read as 20 x 32
    assert [s.window for s in src.samples] == [(top, left, 16, 16) for top in (0, 4) for left in (0, 8, 16)]
    assert src.samples[1].image_id == "area1_a_0_8"
    whole, _ = folder(tmp_path, scale=0.5).read(0)
    image, mask = src.read(4)  # (4, 8)
    assert image.shape == (16, 16, 3) and np.array_equal(image, whole[4:20, 8:24])


def test_patch_larger_than_the_resampled_image(tmp_path):
    write_areas(tmp_path, names=("area1_a",), size=(40, 64))
    write_areas(tmp_path, names=("area2_a",), size=(80, 80))
    with pytest.raises(
        RSSQAError, match=r"area1_a\.png: 64x40 resampled by 0\.5 to 32x20 is smaller than patch_size 24$"
    ):
        folder(tmp_path, scale=0.5, patch_size=24)
    src = folder(tmp_path, scale=0.5, patch_size=24, on_bad="skip")
    assert (
        len(src.bad) == 1
        and src.bad[0].source.endswith("area1_a.png")
        and {s.group for s in src.samples} == {"area2_a"}
    )
    # without resampling the message is the one it always was
    with pytest.raises(RSSQAError, match=r"area1_a\.png: 64x40 is smaller than patch_size 48$"):
        folder(tmp_path, patch_size=48)


def test_resampled_whole_images_must_still_share_one_size(tmp_path):
    write_areas(tmp_path, names=("area1_a",), size=(40, 64))
    write_areas(tmp_path, names=("area2_a",), size=(42, 64))
    with pytest.raises(RSSQAError, match="2 sizes"):
        folder(tmp_path, scale=0.5)  # 32 x 20 and 32 x 21
    assert len(folder(tmp_path, scale=0.2)) == 2  # both 13 x 8: sizes are compared as read


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": 0}, "scale must be a positive number, got 0"),
        ({"scale": -0.5}, "scale must be a positive number"),
        ({"scale": 0.5, "target_gsd": 1.0, "gsd": 0.5}, "give scale or target_gsd, not both"),
        ({"target_gsd": 1.0}, "target_gsd 1 needs the source's gsd"),
        ({"gsd": 0, "target_gsd": 1.0}, "gsd must be a positive number"),
    ],
)
def test_bad_resampling_options(tmp_path, options, message):
    write_areas(tmp_path, names=("area1_a",))
    with pytest.raises(RSSQAError, match=message):
        folder(tmp_path, **options)


# -------------------------------------------------------------------------------------- split groups
def test_group_pattern_groups_files_and_their_patches(tmp_path):
    write_areas(tmp_path)
    src = folder(tmp_path, group_pattern=r"(area\d+)_", patch_size=16)
    groups = {s.image_id: s.group for s in src.samples}
    assert {i.rsplit("_", 2)[0]: g for i, g in groups.items()} == {
        "area1_a": "area1", "area1_b": "area1", "area2_a": "area2", "area3_a": "area3",
    }  # fmt: skip
    assert len(groups) == 4 * 12  # 42 x 50 -> 3 x 4 patches of 16 px (the last ones flush with the edge)


def test_group_pattern_searches_the_path_under_the_images_folder(tmp_path):
    for area in ("north", "south"):
        for k in range(2):
            _save(tmp_path / "images" / area / f"t{k}.png", np.zeros((8, 8, 3), np.uint8))
            _save(tmp_path / "masks" / area / f"t{k}.png", np.zeros((8, 8), np.uint8))
    src = build_source(
        "folder",
        tmp_path,
        num_classes=2,
        image_glob="*/*.png",
        mask_glob="*/*.png",
        group_pattern=r"^([^/]+)/",
    )
    assert {s.image_id: s.group for s in src.samples} == {
        "north/t0": "north", "north/t1": "north", "south/t0": "south", "south/t1": "south",
    }  # fmt: skip


def test_group_pattern_that_misses_a_file_names_it_and_the_pattern(tmp_path):
    write_areas(tmp_path, names=("area1_a", "stray"))
    for on_bad in ("error", "skip"):  # a configuration error, whatever on_bad says
        with pytest.raises(
            RSSQAError,
            match=r"stray\.png: group_pattern '\(area\\d\+\)_' does not match its id 'stray' \(every image",
        ):
            folder(tmp_path, group_pattern=r"(area\d+)_", on_bad=on_bad)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"area\d+_", "has 0 capture groups; it needs exactly one"),
        (r"(area)(\d+)_", "has 2 capture groups"),
        (r"(area", "is not a regular expression"),
    ],
)
def test_group_pattern_needs_one_capture_group(tmp_path, pattern, message):
    write_areas(tmp_path, names=("area1_a",))
    with pytest.raises(RSSQAError, match=message):
        folder(tmp_path, group_pattern=pattern)


def test_groups_reach_the_splits(tmp_path):
    """sqed's split assignment keeps each group in one split (four areas, four splits)."""
    write_areas(tmp_path, names=[f"area{a}_{k}" for a in range(4) for k in range(3)])
    cfg = SQEDConfig(
        sources=[SourceConfig("mine", ".", "folder", {"classes": CLASSES, "palette": PALETTE,
                                                      "ignore_colors": [[0, 0, 0]], "group_pattern": r"(area\d)_",
                                                      "patch_size": 16})],
        splits={"seg": 0.25, "train": 0.25, "val": 0.25, "test": 0.25},
    )  # fmt: skip
    prep = prepare_source(cfg.sources[0], cfg, tmp_path / "out", tmp_path)
    split_of: dict[str, set[str]] = {}
    for g, sp in zip(prep.pool_groups, prep.pool_splits, strict=True):
        split_of.setdefault(g, set()).add(sp)
    seg_groups = {prep.source.samples[i].group for i in prep.seg}
    assert all(len(v) == 1 for v in split_of.values()) and len(seg_groups) == 1
    assert not seg_groups & set(split_of) and sorted({s for v in split_of.values() for s in v}) == [
        "test",
        "train",
        "val",
    ]


# -------------------------------------------------------------------------------------- ignore classes
def test_ignore_classes_sends_the_class_to_the_ignore_index(tmp_path):
    truth = write_areas(tmp_path)
    src = folder(tmp_path, ignore_classes=["unlabeled"])
    assert src.classes == ("road", "roof", "tree") and src.num_classes == 3
    for i, s in enumerate(src.samples):
        t = truth[s.image_id]
        assert np.array_equal(src.read(i)[1], np.where(t == 3, IGNORE_INDEX, t))
    # a class in the middle: the later ones move down
    roof = folder(tmp_path, ignore_classes="roof")  # one name as a plain string
    t = truth[roof.samples[0].image_id]
    expected = np.select([t == 0, t == 1, t == 2, t == 3], [0, IGNORE_INDEX, 1, 2], IGNORE_INDEX)
    assert roof.classes == ("road", "tree", "unlabeled") and np.array_equal(roof.read(0)[1], expected)


def test_ignore_classes_on_index_masks():
    # LoveDA-like: stored 0 = no data, 1..3 = classes a, b, c; drop b
    codec = MaskCodec(("a", "b", "c"), value_map={0: IGNORE_INDEX, 1: 0, 2: 1, 3: 2})
    reduced = codec.without_classes(["b"])
    stored = np.array([[0, 1, 2, 3]], np.uint8)
    assert reduced.classes == ("a", "c")
    assert reduced.decode(stored).tolist() == [[IGNORE_INDEX, 0, IGNORE_INDEX, 1]]
    # plain class indices 0..2 (255 = no label), drop a: 1 -> 0, 2 -> 1; 3 is still unknown
    plain = MaskCodec(("a", "b", "c")).without_classes(["a"])
    assert plain.decode(np.array([[0, 1, 2, 255]], np.uint8)).tolist() == [[IGNORE_INDEX, 0, 1, IGNORE_INDEX]]
    with pytest.raises(RSSQAError, match="not among the 2 classes"):
        plain.decode(np.array([[3]], np.uint8))


def test_ignore_classes_errors(tmp_path):
    write_areas(tmp_path, names=("area1_a",))
    with pytest.raises(
        RSSQAError,
        match=r"ignore_classes \['clutter'\] are not classes of this schema \(road, roof, tree, unlabeled\)",
    ):
        folder(tmp_path, ignore_classes=["clutter"])
    with pytest.raises(RSSQAError, match="would leave no class"):
        folder(tmp_path, ignore_classes=CLASSES)


# ------------------------------------------------------------------------------- every layout, caches
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_takes_the_options(tmp_path, layout):
    writer, _, _, opts = LAYOUTS[layout]
    writer(tmp_path)
    plain = build_source(layout, tmp_path, **opts)
    first = plain.classes[0]
    src = build_source(layout, tmp_path, scale=0.5, group_pattern="^(.)", ignore_classes=[first], **opts)
    assert src.classes == plain.classes[1:] and len(src) == len(plain)
    for i, s in enumerate(src.samples):
        before, after = plain.read(i)[1], src.read(i)[1]
        assert after.shape == tuple(resampled_size(n, 0.5) for n in before.shape)
        assert s.group == s.image_id[0]
        shrunk = np.asarray(Image.fromarray(before).resize(after.shape[::-1], Image.Resampling.NEAREST))
        expected = np.where(
            shrunk == 0, IGNORE_INDEX, np.where(shrunk == IGNORE_INDEX, IGNORE_INDEX, shrunk - 1)
        )
        assert np.array_equal(after, expected)
    assert set(list_layouts()) >= set(LAYOUTS)


def test_resampling_changes_the_cache_fingerprints(tmp_path):
    write_areas(tmp_path)
    plain, half = folder(tmp_path), folder(tmp_path, scale=0.5)
    assert _files_fingerprint(plain, [0, 1]) != _files_fingerprint(half, [0, 1])
    assert _files_fingerprint(plain, [0, 1]) == _files_fingerprint(folder(tmp_path, scale=1.0), [0, 1])
