"""What the RS-SQA quality head reads for an (image, method): one implementation for every stage.

RS-SQED labelling (``rssqa.tasks.sqed``), the sqa data module (``rssqa.tasks.sqa``) and the deployed
scorer (:mod:`rssqa.scorer`) all go through this module, so a cached input and a live one are the
same numbers (a test holds them equal, tensor for tensor):

- :func:`semantic_features`: the frozen CLIP-RS pooled embedding and last-layer patch tokens of
  ``N×H×W×3`` uint8 images;
- :func:`method_statistics`: what a segmentation method reports about its own result on an image
  (logits, pooled intermediate features, probability statistics; what RS-SQED caches);
- :func:`segmentation_inputs`: those statistics, live or cached, turned into the head's
  method-agnostic inputs (``seg_cells``, ``seg_global``) and, for per-method adapters, ``seg_feats``;
- :class:`QualityInputs`: the three together, configured once (layers, class-profile length,
  forward batch sizes), returning every input of the head for a batch of images and methods.

Encoders run in chunks of exactly ``chunk`` images (the last one zero-padded): an image's numbers are
then bit-identical alone or among others, which CPU kernels do not promise across batch sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rssqa.agreement import agreement_statistics
from rssqa.errors import RSSQAError

MAP_NAMES = ("max_prob", "certainty", "margin")
DESCRIPTOR_NAMES = ("energy", "to_mean", "coherence")
HIST_NAMES = ("hist_conf", "hist_certainty", "hist_margin")
SCALAR_NAMES = ("msp", "entropy", "margin")
_ON_DEVICE = ("logits", "probs", "pred")  # per-pixel outputs of method_statistics, left where they were made
IMAGE_BLOCK = 256  # images preprocessed at once for CLIP: bounds memory, not part of the numerics


# --------------------------------------------------------------------------------------- semantics
@torch.no_grad()
def clip_image_features(clip: nn.Module, images: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embedding and last-layer patch tokens of an open_clip model, batch-invariant.

    Args:
        clip: an open_clip ``CLIP`` (any visual tower with ``forward_intermediates``).
        images: ``B×3×S×S`` images, normalised the way the model's preprocessing does
            (``rssqa.models.clip.to_model_input``).
        chunk: forward batch size; part of the numerics.

    Returns:
        ``(embed B×E L2-normalised, tokens B×T×h×w)``, float32 on the CPU.
    """
    was_training = clip.training
    clip.eval()
    embeds, tokens = [], []
    try:
        for start in range(0, len(images), chunk):
            x = _padded(images[start : start + chunk], chunk)
            n = min(chunk, len(images) - start)
            out = clip.forward_intermediates(
                image=x, image_indices=1, normalize=True, normalize_intermediates=True, image_output_fmt="NCHW"
            )
            embeds.append(out["image_features"][:n].float().cpu())
            tokens.append(out["image_intermediates"][-1][:n].float().cpu())
    finally:
        clip.train(was_training)
    if not embeds:
        raise RSSQAError("clip features: no images")
    return torch.cat(embeds), torch.cat(tokens)


def semantic_features(clip: nn.Module, images: np.ndarray | torch.Tensor, chunk: int = 16) -> dict[str, torch.Tensor]:
    """CLIP inputs of the head for raw pixels.

    Args:
        clip: the frozen CLIP-RS (open_clip).
        images: ``N×H×W×3`` uint8 pixels of one size.
        chunk: CLIP forward batch (part of the numerics: training and scoring use the same).

    Returns:
        ``embed`` ``N×E`` and ``tokens`` ``N×T×h×w``, float32 on the CPU.
    """
    from rssqa.models.clip import to_model_input

    embeds, tokens = [], []
    for start in range(0, len(images), IMAGE_BLOCK):
        part = images[start : start + IMAGE_BLOCK]
        x = to_model_input(clip, np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part)
        e, t = clip_image_features(clip, x, chunk)
        embeds.append(e)
        tokens.append(t)
    if not embeds:
        raise RSSQAError("clip features: no images")
    return {"embed": torch.cat(embeds), "tokens": torch.cat(tokens)}


# ------------------------------------------------------------------------------ method statistics
@torch.no_grad()
def method_statistics(
    segmenter: nn.Module, images: torch.Tensor, chunk: int | None = None, keep_probs: bool = False,
    tile_pixels: int | None = None,
) -> dict[str, torch.Tensor]:
    """Segment ``images`` and summarise the result: what RS-SQED caches per (image, method).

    Args:
        segmenter: a :class:`rssqa.models.segmenters.Segmenter` (its ``describe``).
        images: ``B×3×H×W`` in [0, 1].
        chunk: forward batch size (part of the numerics; ``None``: the whole batch at once).
        keep_probs: also return ``probs`` and ``pred``, the softmax and its arg-max (what
            :func:`agreement_inputs` reads).
        tile_pixels: pixels of the largest tile ``chunk`` was set for: larger images run in smaller
            batches (:func:`forward_rows`), down to one image (``None``: always ``chunk``).

    Returns:
        ``logits`` ``B×C×H×W`` (and ``probs``, ``pred``) on the segmenter's device; every other
        quantity of ``describe`` (``feat/<layer>``, probability statistics) as float32 on the CPU.
    """
    chunk = forward_rows(images.shape[-2:], chunk or len(images), tile_pixels)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(images), chunk):
        n = min(chunk, len(images) - start)
        # contiguous: a channels-last view (pixels straight from H×W×3 arrays) runs other conv kernels
        out = segmenter.describe(_padded(images[start : start + chunk], chunk).contiguous(), keep_probs=keep_probs)
        parts.append({k: v[:n] if k in _ON_DEVICE else v[:n].float().cpu() for k, v in out.items()})
    if not parts:
        raise RSSQAError("method statistics: no images")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def forward_rows(size: Sequence[int], chunk: int, tile_pixels: int | None = None) -> int:
    """The padded forward batch of images of ``size`` ``(H, W)``: ``chunk``, or fewer where ``chunk`` of
    them would hold more pixels than ``chunk`` tiles of ``tile_pixels`` (at least one; ``None``: no
    limit). It depends on the size alone, so an image gives the same numbers alone or in any batch;
    the tiles RS-SQED labelled keep ``chunk``."""
    if tile_pixels is None:
        return chunk
    return max(1, min(chunk, chunk * tile_pixels // max(1, int(size[0]) * int(size[1]))))


def agreement_inputs(
    statistics: Sequence[dict[str, torch.Tensor]], grid: int, keep_maps: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Each method's agreement with the others, from their :func:`method_statistics` with
    ``keep_probs`` (which it pops): ``agree_maps`` ``B×A×g×g`` and ``agree_global`` ``B×A`` on the CPU
    (with ``keep_maps``, also ``agree_pixels``, the full-resolution ``B×A×H×W`` maps, left on their device).

    RS-SQED's agreement pass and the scorer both call this, so the cached and live values agree.
    """
    probs = [s.pop("probs") for s in statistics]
    preds = [s.pop("pred") for s in statistics]
    return [
        {"agree_maps": a["agree_maps"].cpu(), "agree_global": a["agree_global"].cpu(),
         **({"agree_pixels": a["pixels"]} if keep_maps else {})}
        for a in agreement_statistics(probs, grid, preds, keep_maps=keep_maps)
    ]  # fmt: skip


# ------------------------------------------------------------------------------ segmentation inputs
def feature_descriptors(feat: torch.Tensor) -> torch.Tensor:
    """Channel-count-free descriptors of pooled features, so one adapter reads every method.

    Args:
        feat: ``B×C×g×g`` pooled intermediate features (any ``C``).

    Returns:
        ``B×3×g×g``: ``energy`` (cell feature norm over the image's mean norm), ``to_mean`` (cosine of
        the cell's feature with the image's mean feature) and ``coherence`` (mean cosine with the
        4-neighbour cells): how strong, how typical and how locally consistent the representation is.
    """
    f = feat.float()
    norm = f.norm(dim=1)
    energy = norm / (norm.mean(dim=(1, 2), keepdim=True) + 1e-6)
    unit = f / (norm.unsqueeze(1) + 1e-6)
    mean_dir = F.normalize(f.mean(dim=(2, 3)), dim=1)
    to_mean = (unit * mean_dir[:, :, None, None]).sum(1)
    horiz = (unit[..., :, 1:] * unit[..., :, :-1]).sum(1)  # B×g×(g-1)
    vert = (unit[..., 1:, :] * unit[..., :-1, :]).sum(1)  # B×(g-1)×g
    total = torch.zeros_like(norm)
    count = torch.zeros_like(norm)
    total[..., :, 1:] += horiz
    total[..., :, :-1] += horiz
    total[..., 1:, :] += vert
    total[..., :-1, :] += vert
    count[..., :, 1:] += 1
    count[..., :, :-1] += 1
    count[..., 1:, :] += 1
    count[..., :-1, :] += 1
    coherence = total / count.clamp_min(1)
    return torch.stack([energy, to_mean, coherence], dim=1)


def _f32(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float32)


def _as_cached(x: Any) -> torch.Tensor:
    # RS-SQED stores maps and features in float16; round fresh ones the same way, so a scored image
    # sees exactly the numbers the model was trained on.
    return _f32(x).to(torch.float16).to(torch.float32)


def _sorted_padded(x: torch.Tensor, width: int) -> torch.Tensor:
    # class identities differ between sources; the sorted profile does not
    x = x.sort(dim=1, descending=True).values[:, :width]
    return F.pad(x, (0, width - x.shape[1]))


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` zero-padded along the batch axis to ``rows`` (the fixed forward batch)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


def segmentation_input_dims(layers: Sequence[str], hist_bins: int, max_classes: int) -> tuple[int, int]:
    """``(S, G)``: channels of ``seg_cells`` and ``seg_global`` from :func:`segmentation_inputs`."""
    return len(MAP_NAMES) + len(DESCRIPTOR_NAMES) * len(layers), len(SCALAR_NAMES) + 3 * hist_bins + 2 * max_classes + 1


def segmentation_inputs(
    stats: Mapping[str, Any],
    layers: Sequence[str] = ("encoder", "decoder"),
    max_classes: int = 8,
    feat_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """Turn what a segmenter reports (:func:`method_statistics` or an RS-SQED label shard) into head inputs.

    Args:
        stats: ``maps`` ``B×3×g×g``; ``feat/<layer>`` ``B×C_l×g×g``; ``msp``, ``entropy``, ``margin`` ``B``;
            ``hist_conf``, ``hist_certainty``, ``hist_margin`` ``B×K``; ``class_share``, ``mean_prob`` ``B×C``
            (tensors or arrays).
        layers: feature layers to read, in order.
        max_classes: length the sorted class profiles are padded or cut to.
        feat_dim: when > 0, also return the raw features of ``layers`` stacked and zero-padded to this
            many channels (for the per-method adapters).

    Returns:
        ``seg_cells`` ``B×S×g×g``, ``seg_global`` ``B×G`` (float32) and optionally ``seg_feats`` ``B×F×g×g``.
    """
    need = ["maps", *SCALAR_NAMES, *HIST_NAMES, "class_share", "mean_prob", *(f"feat/{k}" for k in layers)]
    missing = [k for k in need if k not in stats]
    if missing:
        raise RSSQAError(f"segmentation statistics: missing {missing}")
    feats = [_as_cached(stats[f"feat/{k}"]) for k in layers]
    cells = torch.cat([_as_cached(stats["maps"]), *(feature_descriptors(f) for f in feats)], dim=1)
    share = _f32(stats["class_share"])
    share_entropy = -(share * torch.log(share.clamp_min(1e-12))).sum(1, keepdim=True) / np.log(max(share.shape[1], 2))
    glob = torch.cat(
        [
            *(_f32(stats[k]).reshape(-1, 1) for k in SCALAR_NAMES),
            *(_f32(stats[k]) for k in HIST_NAMES),
            _sorted_padded(share, max_classes),
            _sorted_padded(_f32(stats["mean_prob"]), max_classes),
            share_entropy,
        ],
        dim=1,
    )
    out = {"seg_cells": cells, "seg_global": glob}
    if feat_dim > 0:
        raw = torch.cat(feats, dim=1)
        if raw.shape[1] > feat_dim:
            raise RSSQAError(f"sqa.feat_dim: {feat_dim} is narrower than the {raw.shape[1]} feature channels of {list(layers)}")
        out["seg_feats"] = F.pad(raw, (0, 0, 0, 0, 0, feat_dim - raw.shape[1]))
    return out


# ------------------------------------------------------------------------------------------ bundle
@dataclass(frozen=True)
class QualityInputs:
    """Every input of the quality head, configured once for training and scoring.

    Args:
        layers: segmenter feature layers the segmentation branch reads.
        max_classes: length of the sorted class profiles.
        feat_dim: raw feature width of the per-method adapters (0: none).
        clip_chunk: CLIP forward batch (part of the numerics).
        seg_chunk: segmenter forward batch (part of the numerics; RS-SQED labelling records its own).
        grid: cell grid of the agreement maps (the label grid).
        tile_pixels: pixels of the largest training tile (``None``: no limit): an image larger than the
            tiles runs in fewer rows than ``seg_chunk`` (:func:`forward_rows`) instead of padded to
            ``seg_chunk`` copies' worth of work and memory; the scorer sets it.
    """

    layers: tuple[str, ...] = ("encoder", "decoder")
    max_classes: int = 8
    feat_dim: int = 0
    clip_chunk: int = 16
    seg_chunk: int = 16
    grid: int = 4
    tile_pixels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for key in ("clip_chunk", "seg_chunk", "max_classes"):
            if getattr(self, key) < 1:
                raise RSSQAError(f"{key}: must be positive, got {getattr(self, key)}")

    def semantics(self, clip: nn.Module, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """:func:`semantic_features` of ``N×H×W×3`` uint8 images."""
        return semantic_features(clip, images, self.clip_chunk)

    def statistics(self, segmenter: nn.Module, images01: torch.Tensor, keep_probs: bool = False) -> dict[str, torch.Tensor]:
        """:func:`method_statistics` of ``B×3×H×W`` images in [0, 1]."""
        return method_statistics(segmenter, images01, self.seg_chunk, keep_probs, self.tile_pixels)

    def segmentation(self, stats: Mapping[str, Any], feat_dim: int | None = None) -> dict[str, torch.Tensor]:
        """:func:`segmentation_inputs` of live or cached statistics (``feat_dim`` overrides the configured one)."""
        return segmentation_inputs(stats, self.layers, self.max_classes, self.feat_dim if feat_dim is None else feat_dim)

    def __call__(
        self,
        images: np.ndarray,
        segmenters: Sequence[nn.Module],
        clip: nn.Module | None = None,
        feat_dims: Sequence[int] | None = None,
        agreement: bool = False,
        pixels: bool = False,
    ) -> dict[str, Any]:
        """Every head input for ``N×H×W×3`` uint8 images of one size and each of ``segmenters``.

        Args:
            images: ``N×H×W×3`` uint8 pixels.
            segmenters: the methods to judge.
            clip: the frozen CLIP-RS (``None``: no semantic inputs, e.g. for a segmentation-only head).
            feat_dims: raw feature width per segmenter (0 for a method without its own adapter);
                default: the configured ``feat_dim`` for every one.
            agreement: also each method's agreement with the others (``agree_maps``, ``agree_global``;
                :func:`rssqa.agreement.agreement_statistics`, at least three segmenters).
            pixels: also each method's per-pixel outputs under ``pixels`` (``probs`` ``N×C×H×W``,
                ``pred`` ``N×H×W`` and, with ``agreement``, ``agree`` ``N×3×H×W``): what the
                pixel error head (:mod:`rssqa.models.pixel_error`) and a fused map read. Computed in
                the same forward pass as the statistics.

        Returns:
            ``sem_embed`` ``N×E`` and ``sem_tokens`` ``N×T×h×w`` (when ``clip`` is given), and
            ``methods``: one dict per segmenter with ``seg_cells``, ``seg_global`` (and ``seg_feats``,
            ``agree_maps``, ``agree_global``).
        """
        out: dict[str, Any] = {}
        if clip is not None:
            sem = self.semantics(clip, images)
            out.update(sem_embed=sem["embed"], sem_tokens=sem["tokens"])
        x01 = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        dims = list(feat_dims) if feat_dims is not None else [self.feat_dim] * len(segmenters)
        stats = [self.statistics(seg, x01.to(_device_of(seg)), keep_probs=agreement or pixels) for seg in segmenters]
        kept = [{"probs": s["probs"], "pred": s["pred"]} for s in stats] if pixels else []
        agree = agreement_inputs(stats, self.grid, keep_maps=pixels) if agreement else [{} for _ in stats]
        for s in stats:  # without agreement the kept softmax is not an input of the head
            s.pop("probs", None), s.pop("pred", None)
        out["methods"] = [
            {**self.segmentation(s, dim), **{k: v for k, v in a.items() if k != "agree_pixels"}}
            for s, dim, a in zip(stats, dims, agree, strict=True)
        ]
        if pixels:
            for k, a in zip(kept, agree, strict=True):
                if "agree_pixels" in a:
                    k["agree"] = a["agree_pixels"]
            out["pixels"] = kept
        return out


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
