"""The generic ``folder`` layout: any images folder and masks folder, matched by name.

For a user's own labelled data: masks as RGB colours (a palette), class indices or palette-mode PNGs,
the whole mask schema given in configuration. Registered in the layout registry of
:mod:`rssqa.data.segsets.layouts` under ``folder``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rssqa.data.segsets.layouts import _pairs, register_layout
from rssqa.data.segsets.masks import IGNORE_INDEX, MaskCodec
from rssqa.data.segsets.source import SegSource, as_path, files, require_dir
from rssqa.errors import RSSQAError


@register_layout("folder")
def folder(
    root: str | os.PathLike,
    name: str = "folder",
    images: str = "images",
    masks: str = "masks",
    image_glob: str = "*.png",
    mask_glob: str = "*.png",
    image_strip: str = "",
    mask_strip: str = "",
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    ignore_colors: Sequence[Sequence[int]] = (),
    value_map: Mapping[int, int] | None = None,
    ignore_values: Sequence[int] = (IGNORE_INDEX,),
    unknown: str = "error",
    binarize: bool = False,
    **options: Any,
) -> SegSource:
    """Any images folder and masks folder, matched by name.

    An image and a mask match when their paths relative to their folders, without extension and
    without the ``image_strip`` / ``mask_strip`` ending, are equal (``a/b_sat.jpg`` matches
    ``a/b_mask.png`` with strips ``_sat`` and ``_mask``). Masks are RGB colours when a ``palette`` is
    given, class indices otherwise (palette-mode PNGs are read as their indices).

    Args:
        root: base folder for ``images`` and ``masks``.
        name: the source's name.
        images: image folder, relative to ``root`` (or absolute).
        masks: mask folder, relative to ``root`` (or absolute).
        image_glob: image pattern (``**/*.tif`` recurses).
        mask_glob: mask pattern.
        image_strip: ending removed from image names before matching.
        mask_strip: ending removed from mask names before matching.
        classes: class names (default ``class_0``... from ``num_classes`` or the palette).
        num_classes: number of classes, checked against ``classes`` and ``palette``.
        palette: one ``[r, g, b]`` per class: masks are colour masks.
        ignore_colors: colours meaning "no label".
        value_map: stored value -> class index or 255, for index masks (e.g. ``{0: 255, 1: 0, ...}``).
        ignore_values: stored values meaning "no label" (index masks).
        unknown: colours or values outside the schema: ``"error"`` or ``"ignore"``.
        binarize: threshold colour channels at 128 before matching.
        **options: :class:`SegSource` options.
    """
    root = as_path(root)
    img_dir = require_dir(root / images, "image")
    lbl_dir = require_dir(root / masks, "mask")
    classes = _classes(name, classes, num_classes, palette)

    def keyed(folder_: Path, pattern: str, strip: str) -> dict[str, Path]:
        out = {}
        for p in files(folder_, pattern):
            key = p.relative_to(folder_).with_suffix("").as_posix()
            if strip and key.endswith(strip):
                key = key[: -len(strip)]
            if key in out:
                raise RSSQAError(
                    f"{p}: matches the same name as {out[key]}; make the patterns tell them apart"
                )
            out[key] = p
        return out

    image_files = keyed(img_dir, image_glob, image_strip)
    mask_files = keyed(lbl_dir, mask_glob, mask_strip)
    if not image_files:
        raise RSSQAError(f"{img_dir}: no images match {image_glob!r}{_held(img_dir)}")
    if not mask_files:
        raise RSSQAError(f"{lbl_dir}: no masks match {mask_glob!r}{_held(lbl_dir)}")
    pairs = _pairs(image_files, mask_files, lambda k: lbl_dir / f"{k}{mask_strip}{Path(mask_glob).suffix}")
    codec = MaskCodec(
        tuple(classes),
        palette=tuple(tuple(c) for c in palette) if palette is not None else None,
        ignore_colors=tuple(tuple(c) for c in ignore_colors),
        value_map={int(k): int(v) for k, v in (value_map or {}).items()},
        ignore_values=tuple(int(v) for v in ignore_values),
        unknown=unknown,
        binarize=binarize,
    )
    return SegSource(name, pairs, codec, **options)


def _held(folder: Path) -> str:
    """What a folder holds, for the error of a pattern that matched nothing: `` (it holds 72 *.JPG)``, the three
    commonest endings, counted recursively (patterns are case-sensitive; ``**/*.tif`` recurses)."""
    found = Counter(p.suffix or p.name for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not found:
        return " (the folder is empty)"
    return " (it holds " + ", ".join(f"{n} *{suffix}" for suffix, n in found.most_common(3)) + (", ..." if len(found) > 3 else "") + ")"


def _classes(
    name: str, classes: Sequence[str] | None, num_classes: int | None, palette: Sequence[Any] | None
) -> list[str]:
    n = (
        num_classes
        if num_classes is not None
        else len(classes)
        if classes
        else len(palette)
        if palette
        else None
    )
    if n is None:
        raise RSSQAError(f"{name}: give classes, num_classes or a palette")
    if classes is not None and len(classes) != n:
        raise RSSQAError(f"{name}: num_classes is {n} but classes names {len(classes)}")
    if palette is not None and len(palette) != n:
        raise RSSQAError(f"{name}: num_classes is {n} but the palette has {len(palette)} colours")
    return list(classes) if classes is not None else [f"class_{i}" for i in range(n)]
