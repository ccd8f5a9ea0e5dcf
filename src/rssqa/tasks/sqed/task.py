"""The Lightning task that trains one segmentation method on one source and labels images.

:class:`SegmentationTask` wraps a :class:`~rssqa.models.segmenters.Segmenter`: its training step
applies random dihedral augmentation (:func:`random_dihedral`), its prediction step gives per-image
OA (:func:`per_image_oa`) with what ``Segmenter.describe`` caches. :func:`load_task` restores a
sqed checkpoint as a task (:func:`rssqa.models.segmenters.load_segmenter` as a segmenter alone).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

from rssqa.data.segsets import IGNORE_INDEX
from rssqa.errors import RSSQAError
from rssqa.models.quality_inputs import method_statistics
from rssqa.models.segmenters import MethodSpec, Segmenter


def per_image_oa(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overall accuracy of each image, ignore index excluded.

    Args:
        pred: ``B×H×W`` predicted class indices.
        target: ``B×H×W`` true class indices, :data:`IGNORE_INDEX` where unlabelled.
        num_classes: number of classes.

    Returns:
        OA ``B`` in [0, 1] (``nan`` for an image without labelled pixels) and labelled pixels ``B``.
    """
    n = (target != IGNORE_INDEX).flatten(1).sum(1)
    oa = multiclass_accuracy(
        pred, target, num_classes, average="micro", multidim_average="samplewise", ignore_index=IGNORE_INDEX
    ).double()
    return torch.where(n > 0, oa, torch.full_like(oa, float("nan"))), n


def random_dihedral(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip and rotate each image with its mask by one of the 8 symmetries of a square (torch RNG).

    Args:
        images: ``B×3×H×W``.
        masks: ``B×H×W``.
    """
    square = images.shape[-1] == images.shape[-2]
    ks = torch.randint(0, 8, (images.shape[0],))
    xs, ys = [], []
    for x, y, k in zip(images, masks, ks.tolist(), strict=True):
        if k >= 4:
            x, y = x.flip(-1), y.flip(-1)
        turns = k % 4 if square else 2 * (k % 2)
        xs.append(torch.rot90(x, turns, (-2, -1)))
        ys.append(torch.rot90(y, turns, (-2, -1)))
    return torch.stack(xs), torch.stack(ys)


class SegmentationTask(L.LightningModule):
    """Train one method on one source; label images with OA and cached statistics.

    Args:
        spec: the resolved method (``MethodSpec.as_dict()``), stored so a checkpoint rebuilds alone.
        num_classes: classes of the source.
        class_names: their names.
        grid: pooled grid side of the cached features.
        hist_bins: histogram bins of the cached statistics.
        augment: random dihedral augmentation in training.
        log_prefix: prefix of logged metric names (``<source>/<method>/``).
        fingerprint: what the training depended on (checked before a checkpoint is reused).
        load_weights: load the spec's local encoder weights (not when restoring a checkpoint).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        num_classes: int,
        class_names: Sequence[str] = (),
        grid: int = 4,
        hist_bins: int = 20,
        augment: bool = True,
        log_prefix: str = "",
        fingerprint: str = "",
        load_weights: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["load_weights"])
        self.spec = MethodSpec(**spec)
        self.segmenter = Segmenter(self.spec, num_classes, grid, hist_bins, load_weights=load_weights)
        self.loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.train_oa = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)
        # segmenter forward batch when labelling (part of the numerics; None: the loader's batch)
        self.describe_chunk: int | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        if self.hparams.augment:
            x, y = random_dihedral(x, y)
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_oa(logits.argmax(1), y)
        p = self.hparams.log_prefix
        self.log(f"{p}train_loss", loss, prog_bar=True, batch_size=len(x))
        self.log(f"{p}train_oa", self.train_oa, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        # the same statistics the scorer computes live (rssqa.models.quality_inputs), plus the truth's OA
        stats = method_statistics(self.segmenter, batch["image"], self.describe_chunk)
        return label_outputs(stats, batch["mask"], self.hparams.num_classes)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=self.spec.lr,
            total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            pct_start=0.2,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def label_outputs(stats: dict[str, torch.Tensor], masks: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """A label shard's arrays for one batch: the truth's OA of each image (``oa``, ``n_labelled``) and
    the cached statistics, from :func:`~rssqa.models.quality_inputs.method_statistics` (whose
    ``logits`` it pops; ``probs`` and ``pred`` must be gone)."""
    logits = stats.pop("logits")
    oa, n = per_image_oa(logits.argmax(1), masks, num_classes)
    return {"oa": oa.cpu(), "n_labelled": n.cpu(), **stats}


def load_task(path: str | os.PathLike, map_location: str = "cpu") -> SegmentationTask:
    """A :class:`SegmentationTask` from its checkpoint, with a one-line error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise RSSQAError(f"{path}: segmenter checkpoint not found")
    try:
        # the checkpoint holds every weight: the encoder's initial weights file is not needed any more
        return SegmentationTask.load_from_checkpoint(path, map_location=map_location, load_weights=False)
    except Exception as e:  # noqa: BLE001 - torch.load and Lightning raise many kinds; all mean "not ours"
        raise RSSQAError(f"{path}: not a sqed segmenter checkpoint ({type(e).__name__}: {e})") from None
