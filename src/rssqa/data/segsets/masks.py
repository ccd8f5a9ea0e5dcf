"""How a mask file stores classes, and its decoding to class indices.

Two encodings cover the segmentation sets in use: an RGB colour per class (ISPRS, DeepGlobe, UAVid,
most folders exported from annotation tools) and a class index per pixel (LoveDA, OpenEarthMap,
palette-mode PNGs, whose stored indices are the classes). Pixels without a label go to
:data:`IGNORE_INDEX`. A colour or value the codec does not know is reported as an error naming the
file, or sent to the ignore index when the configuration says so; it is never mapped to a class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rssqa.errors import RSSQAError

IGNORE_INDEX = 255
UNKNOWN_POLICIES = ("error", "ignore")

Color = tuple[int, int, int]


def _color(c: Sequence[int], where: str) -> Color:
    if len(c) != 3 or not all(0 <= int(v) <= 255 for v in c):
        raise RSSQAError(f"{where}: colour {list(c)} is not three values in 0..255")
    return (int(c[0]), int(c[1]), int(c[2]))


def _pack(rgb: np.ndarray) -> np.ndarray:
    """``...×3`` uint8 -> ``...`` int32 code ``r << 16 | g << 8 | b``."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass(frozen=True)
class MaskCodec:
    """The encoding of one source's masks.

    Attributes:
        classes: class names; decoded masks hold indices ``0..len(classes)-1`` or :data:`IGNORE_INDEX`.
        palette: one RGB colour per class for colour masks; ``None`` for class-index masks.
        ignore_colors: colours that mean "no label" (colour masks).
        value_map: stored value -> class index (or :data:`IGNORE_INDEX`) for index masks; values
            not in the map are taken as class indices when ``< len(classes)``.
        ignore_values: stored values that mean "no label" (index masks).
        unknown: what an unknown colour or value becomes: ``"error"`` (raise, naming the file) or
            ``"ignore"`` (:data:`IGNORE_INDEX`).
        binarize: threshold each colour channel at 128 before matching: for colour masks saved
            with stray values (lossy compression, resampling).
    """

    classes: tuple[str, ...]
    palette: tuple[Color, ...] | None = None
    ignore_colors: tuple[Color, ...] = ()
    value_map: Mapping[int, int] = field(default_factory=dict)
    ignore_values: tuple[int, ...] = (IGNORE_INDEX,)
    unknown: str = "error"
    binarize: bool = False

    def __post_init__(self) -> None:
        where = "mask codec"
        if not self.classes:
            raise RSSQAError(f"{where}: classes is empty")
        if len(self.classes) >= IGNORE_INDEX:
            raise RSSQAError(f"{where}: {len(self.classes)} classes; at most {IGNORE_INDEX - 1} fit in uint8")
        if len(set(self.classes)) != len(self.classes):
            raise RSSQAError(f"{where}: duplicate class names in {list(self.classes)}")
        if self.unknown not in UNKNOWN_POLICIES:
            raise RSSQAError(f"{where}: unknown={self.unknown!r}; choose from {UNKNOWN_POLICIES}")
        if self.palette is not None:
            palette = tuple(_color(c, f"{where}: palette") for c in self.palette)
            ignore = tuple(_color(c, f"{where}: ignore_colors") for c in self.ignore_colors)
            object.__setattr__(self, "palette", palette)
            object.__setattr__(self, "ignore_colors", ignore)
            if len(palette) != len(self.classes):
                raise RSSQAError(
                    f"{where}: palette has {len(palette)} colours but there are {len(self.classes)} classes"
                )
            dup = {c for c in palette if palette.count(c) > 1} | (set(palette) & set(ignore))
            if dup:
                raise RSSQAError(
                    f"{where}: colours {sorted(dup)} appear more than once in palette/ignore_colors"
                )
        for v, k in self.value_map.items():
            if not (0 <= int(v) < 2**16) or not (0 <= int(k) < len(self.classes) or int(k) == IGNORE_INDEX):
                raise RSSQAError(
                    f"{where}: value_map {v} -> {k}: target must be a class index < {len(self.classes)} "
                    f"or {IGNORE_INDEX}"
                )

    @property
    def kind(self) -> str:
        """``"palette"`` (RGB colour masks) or ``"index"`` (class-index masks)."""
        return "index" if self.palette is None else "palette"

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def decode(self, mask: np.ndarray, path: str | Path = "<mask>") -> np.ndarray:
        """Decode a mask array as read from ``path``.

        Args:
            mask: ``H×W`` (index or palette-mode indices) or ``H×W×3`` (RGB) array.
            path: the file, for error messages.

        Returns:
            ``H×W`` uint8 class indices, :data:`IGNORE_INDEX` where there is no label.
        """
        if self.kind == "palette":
            return self._decode_palette(mask, str(path))
        return self._decode_index(mask, str(path))

    def _decode_palette(self, mask: np.ndarray, path: str) -> np.ndarray:
        if mask.ndim != 3 or mask.shape[2] < 3:
            raise RSSQAError(
                f"{path}: expected an RGB colour mask for the palette, got shape {mask.shape}; "
                "for class-index masks leave the palette out"
            )
        rgb = mask[..., :3]
        if self.binarize:
            rgb = np.where(rgb >= 128, 255, 0).astype(np.uint8)
        codes = _pack(rgb)
        keys = np.array([*map(_pack_one, self.palette), *map(_pack_one, self.ignore_colors)], np.int32)
        values = np.array([*range(len(self.palette)), *[IGNORE_INDEX] * len(self.ignore_colors)], np.uint8)
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
        known = keys[pos] == codes
        out = values[pos]
        if not known.all():
            if self.unknown == "error":
                bad = [int(c) for c in np.unique(codes[~known])]
                shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise RSSQAError(
                    f"{path}: {int((~known).sum())} pixels have colours outside the palette: {shown}{more} "
                    "(set unknown: ignore to send them to the ignore index)"
                )
            out = np.where(known, out, IGNORE_INDEX).astype(np.uint8)
        return out

    def _decode_index(self, mask: np.ndarray, path: str) -> np.ndarray:
        if mask.ndim == 3:
            if mask.shape[2] >= 3 and not (
                np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])
            ):
                raise RSSQAError(
                    f"{path}: expected a single-channel class-index mask, got RGB colours; give a palette"
                )
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise RSSQAError(f"{path}: expected an H x W class-index mask, got shape {mask.shape}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise RSSQAError(f"{path}: mask values are {mask.dtype}, not integers")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) >= 2**16):
            raise RSSQAError(f"{path}: mask values outside 0..65535")
        lut = np.full(max(int(mask.max(initial=0)) + 1, 256), -1, np.int32)
        lut[: self.num_classes] = np.arange(self.num_classes)
        for v in self.ignore_values:
            if v < len(lut):
                lut[v] = IGNORE_INDEX
        for v, k in self.value_map.items():
            if v < len(lut):
                lut[v] = k
        out = lut[mask.astype(np.int64)]
        unknown = out < 0
        if unknown.any():
            if self.unknown == "error":
                bad = np.unique(mask[unknown])
                raise RSSQAError(
                    f"{path}: mask values {bad[:8].tolist()} are not among the {self.num_classes} classes "
                    f"({', '.join(self.classes)}) nor ignored; the class count or value_map does not match the data"
                )
            out[unknown] = IGNORE_INDEX
        return out.astype(np.uint8)

    def without_classes(self, names: Sequence[str], where: str = "mask codec") -> MaskCodec:
        """The same encoding with the classes ``names`` sent to :data:`IGNORE_INDEX` and removed.

        For a schema's "unlabeled" / "clutter" class that should not count: its pixels become "no
        label" and the remaining classes are renumbered ``0..n-1`` in their order. A colour codec moves
        the classes' colours to ``ignore_colors``; an index codec maps their stored values to the
        ignore index through ``value_map`` (every stored value that meant a class gets an entry, so the
        renumbering never reads a stored value as a different class).

        Args:
            names: class names to drop; each must be one of :attr:`classes`.
            where: prefix of error messages (the source's name).
        """
        drop = list(dict.fromkeys(names))
        missing = [n for n in drop if n not in self.classes]
        if missing:
            raise RSSQAError(
                f"{where}: ignore_classes {missing} are not classes of this schema ({', '.join(self.classes)})"
            )
        keep = [c for c in self.classes if c not in drop]
        if not keep:
            raise RSSQAError(f"{where}: ignore_classes {drop} would leave no class")
        if not drop:
            return self
        new_index = {
            old: (keep.index(c) if c in keep else IGNORE_INDEX) for old, c in enumerate(self.classes)
        }
        if self.palette is not None:
            dropped = tuple(col for c, col in zip(self.classes, self.palette, strict=True) if c in drop)
            return MaskCodec(
                tuple(keep),
                palette=tuple(
                    col for c, col in zip(self.classes, self.palette, strict=True) if c not in drop
                ),
                ignore_colors=(*self.ignore_colors, *dropped),
                unknown=self.unknown,
                binarize=self.binarize,
            )
        # index masks: stored value -> old class (as _decode_index resolves it) -> new class
        value_map: dict[int, int] = {}
        for v in range(self.num_classes):
            if v not in self.ignore_values:
                value_map[v] = new_index[v]
        for v, k in self.value_map.items():
            value_map[int(v)] = IGNORE_INDEX if int(k) == IGNORE_INDEX else new_index[int(k)]
        return MaskCodec(
            tuple(keep),
            value_map=value_map,
            ignore_values=self.ignore_values,
            unknown=self.unknown,
            binarize=self.binarize,
        )

    def encode_palette(self, index_mask: np.ndarray) -> np.ndarray:
        """Class indices ``H×W`` -> RGB ``H×W×3`` (ignored pixels get the first ignore colour or black)."""
        if self.palette is None:
            raise RSSQAError("mask codec: encode_palette needs a palette")
        table = np.zeros((256, 3), np.uint8)
        table[: len(self.palette)] = self.palette
        table[IGNORE_INDEX] = self.ignore_colors[0] if self.ignore_colors else (0, 0, 0)
        return table[index_mask]


def _pack_one(c: Color) -> int:
    return (c[0] << 16) | (c[1] << 8) | c[2]
