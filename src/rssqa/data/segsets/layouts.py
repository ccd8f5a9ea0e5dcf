"""Segmentation sets in the folder layouts they are distributed in, and a registry of them.

Each layout is a function ``(root, **options) -> SegSource`` registered under a name;
:func:`build_source` looks the name up, :func:`list_layouts` lists them. Every layout accepts the
options of :class:`~rssqa.data.segsets.source.SegSource` (``patch_size``, ``stride``, ``bands``,
``on_bad``, ``max_images``, ``scale`` / ``gsd`` / ``target_gsd``, ``group_pattern``,
``ignore_classes``) and ``unknown`` (``"error"`` or ``"ignore"``, for colours and values
outside the schema); the generic :func:`folder` layout takes a whole mask schema in configuration.

Layouts (ignore index 255 throughout):

- ``potsdam``: ISPRS Potsdam, ``2_Ortho_RGB/top_potsdam_{a}_{b}_RGB.tif`` +
  ``5_Labels_all/top_potsdam_{a}_{b}_label.tif``, six-colour ISPRS palette.
- ``vaihingen``: ISPRS Vaihingen, ``top/top_mosaic_09cm_area{N}.tif`` (IRRG) +
  ``gts_for_participants/top_mosaic_09cm_area{N}.tif``, ISPRS palette.
- ``loveda``: LoveDA, ``{Train,Val}/{Urban,Rural}/{images_png,masks_png}/{id}.png``, values 0 = no data,
  1..7 = classes; an id found in more than one split/domain folder becomes ``{split}-{domain}-{id}``.
- ``deepglobe``: DeepGlobe Land Cover, ``train/{id}_sat.jpg`` + ``train/{id}_mask.png`` (the challenge
  release) or ``data/training_data/{images,masks}/`` (torchgeo, the Kaggle mirror), six colours +
  black = unknown; channels binarised at 128 as the challenge prescribes.
- ``uavid``: UAVid, ``uavid_{train,val}/seq*/Images/*.png`` + ``Labels/*.png``, eight colours; the frames
  of one sequence share a split group.
- ``openearthmap``: OpenEarthMap, ``<region>/images/*.tif`` + ``<region>/labels/*.tif``, values 0 = unknown,
  1..8 = classes, ``train.txt`` / ``val.txt`` name the files of each split.
- ``folder``: any images folder + masks folder, matched by name (:mod:`rssqa.data.segsets.folder`).
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rssqa.data.segsets.masks import IGNORE_INDEX, MaskCodec
from rssqa.data.segsets.source import FilePair, SegSource, as_path, files, require_dir
from rssqa.errors import RSSQAError

Layout = Callable[..., SegSource]
_LAYOUTS: dict[str, Layout] = {}

ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
# The eroded ground truth of the ISPRS sets marks boundaries black: not a class.
ISPRS_IGNORE = ((0, 0, 0),)
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# Every split/domain folder of the release, read or not: ids must not change with the folders read.
LOVEDA_SPLITS = ("Train", "Val", "Test")
LOVEDA_DOMAINS = ("Urban", "Rural")
DEEPGLOBE_CLASSES = ("urban_land", "agriculture_land", "rangeland", "forest_land", "water", "barren_land")
DEEPGLOBE_PALETTE = ((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255))
# torchgeo / Kaggle mirror: split -> folder under ``data/``
DEEPGLOBE_SPLIT_DIRS = {"train": "training_data", "test": "test_data"}
UAVID_CLASSES = ("clutter", "building", "road", "tree", "low_vegetation", "moving_car", "static_car", "human")
UAVID_PALETTE = (
    (0, 0, 0), (128, 0, 0), (128, 64, 128), (0, 128, 0), (128, 128, 0), (64, 0, 128), (192, 0, 192), (64, 64, 0),
)  # fmt: skip
OPENEARTHMAP_CLASSES = (
    "bareland", "rangeland", "developed_space", "road", "tree", "water", "agriculture_land", "building",
)  # fmt: skip


def register_layout(name: str) -> Callable[[Layout], Layout]:
    """Decorator: register a layout function under ``name``."""

    def deco(fn: Layout) -> Layout:
        if name in _LAYOUTS:
            raise ValueError(f"layout {name!r} registered twice")
        _LAYOUTS[name] = fn
        return fn

    return deco


def list_layouts() -> list[str]:
    """Names of the registered layouts."""
    return sorted(_LAYOUTS)


def build_source(layout: str, root: str | os.PathLike, name: str | None = None, **options: Any) -> SegSource:
    """Open a segmentation source.

    Args:
        layout: a registered layout (:func:`list_layouts`).
        root: the data set's root folder.
        name: the source's name in tables and messages (default the layout name).
        **options: the layout's keyword arguments.

    Returns:
        The source, scanned and checked (see :class:`SegSource`).
    """
    if layout not in _LAYOUTS:
        raise RSSQAError(f"layout {layout!r} unknown; choose from {list_layouts()}")
    known = set(inspect.signature(_LAYOUTS[layout]).parameters) | set(inspect.signature(SegSource).parameters)
    unknown = sorted(set(options) - known - {"root", "name", "pairs", "codec", "options"})
    if unknown:
        raise RSSQAError(f"layout {layout!r}: unknown options {unknown}")
    return _LAYOUTS[layout](root, name=name or layout, **options)


def _stems(paths: Sequence[Path], strip: str = "") -> dict[str, Path]:
    out = {}
    for p in paths:
        stem = p.stem
        if strip and stem.endswith(strip):
            stem = stem[: -len(strip)]
        out[stem] = p
    return out


def _pairs(
    images: Mapping[str, Path],
    masks: Mapping[str, Path],
    expected: Callable[[str], Path],
    split: str | None = None,
    group: Callable[[str], str] | None = None,
    id_prefix: str = "",
) -> list[FilePair]:
    return [
        FilePair(
            image_id=f"{id_prefix}{key}",
            image=path,
            mask=masks.get(key),
            group=group(key) if group else "",
            split=split,
            expected_mask=expected(key),
        )
        for key, path in sorted(images.items())
    ]


def _nonempty(pairs: list[FilePair], what: str) -> list[FilePair]:
    if not pairs:
        raise RSSQAError(f"{what}: no images found")
    return pairs


# ------------------------------------------------------------------------------------------- ISPRS
@register_layout("potsdam")
def potsdam(
    root: str | os.PathLike,
    name: str = "potsdam",
    image_dir: str = "2_Ortho_RGB",
    mask_dir: str = "5_Labels_all",
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """ISPRS Potsdam: ``2_Ortho_RGB/top_potsdam_{a}_{b}_RGB.tif`` and ``5_Labels_all/..._label.tif``.

    Args:
        root: the data set folder.
        name: the source's name.
        image_dir: image folder (``4_Ortho_RGBIR`` with ``bands`` works too).
        mask_dir: label folder (``5_Labels_all_noBoundary`` for the eroded labels).
        unknown: colours outside the ISPRS palette: ``"error"`` or ``"ignore"``.
        **options: :class:`SegSource` options (``patch_size`` for the 6000 px tiles, ...).
    """
    root = as_path(root)
    img_dir, lbl_dir = require_dir(root / image_dir, "image"), root / mask_dir
    suffix = "_RGBIR" if "RGBIR" in image_dir else "_RGB"
    images = _stems(files(img_dir, f"top_potsdam_*{suffix}.tif"), suffix)
    masks = _stems(files(lbl_dir, "top_potsdam_*_label.tif"), "_label") if lbl_dir.is_dir() else {}
    pairs = _pairs(images, masks, lambda k: lbl_dir / f"{k}_label.tif")
    codec = MaskCodec(ISPRS_CLASSES, ISPRS_PALETTE, ISPRS_IGNORE, unknown=unknown)
    return SegSource(name, _nonempty(pairs, str(img_dir)), codec, **options)


@register_layout("vaihingen")
def vaihingen(
    root: str | os.PathLike,
    name: str = "vaihingen",
    image_dir: str = "top",
    mask_dir: str = "gts_for_participants",
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """ISPRS Vaihingen: ``top/top_mosaic_09cm_area{N}.tif`` (IRRG) and ``gts_for_participants/`` (same names).

    Args:
        root: the data set folder.
        name: the source's name.
        image_dir: image folder.
        mask_dir: label folder (e.g. the eroded ``gts_eroded_for_participants``).
        unknown: colours outside the ISPRS palette: ``"error"`` or ``"ignore"``.
        **options: :class:`SegSource` options.
    """
    root = as_path(root)
    img_dir, lbl_dir = require_dir(root / image_dir, "image"), root / mask_dir
    images = _stems(files(img_dir, "top_mosaic_09cm_area*.tif"))
    masks = _stems(files(lbl_dir, "top_mosaic_09cm_area*.tif")) if lbl_dir.is_dir() else {}
    pairs = _pairs(images, masks, lambda k: lbl_dir / f"{k}.tif")
    codec = MaskCodec(ISPRS_CLASSES, ISPRS_PALETTE, ISPRS_IGNORE, unknown=unknown)
    return SegSource(name, _nonempty(pairs, str(img_dir)), codec, **options)


# ------------------------------------------------------------------------------------------ LoveDA
@register_layout("loveda")
def loveda(
    root: str | os.PathLike,
    name: str = "loveda",
    splits: Sequence[str] = ("Train", "Val"),
    domains: Sequence[str] = ("Urban", "Rural"),
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """LoveDA: ``{split}/{domain}/images_png/{id}.png`` and ``masks_png/{id}.png``.

    Mask values: 0 = no data (ignored), 1..7 = background, building, road, water, barren, forest,
    agriculture (decoded to 0..6).

    Image ids: the file stem (``"1366"``) when no other split/domain folder under ``root`` holds the
    same stem (so in the release, whose stems are unique, ids are the plain stems); a stem found in
    more than one folder (torchgeo's fake data has ``01.png`` in each) becomes
    ``{split}-{domain}-{stem}``, lower case (``"train-urban-01"``), in every folder it is in. Every
    ``{Train,Val,Test}/{Urban,Rural}/images_png`` folder that exists (and those of ``splits`` and
    ``domains``) counts, read or not, so an image keeps its id whichever splits and domains are read.

    Args:
        root: the data set folder.
        name: the source's name.
        splits: split folders to read (the test split has no masks).
        domains: domain folders to read.
        unknown: values above 7: ``"error"`` or ``"ignore"``.
        **options: :class:`SegSource` options.
    """
    root = as_path(root)
    clashes = _loveda_clashes(root, splits, domains)
    pairs: list[FilePair] = []
    for split in splits:
        for domain in domains:
            base = require_dir(root / split / domain, "LoveDA split/domain")
            img_dir, lbl_dir = require_dir(base / "images_png", "image"), base / "masks_png"
            images = _stems(files(img_dir, "*.png"))
            masks = _stems(files(lbl_dir, "*.png")) if lbl_dir.is_dir() else {}
            plain = {k: p for k, p in images.items() if k not in clashes}
            clashing = {k: p for k, p in images.items() if k in clashes}
            for chosen, prefix in ((plain, ""), (clashing, f"{split.lower()}-{domain.lower()}-")):
                pairs += _pairs(
                    chosen, masks, lambda k, d=lbl_dir: d / f"{k}.png", split=split.lower(), id_prefix=prefix
                )
    value_map = {0: IGNORE_INDEX, **{v: v - 1 for v in range(1, len(LOVEDA_CLASSES) + 1)}}
    codec = MaskCodec(LOVEDA_CLASSES, value_map=value_map, unknown=unknown)
    return SegSource(name, _nonempty(pairs, str(root)), codec, **options)


def _loveda_clashes(root: Path, splits: Sequence[str], domains: Sequence[str]) -> set[str]:
    """Image stems found in more than one ``{split}/{domain}/images_png`` folder under ``root``."""
    counts: Counter[str] = Counter()
    seen: set[tuple[int, int]] = set()
    for split in dict.fromkeys((*LOVEDA_SPLITS, *splits)):
        for domain in dict.fromkeys((*LOVEDA_DOMAINS, *domains)):
            img_dir = root / split / domain / "images_png"
            if not img_dir.is_dir():
                continue
            st = img_dir.stat()  # "train" and "Train" are one folder on a case-insensitive disk
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            counts.update(_stems(files(img_dir, "*.png")).keys())
    return {stem for stem, n in counts.items() if n > 1}


# --------------------------------------------------------------------------------------- DeepGlobe
@register_layout("deepglobe")
def deepglobe(
    root: str | os.PathLike,
    name: str = "deepglobe",
    split: str = "train",
    binarize: bool = True,
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """DeepGlobe Land Cover: ``{id}_sat.jpg`` images and ``{id}_mask.png`` masks, in either layout.

    - the challenge release: ``{split}/{id}_sat.jpg`` and ``{split}/{id}_mask.png`` in one folder;
    - torchgeo and the Kaggle mirror: ``data/{training_data,test_data}/images/{id}_sat.jpg`` and
      ``.../masks/{id}_mask.png``, where ``split`` ``"train"`` is ``training_data`` and ``"test"`` is
      ``test_data``; ``root`` may be the folder holding ``data/``, ``data/`` itself, or the split
      folder (holding ``images/`` and ``masks/``) itself.

    The first of ``{split}/``, ``data/{folder}/images/``, ``{folder}/images/``, ``images/`` and
    ``root`` itself that holds ``*_sat.jpg`` files is read. Image ids are the file names without
    ``_sat.jpg`` in both layouts.

    Args:
        root: the data set folder.
        name: the source's name.
        split: the split to read: its folder in the release (only ``train`` has masks there), or
            ``train`` / ``test`` (or the folder name) in the torchgeo layout.
        binarize: threshold mask channels at 128 first (the released masks carry stray values).
        unknown: colours outside the palette: ``"error"`` or ``"ignore"``. Black is "unknown" and
            always ignored.
        **options: :class:`SegSource` options.
    """
    img_dir, lbl_dir = _deepglobe_folders(as_path(root), split)
    images = _stems(files(img_dir, "*_sat.jpg"), "_sat")
    masks = _stems(files(lbl_dir, "*_mask.png"), "_mask") if lbl_dir.is_dir() else {}
    pairs = _pairs(images, masks, lambda k: lbl_dir / f"{k}_mask.png")
    codec = MaskCodec(DEEPGLOBE_CLASSES, DEEPGLOBE_PALETTE, ((0, 0, 0),), unknown=unknown, binarize=binarize)
    return SegSource(name, _nonempty(pairs, str(img_dir)), codec, **options)


def _deepglobe_folders(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, mask folder) of a DeepGlobe split, in the first layout found under ``root``."""
    sub = DEEPGLOBE_SPLIT_DIRS.get(split, split)
    candidates = [
        (root / split, root / split),
        (root / "data" / sub / "images", root / "data" / sub / "masks"),
        (root / sub / "images", root / sub / "masks"),
        (root / "images", root / "masks"),
        (root, root),
    ]
    existing = [(i, m) for i, m in candidates if i.is_dir()]
    for img_dir, lbl_dir in existing:
        if files(img_dir, "*_sat.jpg"):
            return img_dir, lbl_dir
    if not root.is_dir():
        raise RSSQAError(f"{root}: DeepGlobe folder not found")
    # nothing holds images: name the folder the user most likely meant (root itself comes last)
    if len(existing) > 1:
        return existing[0]
    raise RSSQAError(
        f"{root}: no DeepGlobe split folder; expected {split}/*_sat.jpg or data/{sub}/images/*_sat.jpg"
    )


# ------------------------------------------------------------------------------------------- UAVid
@register_layout("uavid")
def uavid(
    root: str | os.PathLike,
    name: str = "uavid",
    splits: Sequence[str] = ("train", "val"),
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """UAVid: ``uavid_{split}/seq*/Images/*.png`` and ``uavid_{split}/seq*/Labels/*.png``, eight colours.

    Frame ids repeat across sequences, so an image id is ``<seq>_<frame>``; the frames of one sequence
    are nearly the same scene, so they share one split group.

    Args:
        root: the data set folder.
        name: the source's name.
        splits: which ``uavid_<split>`` folders to read (the test split has no labels).
        unknown: colours outside the palette: ``"error"`` or ``"ignore"``.
        **options: :class:`SegSource` options (``patch_size``: frames are 4K).
    """
    root = as_path(root)
    pairs: list[FilePair] = []
    for split in splits:
        split_dir = require_dir(root / f"uavid_{split}", "UAVid split")
        for seq in sorted(p for p in split_dir.glob("seq*") if p.is_dir()):
            img_dir, lbl_dir = require_dir(seq / "Images", "image"), seq / "Labels"
            images = _stems(files(img_dir, "*.png"))
            masks = _stems(files(lbl_dir, "*.png")) if lbl_dir.is_dir() else {}
            pairs += _pairs(
                images,
                masks,
                lambda k, d=lbl_dir: d / f"{k}.png",
                split=split,
                group=lambda _k, s=seq.name: s,
                id_prefix=f"{seq.name}_",
            )
    codec = MaskCodec(UAVID_CLASSES, UAVID_PALETTE, unknown=unknown)
    return SegSource(name, _nonempty(pairs, str(root)), codec, **options)


# ------------------------------------------------------------------------------------ OpenEarthMap
@register_layout("openearthmap")
def openearthmap(
    root: str | os.PathLike,
    name: str = "openearthmap",
    split_files: Sequence[str] = ("train.txt", "val.txt"),
    unknown: str = "error",
    **options: Any,
) -> SegSource:
    """OpenEarthMap: ``<region>/images/<file>.tif`` and ``<region>/labels/<file>.tif`` class-index masks.

    Values 0 = unknown (ignored), 1..8 = bareland, rangeland, developed space, road, tree, water,
    agriculture land, building (decoded to 0..7). The split lists (one file name per line) choose the
    images; a list that is missing is an error, an empty ``split_files`` reads every region.

    Args:
        root: the data set folder (the one holding the region folders and the lists).
        name: the source's name.
        split_files: list files, relative to ``root``; the split name is the file's stem.
        unknown: values above 8: ``"error"`` or ``"ignore"``.
        **options: :class:`SegSource` options (``patch_size``: tiles are about 1000 px).
    """
    root = require_dir(as_path(root), "OpenEarthMap")
    all_images = {p.name: p for p in files(root, "*/images/*.tif")}
    chosen: dict[str, str | None] = {}
    if split_files:
        for list_file in split_files:
            path = root / list_file
            if not path.is_file():
                raise RSSQAError(f"{path}: split list not found")
            for line in path.read_text().splitlines():
                fname = line.strip()
                if not fname:
                    continue
                fname = fname if fname.endswith(".tif") else f"{fname}.tif"
                if fname not in all_images:
                    raise RSSQAError(f"{path}: lists {fname} but no <region>/images/{fname} exists")
                chosen[fname] = Path(list_file).stem
    else:
        chosen = dict.fromkeys(all_images)
    pairs = []
    for fname, split in sorted(chosen.items()):
        image = all_images[fname]
        mask = image.parent.parent / "labels" / fname
        pairs.append(
            FilePair(image.stem, image, mask if mask.is_file() else None, split=split, expected_mask=mask)
        )
    value_map = {0: IGNORE_INDEX, **{v: v - 1 for v in range(1, len(OPENEARTHMAP_CLASSES) + 1)}}
    codec = MaskCodec(OPENEARTHMAP_CLASSES, value_map=value_map, unknown=unknown)
    return SegSource(name, _nonempty(pairs, str(root)), codec, **options)
