"""Whole images of one RS-SQED split as scenes: a labelled folder's held-out area scored by ``rssqa scene``.

RS-SQED cuts a source's images into patches; the scene path reads whole images. This writes, for every
image of a split (by default the test split: whole areas when the source groups its splits), the image
as the source reads it (bands chosen, resampled by the source's ``scale`` / ``target_gsd``) to a
GeoTIFF and its decoded classes (255: unlabelled) to a truth raster on the same grid, with a scene index
that :func:`rssqa.scene.score_scene_index` reads. A source GeoTIFF's CRS and transform are kept
(rescaled when resampled); other images get none, which ``rssqa scene`` says once per scene.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.data.segsets import build_source
from rssqa.data.sqed import TABLE, read_table
from rssqa.errors import RSSQAError
from rssqa.runs import atomic_write_json, read_summary
from rssqa.scene.common import _rasterio


def _georef(path: Path, height: int, width: int) -> dict[str, Any]:
    """The CRS and transform of ``path`` on a ``height×width`` grid, where it has them."""
    rasterio = _rasterio()
    try:
        with warnings.catch_warnings(), rasterio.open(path) as src:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            if src.crs is None or src.transform.is_identity:
                return {}
            scale = rasterio.Affine.scale(src.width / width, src.height / height)
            return {"crs": src.crs, "transform": src.transform @ scale}
    except rasterio.errors.RasterioIOError:
        return {}


def export_split_scenes(
    sqed: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike, split: str = "test", min_side: int = 1
) -> tuple[Path, dict[str, Any]]:
    """Write the whole images of ``split`` of every source of the RS-SQED folder ``sqed`` as scenes.

    Args:
        sqed: an RS-SQED folder (its summary's config names the sources; its table the split groups).
        data_root: the base of relative source roots, as given to the sqed stage.
        out: where the scenes go: ``out/<source>/<image>.tif``, ``..._truth.tif`` and ``out/scenes.json``.
        split: which split's images (their split groups as RS-SQED assigned them).
        min_side: images with a side shorter than this (a scorer's window) are left out and counted.

    Returns:
        ``(the index path, {"scenes": n, "skipped": [reasons]})``.
    """
    rasterio = _rasterio()
    sqed, out = Path(sqed), Path(out)
    sources = (read_summary(sqed).get("config") or {}).get("sources") or []
    groups: dict[str, set[str]] = {}
    for r in read_table(sqed / TABLE):
        if r["split"] == split:
            groups.setdefault(r["source"], set()).add(r["group"])
    if not groups:
        raise RSSQAError(f"{sqed}: no {split} images in {TABLE}")
    entries, skipped = [], []
    for sc in sources:
        name = sc["name"]
        if name not in groups:
            continue
        root = Path(sc["root"])
        root = root if root.is_absolute() else Path(data_root) / root
        source = build_source(sc.get("layout") or name, root, name=name, **{**sc.get("options", {}), "on_bad": "skip"})
        palette = [list(c) for c in source.codec.palette] if source.codec.palette else None
        pairs = {s.pair.image: s.pair for s in source.samples if s.group in groups[name]}
        for pair in sorted(pairs.values(), key=lambda p: p.image_id):
            try:
                image, mask = source.read_file(pair)
            except RSSQAError as e:
                skipped.append(str(e))
                continue
            if min(mask.shape) < min_side:
                skipped.append(f"{pair.image}: {mask.shape[1]}x{mask.shape[0]} as read, smaller than a {min_side} px window")
                continue
            sid = pair.image_id.replace("/", "_")
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            h, w = mask.shape
            geo = _georef(pair.image, h, w)
            for path, data, extra in ((folder / f"{sid}.tif", image.transpose(2, 0, 1), {}),
                                      (folder / f"{sid}_truth.tif", mask[None], {"nodata": 255})):  # fmt: skip
                tmp = path.with_suffix(".tmp.tif")
                with warnings.catch_warnings():  # no georeferencing is said once per scene, by rssqa scene
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    with rasterio.open(tmp, "w", driver="GTiff", width=w, height=h, count=len(data), dtype="uint8",
                                       compress="deflate", **geo, **extra) as d:  # fmt: skip
                        d.write(np.ascontiguousarray(data))
                os.replace(tmp, path)
            rel = folder.relative_to(out.parent)
            entries.append({"source": name, "id": sid, "image": f"{rel}/{sid}.tif", "truth": f"{rel}/{sid}_truth.tif",
                            "size": [h, w], "classes": list(source.classes), "palette": palette})  # fmt: skip
    if not entries:
        raise RSSQAError(f"{sqed}: no {split} image could be written as a scene ({len(skipped)} skipped)")
    index = atomic_write_json(out / "scenes.json", {"split": split, "scenes": entries, "skipped": skipped})
    return index, {"scenes": len(entries), "skipped": skipped}
