"""Fitting a filter CLIP or a CoCa captioner on image-text pairs.

:class:`PairFit` is the LightningModule that fits either model (contrastive loss, plus the captioning
loss for a CoCa); :func:`pair_loader` streams its training batches from shards, with the worker-side
augmentation of :class:`_TrainMap` (dihedral symmetry of the image, phrase dropout of the caption by
:func:`sub_caption`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from rssqa.data.caption_rules import normalize_caption
from rssqa.data.shards import shard_pipeline
from rssqa.models.captioner import is_captioner
from rssqa.tasks.purify.config import FitConfig


# ============================================================================================ fitting
class PairFit(L.LightningModule):
    """Fit an open_clip CLIP (contrastive loss) or CoCa (contrastive + captioning loss) on pairs.

    Batches are ``(images B×3×S×S float32, tokens B×T int64)``. The contrastive loss gathers the
    features of all DDP ranks (open_clip's ``ClipLoss`` with ``local_loss``), as open_clip trains.
    """

    def __init__(self, model: torch.nn.Module, cfg: FitConfig, name: str = "filter"):
        super().__init__()
        self.model, self.cfg, self.name = model, cfg, name
        self.loss: torch.nn.Module | None = None

    def setup(self, stage: str) -> None:
        kw = {"local_loss": True, "gather_with_grad": True, "rank": self.global_rank, "world_size": self.trainer.world_size}
        if is_captioner(self.model):
            self.loss = open_clip.CoCaLoss(self.cfg.caption_loss_weight, self.cfg.clip_loss_weight, **kw)
        else:
            self.loss = open_clip.ClipLoss(**kw)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        out = self.model(images, tokens)
        if is_captioner(self.model):
            clip_loss, caption_loss = self.loss(
                out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
            )
            loss = clip_loss + caption_loss
            self.log(f"{self.name}/caption_loss", caption_loss, prog_bar=True)
        else:
            feats = out if isinstance(out, dict) else dict(zip(("image_features", "text_features", "logit_scale"), out, strict=False))
            loss = self.loss(feats["image_features"], feats["text_features"], feats["logit_scale"])
        self.log(f"{self.name}/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # as open_clip: the temperature may not exceed 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "logit_scale" in n or "embedding" in n else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        warm = max(1, int(self.cfg.warmup * self.cfg.steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.cfg.steps - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


_PHRASE_BREAK = re.compile(r",\s*|\s+(?:with|and|showing|including)\s+|;\s*")


def sub_caption(text: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of the phrases of ``text``, in their order, joined by commas.

    Phrases are what commas, semicolons and "with" / "and" / "showing" / "including" separate:
    ``"An aerial image of a town with 12 houses and some trees."`` may become ``"12 houses"`` or
    ``"An aerial image of a town, some trees"``. A caption of one phrase comes back unchanged.
    """
    phrases = [p.strip(" .") for p in _PHRASE_BREAK.split(text.strip()) if p.strip(" .")]
    if len(phrases) < 2:
        return text
    keep = rng.random(len(phrases)) < 0.5
    if not keep.any():
        keep[rng.integers(len(phrases))] = True
    return ", ".join(p for p, k in zip(phrases, keep, strict=True) if k)


class _TrainMap:
    """Worker-side map of a decoded sample to ``(image tensor, tokens)``: random dihedral symmetry of the
    image, phrase dropout of the caption."""

    def __init__(self, preprocess: Callable, tokenizer: Callable, augment: bool, phrase_dropout: float):
        self.preprocess, self.tokenizer, self.augment, self.phrase_dropout = preprocess, tokenizer, augment, phrase_dropout
        self.rng: np.random.Generator | None = None

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rng is None:  # one stream per worker, seeded from the DataLoader's (seeded) base seed
            info = get_worker_info()
            self.rng = np.random.default_rng(info.seed if info is not None else torch.initial_seed())
        image, text = sample["image"], normalize_caption(sample["txt"])
        if self.augment:
            k = int(self.rng.integers(8))
            image = np.ascontiguousarray(np.rot90(image, k % 4)[:, ::-1] if k >= 4 else np.rot90(image, k % 4))
        if self.phrase_dropout and self.rng.random() < self.phrase_dropout:
            text = sub_caption(text, self.rng)
        return self.preprocess(Image.fromarray(image)), self.tokenizer([text])[0]


def pair_loader(urls: Sequence[str], preprocess: Callable, tokenizer: Callable, cfg: FitConfig, seed: int,
                phrase_dropout: float | None = None) -> DataLoader:  # fmt: skip
    """An endless, reproducible stream of training batches drawn from ``urls`` (resampled shards).

    ``phrase_dropout`` overrides the config's (the captioner learns from whole captions only).
    """
    drop = cfg.phrase_dropout if phrase_dropout is None else phrase_dropout
    pipeline = shard_pipeline(
        list(urls), resampled=True, shuffle=cfg.shuffle, seed=seed, map_fn=_TrainMap(preprocess, tokenizer, cfg.augment, drop)
    )
    return DataLoader(pipeline, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True)
