"""A segmentation source: image/mask pairs on disk, checked, optionally cut into patches.

:class:`SegSource` is a map-style ``torch`` dataset. It is built from a list of (image, mask) file
pairs by a layout (see :mod:`rssqa.data.segsets.layouts`) and checks what it can from file headers
when built (missing masks, unreadable files, image and mask of different sizes, too few channels,
images smaller than a patch); what only the pixels tell (colours outside the palette, class values
the configuration does not know) is checked when a sample is read. Each problem is an
:class:`~rssqa.errors.RSSQAError` naming the file or, with ``on_bad="skip"``, a skipped and counted
:class:`~rssqa.errors.BadSample` (see :meth:`SegSource.check`).

Options every layout accepts (they live here, so a registered layout gets them without code of its
own): ``patch_size`` / ``stride``, ``bands``, ``on_bad``, ``max_images``; resampling on read (``scale``,
or ``target_gsd`` with the source's ``gsd``); split groups from the file name (``group_pattern``); and
schema classes treated as "no label" (``ignore_classes``); values of more than 8 bits mapped to 0-255
(``rescale``). See :class:`SegSource`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from rssqa.data.segsets.masks import IGNORE_INDEX, MaskCodec
from rssqa.data.segsets.rasters import (
    as_8bit,
    auto_range,
    check_rescale,
    header,
    read_bands_valid,
    read_mask_pixels,
)
from rssqa.errors import BadSample, RSSQAError

log = logging.getLogger(__name__)

ON_BAD = ("error", "skip")


@dataclass(frozen=True)
class FilePair:
    """One image file and its mask, as a layout finds them.

    Attributes:
        image_id: identifier, unique within the source.
        image: image file.
        mask: mask file (``None`` when the layout found none: reported as a missing mask).
        group: images that must share a split (e.g. the frames of one video sequence); default the id.
        split: the layout's own split name (``"train"``, ``"val"``), if it has one.
        expected_mask: where the mask was looked for, for the error message.
    """

    image_id: str
    image: Path
    mask: Path | None
    group: str = ""
    split: str | None = None
    expected_mask: Path | None = None


@dataclass(frozen=True)
class SegSample:
    """One sample: a whole image or one patch of it.

    Attributes:
        image_id: unique within the source (``<file id>_<top>_<left>`` for patches).
        pair: the files it is read from.
        window: ``(top, left, height, width)`` in pixels, or ``None`` for the whole image.
    """

    image_id: str
    pair: FilePair
    window: tuple[int, int, int, int] | None

    @property
    def group(self) -> str:
        """Split group: all patches of one file (and of one layout group, or of one ``group_pattern``
        match) share a split."""
        return self.pair.group or self.pair.image_id


def _group_of(pair: FilePair, rx: re.Pattern[str]) -> str:
    """The split group ``group_pattern`` finds in an image's id (a one-line error when it finds none)."""
    m = rx.search(pair.image_id)
    if m is None or not m.group(1):
        raise RSSQAError(
            f"{pair.image}: group_pattern '{rx.pattern}' does not match its id {pair.image_id!r} "
            "(every image needs a split group)"
        )
    return m.group(1)


def patch_windows(height: int, width: int, size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners of ``size×size`` patches covering a ``height×width`` image.

    Patches step by ``stride`` (default ``size``); a last patch flush with the far edge covers any
    remainder, so every pixel is in at least one patch.

    Returns:
        ``[(top, left), ...]`` row-major; empty when the image is smaller than a patch.
    """
    stride = stride or size
    if height < size or width < size:
        return []

    def starts(n: int) -> list[int]:
        s = list(range(0, n - size + 1, stride))
        if s[-1] != n - size:
            s.append(n - size)
        return s

    return [(top, left) for top in starts(height) for left in starts(width)]


def read_mask(path: Path, codec: MaskCodec) -> np.ndarray:
    """Read and decode a mask file to ``H×W`` uint8 class indices (palette PNGs keep their indices)."""
    return codec.decode(read_mask_pixels(path, codec.kind == "palette"), path)


def resampled_size(n: int, factor: float) -> int:
    """A side of ``n`` pixels resampled by ``factor``: the nearest whole pixel (halves up), at least 1."""
    if factor == 1:
        return n
    # the epsilon keeps a factor such as 0.3 / 1.2 (= 0.2499...) from rounding 170.5 down
    return max(1, math.floor(n * factor + 0.5 + 1e-9))


def resample_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``H×W×3`` uint8 resized to ``height×width``, bilinear (antialiased when it shrinks)."""
    if image.shape[:2] == (height, width):
        return image
    # Pillow's bilinear filter widens its support by the reduction factor: antialiased downsampling
    out = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(out)


def resample_by(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` (``H×W×3`` uint8) resampled by ``factor`` as the sources resample on read (:func:`resampled_size`,
    :func:`resample_image`); ``factor`` 1 returns it as it is."""
    if factor == 1:
        return image
    return resample_image(image, resampled_size(image.shape[0], factor), resampled_size(image.shape[1], factor))


def resample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``H×W`` class indices resized to ``height×width``, nearest neighbour (no new labels are invented)."""
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def _resample_factor(name: str, scale: float | None, gsd: float | None, target_gsd: float | None) -> float:
    """The resampling factor of the ``scale`` / ``gsd`` / ``target_gsd`` options (1: none)."""
    for key, value in (("scale", scale), ("gsd", gsd), ("target_gsd", target_gsd)):
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise RSSQAError(f"{name}: {key} must be a positive number, got {value!r}")
    if scale is not None and target_gsd is not None:
        raise RSSQAError(f"{name}: give scale or target_gsd, not both")
    if target_gsd is not None:
        if gsd is None:
            raise RSSQAError(
                f"{name}: target_gsd {target_gsd:g} needs the source's gsd (metres per pixel) to compute the factor"
            )
        return float(gsd) / float(target_gsd)
    return float(scale) if scale is not None else 1.0


def _group_regex(name: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise RSSQAError(f"{name}: group_pattern '{pattern}' is not a regular expression ({e})") from None
    if rx.groups != 1:
        raise RSSQAError(
            f"{name}: group_pattern '{pattern}' has {rx.groups} capture groups; it needs exactly one, "
            r"the part of the name that is the group (e.g. '(tile\d+)_')"
        )
    return rx


class SegSource(Dataset):
    """A segmentation source as a map-style dataset of ``{"image_id", "image", "mask"}`` samples.

    Args:
        name: the source's name (used in messages and tables).
        pairs: the image/mask files, as a layout found them.
        codec: how masks encode classes.
        patch_size: cut images into ``patch_size``-pixel squares (``None``: whole images, which then
            must all have one size).
        stride: patch step (default ``patch_size``: no overlap, except a last patch flush with the edge).
        bands: three bands to keep from multi-band images.
        on_bad: ``"error"``: the first bad file raises; ``"skip"``: bad files are dropped and counted in
            :attr:`bad` (header problems when built, pixel problems in :meth:`check`).
        max_images: keep only the first ``max_images`` files (sorted by id) before cutting patches.
        scale: resample every image and mask by this factor when read (``0.25``: a quarter of the
            width and height). Images bilinear (antialiased when shrinking), masks nearest neighbour
            on the decoded classes; each side becomes ``round(side * factor)`` (halves up, at least 1 px).
            Patches are cut from the resampled image, so ``patch_size``, ``stride``, the windows and
            patch ids are in resampled pixels, and an image whose resampled size is smaller than a
            patch is a bad file (an error naming it, or skipped and counted with ``on_bad="skip"``).
        gsd: the source's ground sample distance, metres per pixel (used with ``target_gsd``; a scorer
            trained on the source records it, as read, see :meth:`reading`).
        target_gsd: resample to this ground sample distance: the factor is ``gsd / target_gsd``
            (``gsd: 0.3, target_gsd: 1.2`` is ``scale: 0.25``); needs ``gsd``, excludes ``scale``.
            Neither given (the default): no resampling.
        group_pattern: a regular expression with one capture group, searched in each image's id
            (for the ``folder`` layout its path under the images folder without extension, for the
            other layouts the id they give, usually the file stem); the captured text is the image's
            split group, so all images (and patches) of one area share a split: ``(tile\\d+)_``
            groups ``tile3_007`` under ``tile3``. It replaces the layout's own group. An image whose
            id it does not match is an error naming the file and the pattern, whatever ``on_bad``
            says (a pattern that misses files is a configuration error). Default: the layout's
            groups (each file its own group, UAVid's sequences).
        ignore_classes: class names of the schema that mean "no label" (an ``unlabeled`` or
            ``clutter`` class): their pixels become the ignore index 255 and the classes leave the
            class list (the others are renumbered in order). Default: none.
        rescale: ``[low, high]``: image values mapped linearly to 0-255 (clipped, rounded) when read, after
            the bands are chosen and before resampling: what images of more than 8 bits per band (uint16
            reflectance, float) need; ``rssqa score`` / ``recommend`` / ``scene`` read new images so (see
            :meth:`reading`). ``auto``: the range measured once on the source's own images, the 1st to the 99th
            percentile of their values (:func:`~rssqa.data.segsets.rasters.auto_range`), then fixed and recorded
            like a given one. Default: none, and images must hold 8-bit pixels.

    Samples (``__getitem__``): ``{"image_id": str, "image": H×W×3 uint8, "mask": H×W uint8}``.
    """

    def __init__(
        self,
        name: str,
        pairs: Sequence[FilePair],
        codec: MaskCodec,
        patch_size: int | None = None,
        stride: int | None = None,
        bands: Sequence[int] | None = None,
        on_bad: str = "error",
        max_images: int | None = None,
        scale: float | None = None,
        gsd: float | None = None,
        target_gsd: float | None = None,
        group_pattern: str | None = None,
        ignore_classes: Sequence[str] = (),
        rescale: Sequence[float] | str | None = None,
    ):
        if on_bad not in ON_BAD:
            raise RSSQAError(f"{name}: on_bad={on_bad!r}; choose from {ON_BAD}")
        self.factor = _resample_factor(name, scale, gsd, target_gsd)
        self.gsd = float(gsd) if gsd is not None else None
        rx = _group_regex(name, group_pattern)
        if isinstance(ignore_classes, str):
            ignore_classes = [ignore_classes]
        codec = codec.without_classes(ignore_classes, where=name) if ignore_classes else codec
        if patch_size is not None and patch_size < 1:
            raise RSSQAError(f"{name}: patch_size must be positive, got {patch_size}")
        if stride is not None and (patch_size is None or not 0 < stride <= patch_size):
            raise RSSQAError(f"{name}: stride needs a patch_size and must be in 1..patch_size, got {stride}")
        self.name, self.codec, self.on_bad = name, codec, on_bad
        self.patch_size, self.stride = patch_size, stride
        self.bands = list(bands) if bands is not None else None
        self.rescale = check_rescale(rescale, name)
        self.bad: list[BadSample] = []
        self.unlabelled: list[str] = []
        self._sizes: dict[Path, tuple[int, int]] = {}
        self._dtypes: set[str] = set()  # the pixel types of the images (headers)
        pairs = sorted(pairs, key=lambda p: p.image_id)
        ids = Counter(p.image_id for p in pairs)
        dup = sorted(i for i, n in ids.items() if n > 1)
        if dup:
            raise RSSQAError(
                f"{name}: image ids {dup[:5]} occur more than once; ids must be unique in a source"
            )
        if max_images is not None:
            pairs = pairs[:max_images]
        if rx is not None:
            pairs = [replace(p, group=_group_of(p, rx)) for p in pairs]
        self.samples: list[SegSample] = []
        for pair in pairs:
            try:
                self.samples.extend(self._scan(pair))
            except RSSQAError as e:
                self._bad(pair.image_id, str(pair.image), str(e))
        if not self.samples:
            raise RSSQAError(f"{name}: no usable image/mask pairs ({len(self.bad)} bad)")
        if self.rescale == "auto":
            self.rescale = auto_range(sorted({s.pair.image for s in self.samples}), self.bands)
            log.info("%s: rescale auto: values %g to %g mapped to 0-255", name, *self.rescale)
        if patch_size is None:
            sizes = Counter(self._sizes[s.pair.image] for s in self.samples)
            if len(sizes) > 1:
                raise RSSQAError(
                    f"{name}: images come in {len(sizes)} sizes ({', '.join(f'{w}x{h}' for h, w in sizes)}); "
                    "set patch_size to cut them into patches of one size"
                )
        self._cache: tuple[FilePair, np.ndarray, np.ndarray] | None = None

    def _scan(self, pair: FilePair) -> list[SegSample]:
        if pair.mask is None or not pair.mask.is_file():
            where = pair.mask or pair.expected_mask
            raise RSSQAError(f"{pair.image}: no mask" + (f" (expected {where})" if where else ""))
        h, w, b, dtype = header(pair.image, "image")
        mh, mw, _, _ = header(pair.mask, "mask")
        if (h, w) != (mh, mw):
            raise RSSQAError(f"{pair.image}: image is {w}x{h} but its mask {pair.mask} is {mw}x{mh}")
        if self.bands is None and b != 3:
            raise RSSQAError(f"{pair.image}: {b} bands; expected 3 (set bands to choose three)")
        if self.bands is not None and (len(self.bands) != 3 or max(self.bands) >= b):
            raise RSSQAError(f"{pair.image}: bands {self.bands} (counted from 0) do not pick three of its {b} bands")
        if dtype != "uint8" and self.rescale is None:
            raise RSSQAError(f"{pair.image}: {dtype} pixels; expected 8-bit images (set rescale: [low, high] to map them to 0-255)")
        rh, rw = resampled_size(h, self.factor), resampled_size(w, self.factor)
        self._sizes[pair.image] = (rh, rw)  # as read: after resampling
        self._dtypes.add(dtype)
        if self.patch_size is None:
            return [SegSample(pair.image_id, pair, None)]
        corners = patch_windows(rh, rw, self.patch_size, self.stride)
        if not corners:
            size = f"{w}x{h}" if self.factor == 1 else f"{w}x{h} resampled by {self.factor:g} to {rw}x{rh}"
            raise RSSQAError(f"{pair.image}: {size} is smaller than patch_size {self.patch_size}")
        p = self.patch_size
        return [SegSample(f"{pair.image_id}_{top}_{left}", pair, (top, left, p, p)) for top, left in corners]

    def read_options(self) -> dict[str, Any]:
        """What changes the pixels read beyond the files and the class list: ``{}`` by default,
        ``{"resample": factor}`` when resampling, ``"rescale"`` and ``"bands"`` where set (part of the
        cache fingerprints of the sqed stage)."""
        out: dict[str, Any] = {"resample": self.factor} if self.factor != 1 else {}
        if self.rescale is not None:
            out["rescale"] = list(self.rescale)
        if self.bands is not None:
            out["bands"] = list(self.bands)
        return out

    def reading(self) -> dict[str, Any]:
        """How the images were read, for a scorer to read new images the same way: ``{}`` for three 8-bit
        bands read as they are; else ``"scale"`` (the resampling factor) with ``"gsd"`` (metres per pixel
        as read, the files' ``gsd`` over the factor) where the source's ``gsd`` is known, ``"bands"`` (0-based)
        and ``"rescale"`` (``[low, high]``) where set, with ``"pixels"``, the pixel types it was applied to
        (``["uint16"]``: a scorer reads a new 8-bit image as it is rather than through a range meant for others)."""
        out: dict[str, Any] = {}
        if self.factor != 1 or self.gsd is not None:
            out = {"scale": self.factor} | ({"gsd": self.gsd / self.factor} if self.gsd is not None else {})
        if self.bands is not None:
            out["bands"] = list(self.bands)
        if self.rescale is not None:
            out["rescale"], out["pixels"] = list(self.rescale), sorted(self._dtypes)
        return out

    def _bad(self, key: str, path: str, reason: str) -> None:
        if self.on_bad == "error":
            raise RSSQAError(reason)
        # BadSample prefixes the file itself; keep the reason free of a second copy of it
        self.bad.append(BadSample(key, path, reason.removeprefix(f"{path}: ")))
        log.warning("%s: skipped %s", self.name, reason)

    # ------------------------------------------------------------------------------------------ data
    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; masks hold indices into these."""
        return self.codec.classes

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.codec.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``H×W×3`` uint8 and mask ``H×W`` uint8 of sample ``index`` (raises on a bad file)."""
        s = self.samples[index]
        if self._cache is None or self._cache[0] != s.pair:
            # patches of one file are consecutive: decode each file once, not once per patch
            self._cache = (s.pair, *self.read_file(s.pair))
        _, image, mask = self._cache
        if s.window is not None:
            top, left, h, w = s.window
            image, mask = image[top : top + h, left : left + w], mask[top : top + h, left : left + w]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def read_file(self, pair: FilePair) -> tuple[np.ndarray, np.ndarray]:
        """The whole image ``H×W×3`` uint8 and mask ``H×W`` uint8 of one file pair, as the source reads
        them (bands chosen, classes decoded, no label where the image has no data, resampled), before patches
        are cut."""
        image, valid = read_bands_valid(pair.image, self.bands)
        image = as_8bit(image, self.rescale, pair.image)
        mask = read_mask(pair.mask, self.codec)
        if image.shape[:2] != mask.shape:
            raise RSSQAError(f"{pair.image}: image is {image.shape[:2]} but its mask is {mask.shape}")
        if valid is not None:  # no imagery there (a mosaic's border): nothing to score a method on
            mask = np.where(valid, mask, IGNORE_INDEX).astype(np.uint8)
        if self.factor != 1:
            h, w = resampled_size(mask.shape[0], self.factor), resampled_size(mask.shape[1], self.factor)
            image, mask = resample_image(image, h, w), resample_mask(mask, h, w)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.read(index)
        return {"image_id": self.samples[index].image_id, "image": image, "mask": mask}

    def check(self, indices: Sequence[int] | None = None) -> list[int]:
        """Decode samples and return the indices of the good ones.

        With ``on_bad="error"`` the first bad file raises; with ``"skip"`` every sample of a bad file
        is left out and the file is counted once in :attr:`bad`. Samples without any labelled pixel
        (a patch of a mosaic's no-data border) are left out and listed in :attr:`unlabelled`: their
        OA is undefined, but nothing is wrong with the file.

        Args:
            indices: samples to check (default all).
        """
        good, bad_files = [], set()
        for i in range(len(self)) if indices is None else indices:
            s = self.samples[i]
            if s.pair.image in bad_files:
                continue
            try:
                _, mask = self.read(i)
            except RSSQAError as e:
                bad_files.add(s.pair.image)
                self._bad(s.pair.image_id, str(s.pair.image), str(e))
                continue
            if not (mask != IGNORE_INDEX).any():
                self.unlabelled.append(s.image_id)
                continue
            good.append(i)
        return good

    def __repr__(self) -> str:
        return (
            f"SegSource({self.name!r}, {len(self)} samples from {len(self._sizes)} files, "
            f"{self.num_classes} classes, {len(self.bad)} bad)"
        )


def files(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching a glob ``pattern`` (``**`` recurses), sorted; hidden files left out."""
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.parts[-1:])
    )


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a one-line error naming it."""
    if not path.is_dir():
        raise RSSQAError(f"{path}: {what} folder not found")
    return path


def as_path(p: str | os.PathLike) -> Path:
    """``Path`` with ``~`` expanded."""
    return Path(p).expanduser()
