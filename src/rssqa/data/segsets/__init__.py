"""Segmentation sources: real data set layouts, a generic folder layout, mask codecs, DataModules.

>>> src = build_source("vaihingen", "runs/smoke/world/sources/vaihingen")  # doctest: +SKIP
>>> sample = src[0]  # {"image_id", "image": H×W×3 uint8, "mask": H×W uint8 (255 = ignore)}
"""

from typing import Any

from rssqa.data.segsets import folder as _folder  # noqa: F401 - registers the folder layout
from rssqa.data.segsets.layouts import (
    DEEPGLOBE_CLASSES,
    DEEPGLOBE_PALETTE,
    ISPRS_CLASSES,
    ISPRS_PALETTE,
    LOVEDA_CLASSES,
    OPENEARTHMAP_CLASSES,
    UAVID_CLASSES,
    UAVID_PALETTE,
    build_source,
    list_layouts,
    register_layout,
)
from rssqa.data.segsets.masks import IGNORE_INDEX, MaskCodec
from rssqa.data.segsets.rasters import read_image
from rssqa.data.segsets.source import (
    FilePair,
    SegSample,
    SegSource,
    patch_windows,
    read_mask,
    resample_by,
)

__all__ = [
    "DEEPGLOBE_CLASSES",
    "DEEPGLOBE_PALETTE",
    "IGNORE_INDEX",
    "ISPRS_CLASSES",
    "ISPRS_PALETTE",
    "LOVEDA_CLASSES",
    "OPENEARTHMAP_CLASSES",
    "UAVID_CLASSES",
    "UAVID_PALETTE",
    "FilePair",
    "MaskCodec",
    "SegArrays",
    "SegDataModule",
    "SegSample",
    "SegSource",
    "SegSubset",
    "build_source",
    "list_layouts",
    "patch_windows",
    "read_image",
    "read_mask",
    "resample_by",
    "register_layout",
    "to_tensors",
]

# the DataModule and its helpers import Lightning: loaded when first asked for, so that reading a source (the
# scene path, ``rssqa scene``) does not pay for it
_DATAMODULE = ("SegArrays", "SegDataModule", "SegSubset", "to_tensors")


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE:
        from rssqa.data.segsets import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
