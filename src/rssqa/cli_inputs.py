"""How the ``rssqa`` commands read a user's images: files and folders, bands, value ranges, resampling, and
bad images skipped and counted (:class:`Inputs`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rssqa.errors import RSSQAError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".jp2", ".bmp", ".webp")
# images read per step: a multiple of any sensible chunk, so folders run in full chunks
BLOCK = 64


def collect_images(paths: Sequence[str]) -> tuple[list[Path], bool]:
    """Expand files and folders (recursively, sorted) into image files.

    Returns:
        ``(files, any_folder)``.
    """
    files: list[Path] = []
    folder = False
    for p in map(Path, paths):
        if p.is_dir():
            folder = True
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RSSQAError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise RSSQAError(f"{p}: no such file or folder")
    if not files:
        raise RSSQAError("no images given")
    return files, folder


class Inputs:
    """The images of a command, read block by block; with ``on_bad="skip"`` a bad one is skipped and said.

    Args:
        scorer: checks each image (:meth:`~rssqa.scorer.Scorer.check_image`: three 8-bit bands, large enough).
        on_bad: ``skip`` (one ``skipped:`` line on stderr each, counted) or ``error`` (the first one stops the command).
        total: how many images there are (a single image that is bad is an error either way).
        scale: resample each image by this factor when read (:func:`rssqa.data.segsets.resample_by`; 1: as it is).
        bands: the three bands to read, 0-based (``None``: a three-band file as it is).
        rescale: ``(low, high)`` mapped linearly to 0-255 (``None``: 8-bit pixels as they are).
        trained_gsd: the ground sample distance (metres) the scorer's methods were trained at: a GeoTIFF in a
            CRS in metres is resampled by its own pixel size over it instead of by ``scale`` (``None``: never).
        plain_8bit: ``rescale`` is meant for pixels of more than 8 bits (the scorer's record): an 8-bit image is
            read as it is (said once).
    """

    def __init__(
        self, scorer: Any, on_bad: str = "skip", total: int = 0, scale: float = 1.0,
        bands: list[int] | None = None, rescale: tuple[float, float] | None = None, plain_8bit: bool = False,
        trained_gsd: float | None = None,
    ):  # fmt: skip
        self.scorer, self.on_bad, self.scale = scorer, "error" if total == 1 else on_bad, scale
        self.bands, self.rescale, self.plain_8bit, self.trained_gsd = bands, rescale, plain_8bit, trained_gsd
        self.seen = 0
        self.skipped: list[str] = []
        self._said: set[float] = set()  # the pixel sizes said
        self._said_plain = False

    def factor(self, path: Path) -> float:
        """The resampling factor of one file: its ground sample distance over the trained one for a GeoTIFF in
        metres (said once per distance), else ``scale``."""
        from rssqa.data.segsets.rasters import ground_sample_distance, is_gdal

        gsd = ground_sample_distance(path) if self.trained_gsd and is_gdal(path) else None
        if gsd is None:
            return self.scale
        if gsd not in self._said:
            self._said.add(gsd)
            say(f"rssqa: georeferenced images of {gsd:g} m pixels resampled by {gsd / self.trained_gsd:g} when read, to the "
                 f"{self.trained_gsd:g} m the scorer's methods were trained at (first: {path}; --scale to choose)")  # fmt: skip
        return gsd / self.trained_gsd

    def read(self, block: Sequence[Path]) -> tuple[list[Path], list[Any]]:
        """``(files, images)`` of the usable images of ``block``."""
        from rssqa.data.segsets import resample_by
        from rssqa.data.segsets.rasters import as_8bit, read_bands

        files, images = [], []
        for f in block:
            self.seen += 1
            try:
                image = read_bands(f, self.bands)
                said = None if self._said_plain else f"8-bit images read as they are, {PLAIN_8BIT} (first: {f})"
                rescale = range_for(str(image.dtype), self.rescale, self.plain_8bit, said)
                self._said_plain |= rescale is not self.rescale
                image = as_8bit(image, rescale, f)
                images.append(self.scorer.check_image(resample_by(image, self.factor(f)), str(f)))
                files.append(f)
            except RSSQAError as e:
                if self.on_bad == "error":
                    raise
                self.skipped.append(str(e))
                say(f"skipped: {e}")
        return files, images

    def finish(self) -> int:
        """The exit status: 0, or 1 where images were skipped (said on stderr); no usable image is an error."""
        if self.skipped and len(self.skipped) == self.seen:
            raise RSSQAError(f"none of the {self.seen} images is usable (each is listed above)")
        if self.skipped:
            print(f"{len(self.skipped)} of {self.seen} images skipped (listed above); the others are scored", file=sys.stderr)
            return 1
        return 0


def inputs_for(scorer: Any, args: argparse.Namespace, total: int) -> Inputs:
    """The images of ``rssqa score`` / ``recommend``, read as the options and the scorer's record say."""
    trained = None if args.scale is not None else scorer.reading(args.source).get("gsd")
    return Inputs(scorer, args.on_bad, total, read_scale(scorer, args), *read_pixels(scorer, args), trained_gsd=trained)


def read_scale(scorer: Any, args: argparse.Namespace, what: str = "images", gsd: float | None = None) -> float:
    """``--scale``; else, for a scene of ground sample distance ``gsd`` (metres per pixel) and a scorer that
    records the one its methods were trained at, their ratio; else the factor the scorer's source was
    resampled by on read. Said on stderr when not 1."""
    if args.scale is not None:
        if not args.scale > 0:
            raise RSSQAError(f"--scale: must be a positive factor, got {args.scale:g}")
        return args.scale
    reading = scorer.reading(args.source)
    trained = reading.get("gsd") if gsd else None
    if trained:
        scale, why = gsd / trained, f"its {gsd:g} m pixels to the {trained:g} m the scorer's methods were trained at"
    else:
        scale, why = float(reading.get("scale", 1.0)), "as the scorer's source was read for training"
    if scale != 1:
        print(f"rssqa: {what} resampled by {scale:g} when read, {why} (--scale 1: as they are)", file=sys.stderr)
    return scale


def numbers(text: str | None, flag: str, n: int) -> list[float] | None:
    """``n`` comma-separated numbers of ``flag`` (``None`` when not given), or a one-line error."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise RSSQAError(f"{flag} {text!r}: {n} comma-separated numbers expected")
    return values


PLAIN_8BIT = "the scorer's value range is for its other pixel types"


def range_for(dtype: str, rescale: tuple[float, float] | None, plain_8bit: bool, said: str | None) -> tuple[float, float] | None:
    """The value range to read pixels of ``dtype`` with: ``None`` for 8-bit pixels where ``rescale`` is the scorer's
    range for wider ones (``plain_8bit``; ``"rssqa: " + said`` on stderr, unless ``None``), else ``rescale``."""
    if not (plain_8bit and rescale is not None and dtype == "uint8"):
        return rescale
    if said is not None:
        say(f"rssqa: {said}")
    return None


def read_pixels(scorer: Any, args: argparse.Namespace) -> tuple[list[int] | None, tuple[float, float] | None, bool]:
    """``--bands`` (1-based, returned 0-based) and ``--rescale``; where not given, the bands and the value range
    the scorer's source was read with for training (said on stderr); and whether that range is for pixels of more
    than 8 bits only (the source's files were such: an 8-bit file is then read as it is)."""
    bands = numbers(args.bands, "--bands", 3)
    rescale = numbers(args.rescale, "--rescale", 2)
    if bands is not None and (min(bands) < 1 or any(b != int(b) for b in bands)):
        raise RSSQAError(f"--bands {args.bands!r}: whole band numbers, the first band 1")
    if rescale is not None and not rescale[1] > rescale[0]:
        raise RSSQAError(f"--rescale {args.rescale!r}: HIGH must be above LOW")
    reading, said = scorer.reading(args.source), []
    if bands is None and reading.get("bands"):
        bands = [int(b) + 1 for b in reading["bands"]]
        said.append(f"bands {','.join(map(str, bands))}")
    plain_8bit = False
    if rescale is None and reading.get("rescale"):
        rescale = [float(v) for v in reading["rescale"]]
        plain_8bit = "uint8" not in reading.get("pixels", ["uint8"])
        said.append(f"values {rescale[0]:g}..{rescale[1]:g} mapped to 0-255")
    if said:
        print(f"rssqa: {' and '.join(said)}, as the scorer's source was read for training (--bands / --rescale to change)",
              file=sys.stderr)  # fmt: skip
    return ([int(b) - 1 for b in bands] if bands else None), (tuple(rescale) if rescale else None), plain_8bit


def say(message: str) -> None:
    """A line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def blocks(files: list[Path], progress: bool) -> Iterator[list[Path]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(files), BLOCK):
            block = files[start : start + BLOCK]
            yield block
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
