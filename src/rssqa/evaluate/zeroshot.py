"""Zero-shot scene classification: class names into prompts, the nearest class embedding wins.

The prompts are generic remote-sensing phrasings, not tuned to any evaluation set. Evaluation data come
from the embedded world (:func:`rssqa.world.sample_scenes`) or from a real labelled folder
(:func:`load_labelled_folder`: one sub-folder of images per class, like torchvision's ``ImageFolder``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from rssqa.errors import RSSQAError

TEMPLATES: tuple[str, ...] = (
    "an aerial image of {}.",
    "a satellite image of {}.",
    "a remote sensing image of a {} scene.",
    "an overhead view of a {} area.",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """Class embeddings ``C×D`` (L2-normalised, float32): the mean of each class's prompt embeddings.

    Uses :func:`open_clip.build_zero_shot_classifier`; the model is put in eval mode and restored.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(class_names), list(templates), num_classes_per_batch=None, device=device
        )
    finally:
        model.train(was_training)
    return weights.T.float()


def zeroshot_accuracy(
    image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Top-k accuracy (and class-balanced top-1) of nearest-class-embedding predictions.

    Args:
        image_features: ``N×D`` L2-normalised image embeddings.
        classifier: ``C×D`` class embeddings (:func:`build_classifier`).
        labels: ``N`` int64 class indices.
        ks: top-k cut-offs (clipped to ``C``).

    Returns:
        ``{"top1": a, ..., "balanced_top1": a}``, each in [0, 1]; balanced averages per-class recall over
        the classes present.
    """
    if len(image_features) == 0 or len(image_features) != len(labels):
        raise ValueError(f"need N image features and N labels, got {len(image_features)} and {len(labels)}")
    logits = image_features.float() @ classifier.float().T
    labels = labels.to(logits.device).long()
    out = {}
    order = logits.argsort(dim=1, descending=True, stable=True)
    for k in ks:
        hit = (order[:, : min(k, logits.shape[1])] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean())
    correct = order[:, 0] == labels
    per_class = [correct[labels == c].float().mean() for c in labels.unique()]
    out["balanced_top1"] = float(torch.stack(per_class).mean())
    return out


def load_labelled_folder(
    root: str | os.PathLike, image_size: int, max_per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a real labelled image folder for zero-shot evaluation.

    Layout: ``root/<class name>/<image>``; the class name is the folder name with ``_`` as spaces.
    Images are centre-cropped to a square and resized to ``image_size`` (bilinear).

    Returns:
        images ``N×S×S×3`` uint8, labels ``N`` int64, class names (sorted by folder name).

    Raises:
        RSSQAError: a missing folder, no class folders, a class without images, an unreadable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise RSSQAError(f"{root}: zero-shot folder not found")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise RSSQAError(f"{root}: need at least two class sub-folders, found {len(classes)}")
    images, labels = [], []
    for index, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_per_class]
        if not files:
            raise RSSQAError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            images.append(_square(path, image_size))
            labels.append(index)
    names = [p.name.replace("_", " ") for p in classes]
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def _square(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            return np.asarray(im)
    except OSError as e:
        raise RSSQAError(f"{path}: unreadable image ({e})") from None
