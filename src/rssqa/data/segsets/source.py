"""A segmentation source: image/mask pairs on disk, checked, optionally cut into patches.

:class:`SegSource` is a map-style ``torch`` dataset. It is built from a list of (image, mask) file
pairs by a layout (see :mod:`rssqa.data.segsets.layouts`) and checks what it can from file headers
when built (missing masks, unreadable files, image and mask of different sizes, too few channels,
images smaller than a patch); what only the pixels tell (colours outside the palette, class values
the configuration does not know) is checked when a sample is read. Each problem is an
:class:`~rssqa.errors.RSSQAError` naming the file or, with ``on_bad="skip"``, a skipped and counted
:class:`~rssqa.errors.BadSample` (see :meth:`SegSource.check`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from rssqa.data.segsets.masks import IGNORE_INDEX, MaskCodec
from rssqa.errors import BadSample, RSSQAError

log = logging.getLogger(__name__)

ON_BAD = ("error", "skip")
# Real orthophotos are large (ISPRS Potsdam: 6000 x 6000 px); Pillow's bomb guard would refuse them.
Image.MAX_IMAGE_PIXELS = None


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
        """Split group: all patches of one file (and of one layout group) share a split."""
        return self.pair.group or self.pair.image_id


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


def read_image(path: Path, bands: Sequence[int] | None = None) -> np.ndarray:
    """Read an 8-bit image as ``H×W×3`` uint8.

    Args:
        path: image file (PNG, JPEG, TIFF, ...).
        bands: which three bands to keep from a multi-band file (0-based), e.g. ``[0, 1, 2]`` of RGBIR.
    """
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except FileNotFoundError:
        raise RSSQAError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RSSQAError(f"{path}: unreadable image ({e})") from None
    if mode == "P":
        raise RSSQAError(f"{path}: palette-mode image; expected an RGB (or multi-band) image")
    if arr.dtype != np.uint8:
        raise RSSQAError(f"{path}: {arr.dtype} pixels; expected 8-bit images (rescale to uint8 first)")
    if arr.ndim == 2:
        arr = arr[..., None]
    if bands is not None:
        if max(bands) >= arr.shape[2] or len(bands) != 3:
            raise RSSQAError(f"{path}: bands {list(bands)} do not pick three of its {arr.shape[2]} bands")
        arr = arr[..., list(bands)]
    elif arr.shape[2] != 3:
        raise RSSQAError(f"{path}: {arr.shape[2]} bands; expected 3 (set bands to choose three)")
    return np.ascontiguousarray(arr)


def read_mask(path: Path, codec: MaskCodec) -> np.ndarray:
    """Read and decode a mask file to ``H×W`` uint8 class indices (palette PNGs keep their indices)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and codec.kind == "palette":
                im = im.convert("RGB")
            elif im.mode in ("RGBA", "LA"):
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise RSSQAError(f"{path}: mask not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RSSQAError(f"{path}: unreadable mask ({e})") from None
    return codec.decode(arr, path)


def _header(path: Path, what: str) -> tuple[int, int, int]:
    """``(height, width, bands)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width, len(im.getbands())
    except FileNotFoundError:
        raise RSSQAError(f"{path}: {what} not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RSSQAError(f"{path}: unreadable {what} ({e})") from None


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
    ):
        if on_bad not in ON_BAD:
            raise RSSQAError(f"{name}: on_bad={on_bad!r}; choose from {ON_BAD}")
        if patch_size is not None and patch_size < 1:
            raise RSSQAError(f"{name}: patch_size must be positive, got {patch_size}")
        if stride is not None and (patch_size is None or not 0 < stride <= patch_size):
            raise RSSQAError(f"{name}: stride needs a patch_size and must be in 1..patch_size, got {stride}")
        self.name, self.codec, self.on_bad = name, codec, on_bad
        self.patch_size, self.stride = patch_size, stride
        self.bands = list(bands) if bands is not None else None
        self.bad: list[BadSample] = []
        self.unlabelled: list[str] = []
        self._sizes: dict[Path, tuple[int, int]] = {}
        pairs = sorted(pairs, key=lambda p: p.image_id)
        ids = Counter(p.image_id for p in pairs)
        dup = sorted(i for i, n in ids.items() if n > 1)
        if dup:
            raise RSSQAError(
                f"{name}: image ids {dup[:5]} occur more than once; ids must be unique in a source"
            )
        if max_images is not None:
            pairs = pairs[:max_images]
        self.samples: list[SegSample] = []
        for pair in pairs:
            try:
                self.samples.extend(self._scan(pair))
            except RSSQAError as e:
                self._bad(pair.image_id, str(pair.image), str(e))
        if not self.samples:
            raise RSSQAError(f"{name}: no usable image/mask pairs ({len(self.bad)} bad)")
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
        h, w, b = _header(pair.image, "image")
        mh, mw, _ = _header(pair.mask, "mask")
        if (h, w) != (mh, mw):
            raise RSSQAError(f"{pair.image}: image is {w}x{h} but its mask {pair.mask} is {mw}x{mh}")
        if self.bands is None and b != 3:
            raise RSSQAError(f"{pair.image}: {b} bands; expected 3 (set bands to choose three)")
        if self.bands is not None and (len(self.bands) != 3 or max(self.bands) >= b):
            raise RSSQAError(f"{pair.image}: bands {self.bands} do not pick three of its {b} bands")
        self._sizes[pair.image] = (h, w)
        if self.patch_size is None:
            return [SegSample(pair.image_id, pair, None)]
        corners = patch_windows(h, w, self.patch_size, self.stride)
        if not corners:
            raise RSSQAError(f"{pair.image}: {w}x{h} is smaller than patch_size {self.patch_size}")
        p = self.patch_size
        return [SegSample(f"{pair.image_id}_{top}_{left}", pair, (top, left, p, p)) for top, left in corners]

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
            image = read_image(s.pair.image, self.bands)
            mask = read_mask(s.pair.mask, self.codec)
            if image.shape[:2] != mask.shape:
                raise RSSQAError(f"{s.pair.image}: image is {image.shape[:2]} but its mask is {mask.shape}")
            self._cache = (s.pair, image, mask)
        _, image, mask = self._cache
        if s.window is not None:
            top, left, h, w = s.window
            image, mask = image[top : top + h, left : left + w], mask[top : top + h, left : left + w]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

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
