"""Reading image and mask files: PNG, JPEG and the like through Pillow; (Geo)TIFF, JPEG 2000, VRT and
ERDAS Imagine files through rasterio.

Aerial and satellite imagery often comes as GeoTIFF or JPEG 2000 with more than three bands or more than
eight bits per band (uint16 reflectance, float). Such files are read with rasterio (GDAL), which decodes
what Pillow cannot (multi-band 16-bit, tiled and compressed GeoTIFFs, Sentinel-2's JPEG 2000 bands); the
bands the methods read are chosen with ``bands`` and their values mapped to 0-255 with ``rescale``
(``(low, high)``, linear, clipped), the same mapping ``rssqa scene --rescale`` applies to a scene. Every
problem is a one-line :class:`~rssqa.errors.RSSQAError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from rssqa.errors import RSSQAError

# Real orthophotos are large (ISPRS Potsdam: 6000 x 6000 px); Pillow's bomb guard would refuse them.
Image.MAX_IMAGE_PIXELS = None

# the files read with rasterio: (Geo)TIFF, JPEG 2000, GDAL's virtual rasters, ERDAS Imagine
GDAL_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")


def is_gdal(path: Path) -> bool:
    """Whether ``path`` is read with rasterio (its ending one of :data:`GDAL_SUFFIXES`)."""
    return path.suffix.lower() in GDAL_SUFFIXES


def to_8bit(pixels: np.ndarray, rescale: Sequence[float] | None) -> np.ndarray:
    """Pixels as the methods read them: ``rescale`` ``(low, high)`` mapped linearly to 0-255 (clipped,
    rounded), or the pixels as they are (``None``)."""
    if rescale is None:
        return pixels
    lo, hi = rescale
    return np.clip((pixels.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def check_rescale(rescale: Sequence[float] | str | None, where: str) -> tuple[float, float] | str | None:
    """``rescale`` as ``(low, high)`` floats (or ``"auto"``), or a one-line error naming ``where``."""
    if rescale is None or rescale == "auto":
        return rescale
    try:
        lo, hi = (float(v) for v in rescale)
    except (TypeError, ValueError):
        raise RSSQAError(f"{where}: rescale {rescale!r} is not two numbers [low, high]") from None
    if not hi > lo:
        raise RSSQAError(f"{where}: rescale {[lo, hi]}: high must be above low")
    return lo, hi


def check_bands(path: Path | str, bands: Sequence[int] | None, count: int) -> None:
    """A one-line error naming ``path`` unless ``bands`` (0-based; ``None``: the file's own) picks three of its
    ``count`` bands."""
    if bands is None:
        if count != 3:
            raise RSSQAError(f"{path}: {count} bands; expected 3 (choose three: a source's bands option, --bands R,G,B)")
    elif len(bands) != 3 or not all(0 <= b < count for b in bands):
        raise RSSQAError(f"{path}: bands {list(bands)} (counted from 0) do not pick three of its {count} bands")


def _open_raster(path: Path, what: str):
    import rasterio

    if not path.is_file():
        raise RSSQAError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():  # a plain raster without georeferencing is fine here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise RSSQAError(f"{path}: unreadable {what} ({str(e).splitlines()[0][:160]})") from None


def _read_raster(
    path: Path, what: str, bands: Sequence[int] | None = None, valid: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The bands of a raster as ``H×W×B`` (``bands``, 0-based: only those are decoded, a 13-band stack costs three;
    default all), its colour table as a ``256×3`` array where it has one band and a table, and with ``valid``, where
    it has data (``H×W`` bool) if it has a nodata value, a mask or an alpha band (else ``None``: all valid)."""
    import rasterio
    from rasterio.enums import MaskFlags

    with _open_raster(path, what) as src:
        if bands is not None:
            check_bands(path, bands, src.count)
        try:
            arr = src.read(None if bands is None else [int(b) + 1 for b in bands])
        except rasterio.errors.RasterioIOError as e:
            raise RSSQAError(f"{path}: unreadable {what} ({str(e).splitlines()[0][:160]})") from None
        colours = None
        if src.count == 1:
            try:
                table = src.colormap(1)
            except ValueError:  # no colour table
                table = None
            if table:
                colours = np.zeros((256, 3), np.uint8)
                for k, rgba in table.items():
                    if 0 <= k < 256:
                        colours[k] = rgba[:3]
        has_data = None
        if valid and not all(flags == [MaskFlags.all_valid] for flags in src.mask_flag_enums):
            has_data = src.dataset_mask() > 0
    return arr.transpose(1, 2, 0), colours, has_data


def ground_sample_distance(path: Path) -> float | None:
    """A raster's ground sample distance in metres per pixel (the mean of its pixel's width and height), where
    its CRS is projected in metres; else ``None`` (no CRS, degrees, feet, not a raster GDAL reads)."""
    try:
        with _open_raster(path, "raster") as d:
            crs, t = d.crs, d.transform
    except RSSQAError:
        return None  # said by whoever reads the pixels
    if crs is None or not crs.is_projected or (crs.linear_units or "").lower() not in ("metre", "meter", "m"):
        return None
    return (abs(t.a) + abs(t.e)) / 2 if not t.is_identity else None


# Pillow modes of one band wider than 8 bits, and their numpy types
_WIDE_MODES = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}


def header(path: Path, what: str) -> tuple[int, int, int, str]:
    """``(height, width, bands, pixel type)`` from the file header, without decoding the pixels (the type
    of the first band, as numpy names it: ``uint8``, ``uint16``, ...)."""
    if is_gdal(path):
        with _open_raster(path, what) as src:
            return src.height, src.width, src.count, src.dtypes[0]
    try:
        with Image.open(path) as im:
            return im.height, im.width, len(im.getbands()), _WIDE_MODES.get(im.mode, "uint8")
    except FileNotFoundError:
        raise RSSQAError(f"{path}: {what} not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RSSQAError(f"{path}: unreadable {what} ({e})") from None


def read_image(path: Path, bands: Sequence[int] | None = None, rescale: Sequence[float] | None = None) -> np.ndarray:
    """Read an image as ``H×W×3`` uint8.

    Args:
        path: image file (PNG, JPEG, ...; a TIFF or JPEG 2000 through rasterio, any number of bands and pixel type).
        bands: which three bands to keep from a multi-band file (0-based), e.g. ``[0, 1, 2]`` of RGBIR.
        rescale: ``(low, high)``: map the values linearly to 0-255 (clipped), for pixels that are not 8-bit
            (uint16 reflectance, float); ``None``: the file must hold 8-bit pixels.
    """
    return as_8bit(read_bands(path, bands), rescale, path)


def as_8bit(arr: np.ndarray, rescale: Sequence[float] | None, path: Path | str) -> np.ndarray:
    """Bands as read (:func:`read_bands`) as the methods read them: ``rescale`` applied, or 8-bit pixels as they
    are; other pixels without a range are a one-line error naming ``path``."""
    if rescale is not None:
        arr = to_8bit(arr, rescale)
    elif arr.dtype != np.uint8:
        raise RSSQAError(
            f"{path}: {arr.dtype} pixels; expected 8-bit images (map them to 0-255: a source's rescale option, --rescale LOW,HIGH)"
        )
    return np.ascontiguousarray(arr)


def auto_range(paths: Sequence[Path], bands: Sequence[int] | None = None, files: int = 16) -> tuple[float, float]:
    """A value range for ``rescale`` measured on the images themselves: the 1st and 99th percentiles of the
    chosen bands' values (all bands together, every 4th pixel of each side) over up to ``files`` of ``paths``,
    evenly spaced in their order. The same files give the same range."""
    if not paths:
        raise RSSQAError("rescale auto: no images to measure a value range on")
    n = min(files, len(paths))
    picks = sorted({round(i * (len(paths) - 1) / max(n - 1, 1)) for i in range(n)})
    values = np.concatenate([read_bands(paths[i], bands)[::4, ::4].reshape(-1).astype(np.float64) for i in picks])
    values = values[np.isfinite(values)]
    lo, hi = (float(v) for v in np.percentile(values, [1, 99])) if values.size else (0.0, 0.0)
    if not hi > lo:
        raise RSSQAError(f"rescale auto: the images' values are flat ({lo:g} to {hi:g} in {len(picks)} files); give rescale: [low, high]")
    return lo, hi


def read_bands(path: Path, bands: Sequence[int] | None = None) -> np.ndarray:
    """The three bands of an image ``H×W×3`` as stored (any pixel type): ``bands`` (0-based) of a multi-band file,
    else the file's three bands."""
    return read_bands_valid(path, bands, valid=False)[0]


def read_bands_valid(path: Path, bands: Sequence[int] | None = None, valid: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_bands`, and where the image has data, ``H×W`` bool, for a raster read through rasterio with a
    nodata value, a mask or an alpha band (a mosaic's empty border), from the same reading; ``None`` for every
    other file (all pixels valid) or without ``valid``."""
    has_data = None
    if is_gdal(path):
        arr, _, has_data = _read_raster(path, "image", bands, valid)
        bands = None  # chosen as read
    else:
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    raise RSSQAError(f"{path}: palette-mode image; expected an RGB (or multi-band) image")
                arr = np.asarray(im)
        except FileNotFoundError:
            raise RSSQAError(f"{path}: image not found") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise RSSQAError(f"{path}: unreadable image ({e})") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    check_bands(path, bands, arr.shape[2])
    return (arr if bands is None else arr[..., list(bands)]), has_data


def read_mask_pixels(path: Path, palette: bool) -> np.ndarray:
    """A mask file's stored values: ``H×W`` indices or ``H×W×3`` colours (``palette``: a colour table of a
    single-band file is applied, so a palette-mode file reads as its colours)."""
    if is_gdal(path):
        arr, colours, _ = _read_raster(path, "mask")
        if arr.shape[2] == 1:
            arr = arr[..., 0]
            if palette and colours is not None and arr.dtype == np.uint8:
                arr = colours[arr]
        elif arr.shape[2] == 4:
            arr = arr[..., :3]
        elif arr.shape[2] == 2:  # grey and alpha
            arr = arr[..., 0]
        return arr
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and palette:
                im = im.convert("RGB")
            elif im.mode in ("RGBA", "LA"):
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            return np.asarray(im)
    except FileNotFoundError:
        raise RSSQAError(f"{path}: mask not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RSSQAError(f"{path}: unreadable mask ({e})") from None
