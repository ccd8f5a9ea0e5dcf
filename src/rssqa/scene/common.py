"""What the parts of :mod:`rssqa.scene` share: the layers, their nodata and types, colours, raster I/O."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError

LAYERS = ("quality", "best_method", "fused", "error")
NODATA = {"quality": -1.0, "best_method": 255, "fused": 255, "error": -1.0}
DTYPES = {"quality": "float32", "best_method": "uint8", "fused": "uint8", "error": "float32"}
WORK = ".scene-work"
STATE = "state.json"
EVAL_PIXELS = 64  # pixels per window sampled for the error map's AUROC (with a truth raster)
GDAL_CACHE_MB = 128  # bounds GDAL's block cache (its default is a share of the machine's memory)
METHOD_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


CLASS_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip  (classes without a palette)


def trained_tile(config: dict[str, Any], source: str | None) -> int | None:
    """The window side a scorer reads for ``source``: the shorter side of the size its methods were
    trained on (``scorer.json``'s ``image_sizes`` of the source, else its ``image_size``); ``None``
    when the scorer records neither."""
    size = (config.get("image_sizes") or {}).get(source) or config.get("image_size")
    return int(min(size)) if size else None


def gdal_env():
    """The GDAL settings a scene is read and written under: a block cache of :data:`GDAL_CACHE_MB`.

    ``rasterio.Env`` hands ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, in bytes (GDAL's own variable
    reads small numbers as megabytes): 128 there was a 128-byte cache, each tile decompressed again for
    every read (a scene read at a quarter of its size in 13 s instead of 0.05 s).
    """
    return _rasterio().Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 1024 * 1024)


def _rasterio():
    try:
        import rasterio
    except ImportError:  # pragma: no cover - a dependency of the package
        raise RSSQAError("scene: rasterio is not installed (pip install rasterio)") from None
    return rasterio


def _open(path: Path, what: str):
    rasterio = _rasterio()
    if not path.is_file():
        raise RSSQAError(f"{path}: {what} not found")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise RSSQAError(f"{path}: not a readable raster ({str(e).splitlines()[0][:160]})") from None


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


class Resampled:
    """An open raster read at ``factor`` times its resolution (``0.25``: a quarter of each side), with what
    the scene job reads of a raster: ``height``/``width`` (:func:`~rssqa.data.segsets.source.resampled_size`, as
    the sources resample on read), ``count``, ``dtypes``, ``crs``, a ``transform`` scaled to the new pixels,
    ``profile``, and ``read`` / ``dataset_mask`` of a window in the new pixels: the matching (fractional)
    window of the file, read with rasterio's ``out_shape``, bilinear for images (GDAL widens the kernel
    when it shrinks, as Pillow does), nearest for class rasters (``categorical``) and the data mask.
    """

    def __init__(self, dataset: Any, factor: float, categorical: bool = False):
        from rasterio.enums import Resampling
        from rasterio.transform import Affine

        from rssqa.data.segsets.source import resampled_size

        self.dataset, self.factor = dataset, factor
        self.height, self.width = resampled_size(dataset.height, factor), resampled_size(dataset.width, factor)
        self._sy, self._sx = dataset.height / self.height, dataset.width / self.width  # file pixels per pixel
        self.count, self.dtypes, self.crs = dataset.count, dataset.dtypes, dataset.crs
        self.transform = dataset.transform * Affine.scale(self._sx, self._sy)
        self.profile = {**dataset.profile, "width": self.width, "height": self.height, "transform": self.transform}
        self._resampling = Resampling.nearest if categorical else Resampling.bilinear
        self._nearest = Resampling.nearest

    def _window(self, window: Any) -> Any:
        return _rasterio().windows.Window(
            window.col_off * self._sx, window.row_off * self._sy, window.width * self._sx, window.height * self._sy
        )

    def read(self, indexes: Any, window: Any) -> np.ndarray:
        shape = (int(window.height), int(window.width))
        out_shape = shape if isinstance(indexes, int) else (len(indexes), *shape)
        return self.dataset.read(indexes, window=self._window(window), out_shape=out_shape, resampling=self._resampling)

    def dataset_mask(self, window: Any) -> np.ndarray:
        shape = (int(window.height), int(window.width))
        return self.dataset.dataset_mask(window=self._window(window), out_shape=shape, resampling=self._nearest)

    def close(self) -> None:
        self.dataset.close()
