"""Tensors for training and labelling: samples held in memory or read from a source, and a DataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rssqa.data.segsets.source import SegSource
from rssqa.errors import RSSQAError


def to_tensors(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """``H×W×3`` uint8 image -> ``3×H×W`` float in [0, 1]; ``H×W`` uint8 mask -> int64 (255 kept)."""
    # copies: the arrays may be read-only (decoded files, memory-mapped pools)
    out = {"image": torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float().div_(255.0)}
    if mask is not None:
        out["mask"] = torch.from_numpy(np.array(mask, np.int64))
    return out


class SegArrays(Dataset):
    """Samples held in memory: ``images`` ``N×H×W×3`` uint8 and ``masks`` ``N×H×W`` uint8.

    Items: ``{"image": 3×H×W float in [0, 1], "mask": H×W int64, "index": int}``.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
            raise RSSQAError(f"SegArrays: images {images.shape} and masks {masks.shape} do not pair up")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**to_tensors(self.images[i], self.masks[i]), "index": i}

    @classmethod
    def from_source(cls, source: SegSource, indices: Sequence[int]) -> SegArrays:
        """Read the samples ``indices`` of ``source`` into memory (they must have been checked)."""
        if not len(indices):
            raise RSSQAError(f"{source.name}: no samples to load")
        first_image, first_mask = source.read(indices[0])
        images = np.empty((len(indices), *first_image.shape), np.uint8)
        masks = np.empty((len(indices), *first_mask.shape), np.uint8)
        for k, i in enumerate(indices):
            images[k], masks[k] = source.read(i) if k else (first_image, first_mask)
        return cls(images, masks)


class SegSubset(Dataset):
    """Samples ``indices`` of a source, read on demand (for sets too large for memory).

    Items as :class:`SegArrays`, with ``index`` the position in ``indices``.
    """

    def __init__(self, source: SegSource, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.source.read(self.indices[i])
        return {**to_tensors(image, mask), "index": i}


class SegDataModule(L.LightningDataModule):
    """Training and prediction loaders over segmentation samples.

    Args:
        train: training samples (shuffled with a seeded generator, last incomplete batch dropped
            when there is more than one batch).
        predict: samples to label, in order.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: shuffling seed.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        predict: Dataset | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.train, self.predict = train, predict
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _loader(self, ds: Dataset | None, what: str, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RSSQAError(f"SegDataModule: no {what} samples given")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            drop_last=shuffle and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, "training", shuffle=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict, "prediction", shuffle=False)
