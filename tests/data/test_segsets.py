"""Segmentation loaders on tiny fake data written in each real data set's layout, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rssqa.data.segsets import (
    DEEPGLOBE_PALETTE,
    IGNORE_INDEX,
    ISPRS_PALETTE,
    UAVID_PALETTE,
    FilePair,
    MaskCodec,
    SegArrays,
    SegDataModule,
    SegSource,
    SegSubset,
    build_source,
    list_layouts,
    patch_windows,
)
from rssqa.errors import RSSQAError

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ fake data writers
def _save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labels(h: int, w: int, n_classes: int) -> np.ndarray:
    """Class indices with every class present in blocks, so decoding errors show."""
    lab = (np.arange(h)[:, None] // 4 + np.arange(w)[None, :] // 4) % n_classes
    return lab.astype(np.uint8)


def _colour(labels: np.ndarray, palette) -> np.ndarray:
    return np.asarray(palette, np.uint8)[labels]


def write_isprs(root: Path, kind: str, n: int = 3, size=(40, 48)) -> dict[str, np.ndarray]:
    """ISPRS Vaihingen (``kind="vaihingen"``) or Potsdam layout; returns id -> true class indices."""
    truth = {}
    for k in range(n):
        lab = _labels(*size, 6)
        if kind == "vaihingen":
            stem = f"top_mosaic_09cm_area{k + 1}"
            img, msk = root / "top" / f"{stem}.tif", root / "gts_for_participants" / f"{stem}.tif"
        else:
            stem = f"top_potsdam_2_{10 + k}"
            img, msk = root / "2_Ortho_RGB" / f"{stem}_RGB.tif", root / "5_Labels_all" / f"{stem}_label.tif"
        _save(img, _image(*size))
        _save(msk, _colour(lab, ISPRS_PALETTE))
        truth[stem] = lab
    return truth


def write_loveda(root: Path, size=(32, 32)) -> dict[str, tuple[np.ndarray, str]]:
    truth, i = {}, 0
    for split in ("Train", "Val"):
        for domain in ("Urban", "Rural"):
            stored = (_labels(*size, 8)).astype(np.uint8)  # 0 = no data, 1..7 classes
            _save(root / split / domain / "images_png" / f"{i}.png", _image(*size))
            _save(root / split / domain / "masks_png" / f"{i}.png", stored)
            truth[str(i)] = (np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8), split.lower())
            i += 1
    return truth


def write_deepglobe(
    root: Path, n: int = 2, size=(32, 32), stray: bool = True, images="train", masks=None, first: int = 1000
) -> dict[str, np.ndarray]:
    """DeepGlobe: the release's flat ``train/`` (default) or ``images``/``masks`` folders under ``root``."""
    truth = {}
    for k in range(n):
        uid = str(first + k)
        lab = (_labels(*size, 7) + k) % 7  # 6 = unknown (black); each file its own, so pairing shows
        rgb = np.asarray([*DEEPGLOBE_PALETTE, (0, 0, 0)], np.uint8)[lab]
        if stray:  # the released masks hold values near 0 and 255, not exactly them
            rgb = np.where(rgb > 128, rgb - 3, rgb + 2).astype(np.uint8)
        _save(root / images / f"{uid}_sat.jpg", _image(*size), quality=90)
        _save(root / (masks or images) / f"{uid}_mask.png", rgb)
        truth[uid] = np.where(lab == 6, IGNORE_INDEX, lab).astype(np.uint8)
    return truth


def write_uavid(root: Path, size=(32, 64)) -> dict[str, tuple[np.ndarray, str, str]]:
    truth = {}
    for split, seqs in (("train", ("seq1", "seq2")), ("val", ("seq16",))):
        for seq in seqs:
            for frame in ("000000", "000100"):
                lab = _labels(*size, 8)
                base = root / f"uavid_{split}" / seq
                _save(base / "Images" / f"{frame}.png", _image(*size))
                _save(base / "Labels" / f"{frame}.png", _colour(lab, UAVID_PALETTE))
                truth[f"{seq}_{frame}"] = (lab, split, seq)
    return truth


def write_openearthmap(root: Path, size=(32, 32)) -> dict[str, tuple[np.ndarray, str]]:
    truth, lists = {}, {"train": [], "val": []}
    for region in ("aachen", "kyoto"):
        for k in (1, 2):
            name = f"{region}_{k}"
            stored = _labels(*size, 9)  # 0 = unknown, 1..8 classes
            _save(root / region / "images" / f"{name}.tif", _image(*size))
            _save(root / region / "labels" / f"{name}.tif", stored)
            split = "val" if k == 2 and region == "kyoto" else "train"
            lists[split].append(f"{name}.tif")
            truth[name] = (np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8), split)
    for split, names in lists.items():
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return truth


def write_folder(root: Path, kind: str, sizes=((32, 32), (48, 40))) -> dict[str, np.ndarray]:
    """A generic folder: RGB palette masks, index masks or palette-mode PNGs; images of two sizes."""
    palette = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]
    truth = {}
    for k, size in enumerate(sizes):
        lab = _labels(*size, 3)
        _save(root / "imgs" / f"tile{k}_img.png", _image(*size))
        if kind == "palette":
            _save(root / "lbls" / f"tile{k}_lbl.png", _colour(lab, palette))
        elif kind == "index":
            _save(root / "lbls" / f"tile{k}_lbl.png", lab)
        else:  # palette-mode PNG: the stored indices are the classes
            im = Image.fromarray(lab, mode="P")
            im.putpalette([v for c in palette for v in c])
            (root / "lbls").mkdir(parents=True, exist_ok=True)
            im.save(root / "lbls" / f"tile{k}_lbl.png")
        truth[f"tile{k}"] = lab
    return truth


FOLDER_OPTS = {"images": "imgs", "masks": "lbls", "image_strip": "_img", "mask_strip": "_lbl"}
FOLDER_PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]


def _read_all(src) -> dict[str, np.ndarray]:
    return {src[i]["image_id"]: src[i]["mask"] for i in range(len(src))}


# ----------------------------------------------------------------------------------- real layouts
def test_registry_lists_every_layout():
    assert {"potsdam", "vaihingen", "loveda", "deepglobe", "uavid", "openearthmap", "folder"} <= set(
        list_layouts()
    )


@pytest.mark.parametrize("kind", ["vaihingen", "potsdam"])
def test_isprs(tmp_path, kind):
    truth = write_isprs(tmp_path, kind)
    src = build_source(kind, tmp_path)
    assert src.classes[0] == "impervious_surfaces" and src.num_classes == 6
    got = _read_all(src)
    assert set(got) == set(truth)
    for k, lab in truth.items():
        np.testing.assert_array_equal(got[k], lab)
    sample = src[0]
    assert sample["image"].shape == (40, 48, 3) and sample["image"].dtype == np.uint8


def test_isprs_eroded_boundaries_are_ignored(tmp_path):
    write_isprs(tmp_path, "vaihingen", n=1)
    path = tmp_path / "gts_for_participants" / "top_mosaic_09cm_area1.tif"
    rgb = np.asarray(Image.open(path)).copy()
    rgb[0, :5] = 0  # black boundary pixels of the eroded ground truth
    _save(path, rgb)
    mask = build_source("vaihingen", tmp_path)[0]["mask"]
    assert (mask[0, :5] == IGNORE_INDEX).all() and (mask[1:] != IGNORE_INDEX).all()


def test_loveda(tmp_path):
    truth = write_loveda(tmp_path)
    src = build_source("loveda", tmp_path)
    assert src.num_classes == 7
    got = _read_all(src)
    for k, (lab, _split) in truth.items():
        np.testing.assert_array_equal(got[k], lab)
    splits = {s.image_id: s.pair.split for s in src.samples}
    assert splits == {k: v[1] for k, v in truth.items()}
    only_train = build_source("loveda", tmp_path, splits=["Train"])
    assert len(only_train) == 2


def test_deepglobe_binarises_stray_values(tmp_path):
    truth = write_deepglobe(tmp_path)
    src = build_source("deepglobe", tmp_path)
    for k, lab in truth.items():
        np.testing.assert_array_equal(_read_all(src)[k], lab)
    with pytest.raises(RSSQAError, match=r"_mask\.png: .*outside the palette"):
        build_source("deepglobe", tmp_path, binarize=False).check()


def write_loveda_torchgeo(root: Path, size=(16, 16)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LoveDA as torchgeo's fake data ships it: ``01.png`` in every split/domain folder (``Test`` without
    masks), plus stems found once (``7``) or in a read folder and the unread ``Test`` (``5``).

    Returns: expected id -> (image, true class indices), for the Train and Val folders.
    """
    truth, k = {}, 0
    for split in ("Train", "Val", "Test"):
        for domain in ("Urban", "Rural"):
            stems = ["01"] + (["7", "5"] if (split, domain) == ("Train", "Urban") else [])
            stems += ["5"] if (split, domain) == ("Test", "Urban") else []
            for stem in stems:
                image, stored = _image(*size), ((_labels(*size, 8) + k) % 8).astype(np.uint8)
                k += 1
                _save(root / split / domain / "images_png" / f"{stem}.png", image)
                if split == "Test":
                    continue
                _save(root / split / domain / "masks_png" / f"{stem}.png", stored)
                uid = stem if stem == "7" else f"{split.lower()}-{domain.lower()}-{stem}"
                truth[uid] = (image, np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8))
    return truth


def test_loveda_same_id_in_several_folders(tmp_path):
    truth = write_loveda_torchgeo(tmp_path)
    src = build_source("loveda", tmp_path)
    assert sorted(s.image_id for s in src.samples) == sorted(truth) == [
        "7", "train-rural-01", "train-urban-01", "train-urban-5", "val-rural-01", "val-urban-01",
    ]  # fmt: skip
    for i in range(len(src)):
        image, lab = truth[src[i]["image_id"]]
        np.testing.assert_array_equal(src[i]["image"], image)  # PNG: lossless, so pairing shows
        np.testing.assert_array_equal(src[i]["mask"], lab)
    by_id = {s.image_id: s.pair for s in src.samples}
    val_rural = by_id["val-rural-01"]
    assert val_rural.split == "val" and val_rural.mask.parts[-4:-2] == ("Val", "Rural")
    # an image keeps its id whichever folders are read
    one = build_source("loveda", tmp_path, splits=["Train"], domains=["Urban"])
    assert [s.image_id for s in one.samples] == ["7", "train-urban-01", "train-urban-5"]


def test_loveda_unique_ids_stay_plain(tmp_path):
    truth = write_loveda(tmp_path)
    _save(tmp_path / "Test" / "Urban" / "images_png" / "9.png", _image(32, 32))  # no clash: ids unchanged
    assert sorted(s.image_id for s in build_source("loveda", tmp_path).samples) == sorted(truth)


@pytest.mark.parametrize("given", [".", "data", "data/training_data"])
def test_deepglobe_torchgeo_layout(tmp_path, given):
    data = tmp_path / "data"
    truth = write_deepglobe(data, n=3, images="training_data/images", masks="training_data/masks", first=1)
    test_truth = write_deepglobe(data, images="test_data/images", masks="test_data/masks", first=8)
    src = build_source("deepglobe", tmp_path / given)
    assert src.num_classes == 6 and sorted(s.image_id for s in src.samples) == ["1", "2", "3"]
    got = _read_all(src)
    for k, lab in truth.items():
        np.testing.assert_array_equal(got[k], lab)  # classes from the palette, each mask its own image's
    for s in src.samples:
        assert s.pair.image.name == f"{s.image_id}_sat.jpg" and s.pair.mask.name == f"{s.image_id}_mask.png"
        assert s.pair.image.parent.name == "images" and s.pair.mask.parent.name == "masks"
    if given != "data/training_data":
        test = build_source("deepglobe", tmp_path / given, split="test")
        assert set(_read_all(test)) == set(test_truth)
        for k, lab in test_truth.items():
            np.testing.assert_array_equal(_read_all(test)[k], lab)


def test_deepglobe_flat_layout_given_directly_and_errors(tmp_path):
    truth = write_deepglobe(tmp_path)
    direct = build_source("deepglobe", tmp_path / "train")  # the split folder itself as root
    assert set(_read_all(direct)) == set(truth)
    write_deepglobe(tmp_path / "tg", images="data/training_data/images", masks="data/training_data/masks")
    (tmp_path / "tg" / "data" / "training_data" / "masks" / "1000_mask.png").unlink()
    with pytest.raises(
        RSSQAError, match=r"1000_sat\.jpg: no mask \(expected .*training_data/masks/1000_mask\.png"
    ):
        build_source("deepglobe", tmp_path / "tg")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(RSSQAError, match=r"empty/train: no images found"):
        build_source("deepglobe", tmp_path / "empty")
    (tmp_path / "other").mkdir()
    with pytest.raises(
        RSSQAError, match=r"other: no DeepGlobe split folder; expected train/\*_sat\.jpg or data/"
    ):
        build_source("deepglobe", tmp_path / "other")
    with pytest.raises(RSSQAError, match=r"nowhere: DeepGlobe folder not found"):
        build_source("deepglobe", tmp_path / "nowhere")


def test_uavid(tmp_path):
    truth = write_uavid(tmp_path)
    src = build_source("uavid", tmp_path)
    assert src.num_classes == 8
    got = _read_all(src)
    assert set(got) == set(truth)
    for k, (lab, _split, _seq) in truth.items():
        np.testing.assert_array_equal(got[k], lab)
    by_id = {s.image_id: s for s in src.samples}
    assert by_id["seq1_000100"].group == "seq1" and by_id["seq16_000000"].pair.split == "val"


def test_openearthmap_lists(tmp_path):
    truth = write_openearthmap(tmp_path)
    src = build_source("openearthmap", tmp_path)
    assert src.num_classes == 8
    got = _read_all(src)
    for k, (lab, split) in truth.items():
        np.testing.assert_array_equal(got[k], lab)
        assert next(s.pair.split for s in src.samples if s.image_id == k) == split
    assert len(build_source("openearthmap", tmp_path, split_files=["val.txt"])) == 1


def test_openearthmap_list_naming_a_missing_file(tmp_path):
    write_openearthmap(tmp_path)
    (tmp_path / "val.txt").write_text("nowhere_9.tif\n")
    with pytest.raises(RSSQAError, match=r"val\.txt: lists nowhere_9\.tif"):
        build_source("openearthmap", tmp_path)
    (tmp_path / "val.txt").unlink()
    with pytest.raises(RSSQAError, match=r"val\.txt: split list not found"):
        build_source("openearthmap", tmp_path)


def test_world_sources_load(tiny_world):
    for name in ("vaihingen", "potsdam", "loveda", "deepglobe"):
        src = build_source(name, tiny_world / "sources" / name)
        assert len(src.check()) + len(src.unlabelled) == len(src) == 16
        assert src[0]["image"].shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------ folder
@pytest.mark.parametrize("kind", ["palette", "index", "P"])
def test_folder_mask_kinds_and_patches(tmp_path, kind):
    truth = write_folder(tmp_path, kind)
    opts = (
        dict(FOLDER_OPTS, palette=FOLDER_PALETTE) if kind == "palette" else dict(FOLDER_OPTS, num_classes=3)
    )
    src = build_source("folder", tmp_path, patch_size=16, **opts)
    # 32x32 -> 4 patches; 48x40 (h x w) -> 3 x 3 with the last row/column flush with the edge
    assert len(src) == 4 + 9
    for i in range(len(src)):
        s = src.samples[i]
        top, left, h, w = s.window
        np.testing.assert_array_equal(src[i]["mask"], truth[s.pair.image_id][top : top + h, left : left + w])
        assert src[i]["image"].shape == (16, 16, 3)
        assert s.group == s.pair.image_id  # patches of one file stay in one split


def test_folder_recursive_with_globs(tmp_path):
    for sub in ("a", "b"):
        _save(tmp_path / "im" / sub / "x.jpg", _image(16, 16))
        _save(tmp_path / "gt" / sub / "x.png", _labels(16, 16, 2))
    src = build_source("folder", tmp_path, images="im", masks="gt", image_glob="**/*.jpg", mask_glob="**/*.png",
                       num_classes=2)  # fmt: skip
    assert sorted(s.image_id for s in src.samples) == ["a/x", "b/x"]


def test_patch_windows_cover_every_pixel():
    for h, w, p, s in [(48, 40, 16, None), (50, 50, 16, 8), (16, 16, 16, None)]:
        cover = np.zeros((h, w), int)
        for top, left in patch_windows(h, w, p, s):
            cover[top : top + p, left : left + p] += 1
        assert (cover > 0).all()
    assert patch_windows(10, 40, 16) == []


def test_folder_without_patch_size_rejects_mixed_sizes(tmp_path):
    write_folder(tmp_path, "index")
    with pytest.raises(RSSQAError, match="sizes.*set patch_size"):
        build_source("folder", tmp_path, num_classes=3, **FOLDER_OPTS)


def test_codec_round_trip_and_ignore_colours():
    codec = MaskCodec(("a", "b"), palette=((1, 2, 3), (4, 5, 6)), ignore_colors=((0, 0, 0),))
    lab = np.array([[0, 1], [IGNORE_INDEX, 1]], np.uint8)
    np.testing.assert_array_equal(codec.decode(codec.encode_palette(lab)), lab)


# --------------------------------------------------------------------------------------- bad input
def test_missing_mask_error_names_the_image(tmp_path):
    write_isprs(tmp_path, "vaihingen")
    (tmp_path / "gts_for_participants" / "top_mosaic_09cm_area2.tif").unlink()
    with pytest.raises(
        RSSQAError, match=r"top_mosaic_09cm_area2\.tif: no mask \(expected .*gts_for_participants"
    ):
        build_source("vaihingen", tmp_path)


def test_missing_mask_skip_and_count(tmp_path):
    write_isprs(tmp_path, "potsdam")
    (tmp_path / "5_Labels_all" / "top_potsdam_2_11_label.tif").unlink()
    src = build_source("potsdam", tmp_path, on_bad="skip")
    assert len(src) == 2 and len(src.bad) == 1
    assert "top_potsdam_2_11_RGB.tif" in str(src.bad[0]) and src.bad[0].key == "top_potsdam_2_11"


def test_missing_mask_folder_names_where_masks_were_expected(tmp_path):
    write_loveda(tmp_path)
    for p in (tmp_path / "Val" / "Rural" / "masks_png").iterdir():
        p.unlink()
    with pytest.raises(RSSQAError, match=r"images_png/3\.png: no mask"):
        build_source("loveda", tmp_path)


def test_size_mismatch(tmp_path):
    write_deepglobe(tmp_path)
    _save(tmp_path / "train" / "1001_mask.png", np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(
        RSSQAError, match=r"1001_sat\.jpg: image is 32x32 but its mask .*1001_mask\.png is 32x16"
    ):
        build_source("deepglobe", tmp_path)
    assert len(build_source("deepglobe", tmp_path, on_bad="skip")) == 1


def test_colours_outside_the_palette(tmp_path):
    write_uavid(tmp_path)
    path = tmp_path / "uavid_train" / "seq2" / "Labels" / "000100.png"
    rgb = np.asarray(Image.open(path)).copy()
    rgb[3, 3] = (1, 2, 3)
    _save(path, rgb)
    src = build_source("uavid", tmp_path)  # headers are fine: found when the pixels are read
    with pytest.raises(
        RSSQAError, match=r"seq2/Labels/000100\.png: 1 pixels have colours outside the palette: \(1, 2, 3\)"
    ):
        src.check()
    skipping = build_source("uavid", tmp_path, on_bad="skip")
    good = skipping.check()
    assert len(good) == len(skipping) - 1 and len(skipping.bad) == 1
    ignoring = build_source("uavid", tmp_path, unknown="ignore")
    mask = ignoring[[s.image_id for s in ignoring.samples].index("seq2_000100")]["mask"]
    assert mask[3, 3] == IGNORE_INDEX and (mask != IGNORE_INDEX).sum() == mask.size - 1


def test_empty_folders(tmp_path):
    (tmp_path / "top").mkdir()
    with pytest.raises(RSSQAError, match=r"top: no images found"):
        build_source("vaihingen", tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "lbls").mkdir()
    with pytest.raises(RSSQAError, match=r"imgs: no images match .* \(the folder is empty\)$"):
        build_source("folder", tmp_path, num_classes=2, **FOLDER_OPTS)
    for i in range(3):  # a pattern in the wrong case: the error says what the folder holds
        (tmp_path / "imgs" / f"a{i}.JPG").write_bytes(b"")
    (tmp_path / "imgs" / "notes.txt").write_text("")
    with pytest.raises(RSSQAError, match=r"imgs: no images match '\*\.jpg' \(it holds 3 \*\.JPG, 1 \*\.txt\)$"):
        build_source("folder", tmp_path, num_classes=2, **{**FOLDER_OPTS, "image_glob": "*.jpg"})
    with pytest.raises(RSSQAError, match=r"nowhere: image folder not found"):
        build_source("folder", tmp_path, images="nowhere", num_classes=2)


def test_class_count_contradicted_by_data(tmp_path):
    write_folder(tmp_path, "index")  # values 0..2
    src = build_source("folder", tmp_path, num_classes=2, patch_size=16, **FOLDER_OPTS)
    with pytest.raises(RSSQAError, match=r"tile0_lbl\.png: mask values \[2\] are not among the 2 classes"):
        src.check()
    write_openearthmap(tmp_path / "oem")
    _save(tmp_path / "oem" / "aachen" / "labels" / "aachen_1.tif", np.full((32, 32), 9, np.uint8))
    with pytest.raises(RSSQAError, match=r"aachen_1\.tif: mask values \[9\]"):
        build_source("openearthmap", tmp_path / "oem").check()


def test_class_count_contradicted_by_config(tmp_path):
    write_folder(tmp_path, "palette")
    with pytest.raises(RSSQAError, match="num_classes is 4 but the palette has 3 colours"):
        build_source("folder", tmp_path, palette=FOLDER_PALETTE, num_classes=4, **FOLDER_OPTS)
    with pytest.raises(RSSQAError, match="num_classes is 3 but classes names 2"):
        build_source("folder", tmp_path, classes=["a", "b"], num_classes=3, **FOLDER_OPTS)


def test_rgb_mask_given_as_index_and_index_given_a_palette(tmp_path):
    write_folder(tmp_path, "palette")
    with pytest.raises(
        RSSQAError, match=r"tile0_lbl\.png: expected a single-channel class-index mask, got RGB"
    ):
        build_source("folder", tmp_path, num_classes=3, patch_size=16, **FOLDER_OPTS).check()
    write_folder(tmp_path / "idx", "index")
    with pytest.raises(RSSQAError, match=r"tile0_lbl\.png: expected an RGB colour mask"):
        build_source("folder", tmp_path / "idx", palette=FOLDER_PALETTE, patch_size=16, **FOLDER_OPTS).check()


def test_unreadable_image_and_wrong_bands(tmp_path):
    write_isprs(tmp_path, "vaihingen")
    (tmp_path / "top" / "top_mosaic_09cm_area1.tif").write_bytes(b"not a tiff")
    with pytest.raises(RSSQAError, match=r"area1\.tif: unreadable image"):
        build_source("vaihingen", tmp_path)
    _save(tmp_path / "top" / "top_mosaic_09cm_area1.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(RSSQAError, match=r"area1\.tif: 1 bands; expected 3"):
        build_source("vaihingen", tmp_path)


def test_four_band_images_with_bands(tmp_path):
    write_isprs(tmp_path, "potsdam", n=1)
    rgbir = np.concatenate([_image(40, 48), np.full((40, 48, 1), 7, np.uint8)], axis=2)
    _save(tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif", rgbir)
    with pytest.raises(RSSQAError, match="4 bands; expected 3"):
        build_source("potsdam", tmp_path, image_dir="4_Ortho_RGBIR")
    src = build_source("potsdam", tmp_path, image_dir="4_Ortho_RGBIR", bands=[3, 1, 2])
    assert (src[0]["image"][..., 0] == 7).all()


def test_image_smaller_than_a_patch(tmp_path):
    write_deepglobe(tmp_path)
    with pytest.raises(RSSQAError, match=r"_sat\.jpg: 32x32 is smaller than patch_size 64"):
        build_source("deepglobe", tmp_path, patch_size=64)


def test_unlabelled_patches_are_left_out_not_errors(tmp_path):
    write_loveda(tmp_path)
    path = tmp_path / "Train" / "Urban" / "masks_png" / "0.png"
    _save(path, np.zeros((32, 32), np.uint8))  # all no-data
    src = build_source("loveda", tmp_path)
    good = src.check()
    assert len(good) == 3 and src.unlabelled == ["0"] and not src.bad


def test_duplicate_ids_and_bad_config(tmp_path):
    write_loveda(tmp_path)
    base = tmp_path / "Train" / "Urban"
    pair = FilePair("0", base / "images_png" / "0.png", base / "masks_png" / "0.png")
    with pytest.raises(RSSQAError, match=r"dup: image ids \['0'\] occur more than once"):
        SegSource("dup", [pair, pair], MaskCodec(("a", "b")))
    with pytest.raises(RSSQAError, match="layout 'nope' unknown"):
        build_source("nope", tmp_path)
    with pytest.raises(RSSQAError, match=r"unknown options \['patchsize'\]"):
        build_source("loveda", tmp_path, patchsize=3)
    with pytest.raises(RSSQAError, match="on_bad='maybe'"):
        build_source("loveda", tmp_path, on_bad="maybe")
    with pytest.raises(RSSQAError, match="palette has 1 colours but there are 2 classes"):
        MaskCodec(("a", "b"), palette=((0, 0, 0),))


# ------------------------------------------------------------------------------------ tensors / DM
def test_arrays_subset_and_datamodule(tmp_path):
    write_isprs(tmp_path, "vaihingen", n=3, size=(32, 32))
    src = build_source("vaihingen", tmp_path)
    arrays = SegArrays.from_source(src, [0, 2])
    subset = SegSubset(src, [0, 2])
    for a, b in zip(arrays, subset, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    item = arrays[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= 0 and item["image"].max() <= 1
    assert item["mask"].dtype == torch.int64
    dm = SegDataModule(train=arrays, predict=subset, batch_size=2, seed=1)
    order = [b["index"].tolist() for b in dm.train_dataloader()]
    assert order == [
        b["index"].tolist() for b in SegDataModule(train=arrays, batch_size=2, seed=1).train_dataloader()
    ]
    assert [b["index"].tolist() for b in dm.predict_dataloader()] == [[0, 1]]
    with pytest.raises(RSSQAError, match="no prediction samples"):
        SegDataModule(train=arrays).predict_dataloader()


# ------------------------------------------------------------------- every bad input, every layout
LAYOUTS = {
    # layout: (writer, a mask file of the fake data, palette masks?, options)
    "vaihingen": (lambda r: write_isprs(r, "vaihingen"), "gts_for_participants/*.tif", True, {}),
    "potsdam": (lambda r: write_isprs(r, "potsdam"), "5_Labels_all/*_label.tif", True, {}),
    "loveda": (write_loveda, "Train/Urban/masks_png/*.png", False, {}),
    "deepglobe": (lambda r: write_deepglobe(r, stray=False), "train/*_mask.png", True, {}),
    "uavid": (write_uavid, "uavid_train/seq1/Labels/*.png", True, {}),
    "openearthmap": (write_openearthmap, "aachen/labels/*.tif", False, {}),
    "folder": (lambda r: write_folder(r, "index", sizes=((32, 32), (32, 32))), "lbls/*.png", False,
               dict(FOLDER_OPTS, num_classes=3)),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("fault", ["missing", "size", "unknown"])
def test_every_layout_reports_each_bad_mask(tmp_path, layout, fault):
    writer, pattern, palette, opts = LAYOUTS[layout]
    writer(tmp_path)
    mask = sorted(tmp_path.glob(pattern))[0]
    arr = np.asarray(Image.open(mask)).copy()
    if fault == "missing":
        mask.unlink()
        expected = r": no mask"
    elif fault == "size":
        _save(mask, arr[: arr.shape[0] // 2])
        expected = rf"but its mask .*{mask.name} is"
    else:
        arr[1, 1] = (200, 10, 10) if palette else 200  # also outside DeepGlobe's palette once binarised
        _save(mask, arr)
        expected = rf"{mask.name}: .*(outside the palette|not among the)"
    with pytest.raises(RSSQAError, match=expected):
        build_source(layout, tmp_path, **opts).check()
    skipping = build_source(layout, tmp_path, on_bad="skip", **opts)
    good = skipping.check()
    # header faults drop the file when the source is built, pixel faults when it is checked
    assert len(skipping.bad) == 1 and len(good) == len(skipping) - (fault == "unknown")
