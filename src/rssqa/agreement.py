"""Agreement between segmentation methods: label-free evidence of where a method is wrong.

Where several methods segment the same image, a pixel on which the others agree with a method is
more likely right (the consensus idea of quality control by agreement between candidate masks). For
each method ``m`` of an image and each pixel, from the other methods ``k != m``:

- ``share``: the share of the others that predict ``m``'s class;
- ``majority``: 1 where the others' majority vote (ties to the lowest class index) is ``m``'s class;
- ``support``: the mean probability the others give to ``m``'s class.

Pooled to the ``g×g`` cell grid (``agree_maps``, ``B×3×g×g``) and to per-image means
(``agree_global``, ``B×3``). Two label-free baselines read the means: ``agreement`` (mean pairwise
pixel agreement with the others = mean ``share``) and ``consensus`` (agreement with the others'
majority = mean ``majority``). Pure functions, no training.

Weighted by how good the others are (:func:`quality_agreement_maps`): with a predicted quality per
(image, method) from an image-level quality head, the others' votes count in proportion to
``quality ** power``: ``q_share`` (the others' weighted share that predict ``m``'s class) and
``q_support`` (their weighted mean probability of ``m``'s class). A wrong majority of weak methods
then counts for less than one strong method that disagrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rssqa.errors import RSSQAError

AGREEMENT_NAMES = ("share", "majority", "support")
QUALITY_NAMES = ("q_share", "q_support")
BASELINES = ("agreement", "consensus")
MIN_METHODS = 3  # a method and at least two others: with one other, share and majority are the same


def _first_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest value along dim 1 and the lowest index holding it: ``B×C×H×W`` -> two ``B×H×W``.

    A loop over the (few) classes: faster on CPU than a reduction over a short strided axis, and its
    tie rule is explicit.
    """
    best = x[:, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.long, device=x.device)
    for k in range(1, x.shape[1]):
        better = x[:, k] > best
        best = torch.where(better, x[:, k], best)
        index.masked_fill_(better, k)
    return best, index


@torch.no_grad()
def agreement_maps(probs: Sequence[torch.Tensor], preds: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per-pixel agreement of each method with the others, at full resolution.

    Args:
        probs: one ``B×C×H×W`` class-probability tensor per method, same images in the same order.
        preds: each method's ``B×H×W`` arg-max class, when already computed (``Segmenter.describe``
            with ``keep_probs``); else the arg-max of ``probs`` (ties to the lowest class).

    Returns:
        One ``B×3×H×W`` float32 tensor per method, channels as :data:`AGREEMENT_NAMES`.
    """
    if len(probs) < MIN_METHODS:
        raise RSSQAError(f"agreement: needs at least {MIN_METHODS} methods on the same images, got {len(probs)}")
    shapes = {tuple(p.shape) for p in probs}
    if len(shapes) != 1:
        raise RSSQAError(f"agreement: the methods' probability maps differ in shape: {sorted(shapes)}")
    b = probs[0].shape[0]
    preds = [_first_max(p)[1] for p in probs] if preds is None else list(preds)
    votes = torch.zeros(probs[0].shape, dtype=torch.int16, device=probs[0].device)
    one = torch.ones((b, 1, *probs[0].shape[2:]), dtype=torch.int16, device=votes.device)
    for pred in preds:
        votes.scatter_add_(1, pred.unsqueeze(1), one)
    # the others' majority (ties to the lowest class) is a method's class only where that class leads
    # all votes and still leads, or ties first, once the method's own vote is taken away
    c1, i1 = _first_max(votes)
    c2, i2 = _first_max(votes.scatter(1, i1.unsqueeze(1), -1))
    leader_holds = (c1 - 1 > c2) | ((c1 - 1 == c2) & (i1 < i2))
    prob_sum = probs[0].float().clone()
    for p in probs[1:]:
        prob_sum += p.float()
    others = len(probs) - 1
    maps = []
    for pred, p in zip(preds, probs, strict=True):
        idx = pred.unsqueeze(1)
        share = (votes.gather(1, idx).squeeze(1) - 1).float() / others
        majority = ((pred == i1) & leader_holds).float()
        support = (prob_sum.gather(1, idx) - p.float().gather(1, idx)).squeeze(1) / others
        maps.append(torch.stack([share, majority, support], 1))
    return maps


@torch.no_grad()
def agreement_statistics(
    probs: Sequence[torch.Tensor], grid: int = 4, preds: Sequence[torch.Tensor] | None = None,
    keep_maps: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per-pixel agreement of each method with the others (:func:`agreement_maps`), pooled.

    Args:
        probs: one ``B×C×H×W`` class-probability tensor per method, same images in the same order.
        grid: side ``g`` of the pooled maps.
        preds: each method's ``B×H×W`` arg-max class, when already computed.
        keep_maps: also return ``pixels``, the full-resolution ``B×3×H×W`` maps (what the pixel
            error head reads).

    Returns:
        One dict per method: ``agree_maps`` ``B×3×g×g`` and ``agree_global`` ``B×3`` (float32, in
        [0, 1], channels as :data:`AGREEMENT_NAMES`), ``agreement`` and ``consensus`` ``B``.
    """
    maps = agreement_maps(probs, preds)
    b = probs[0].shape[0]
    pooled = F.adaptive_avg_pool2d(torch.cat(maps), grid).split(b)
    out = []
    for cells, full in zip(pooled, maps, strict=True):
        glob = full.mean(dim=(2, 3))
        one = {"agree_maps": cells, "agree_global": glob, "agreement": glob[:, 0], "consensus": glob[:, 1]}
        out.append({**one, "pixels": full} if keep_maps else one)
    return out


@torch.no_grad()
def quality_agreement_maps(
    probs: Sequence[torch.Tensor], preds: Sequence[torch.Tensor], quality: torch.Tensor, power: float,
    which: torch.Tensor | None = None,
) -> list[torch.Tensor] | torch.Tensor:
    """Per-pixel agreement of each method with the others, each other weighted by its predicted quality.

    Args:
        probs: one ``B×C×H×W`` class-probability tensor per method (``M`` of them), same images.
        preds: each method's ``B×H×W`` arg-max class.
        quality: ``B×M`` predicted quality (overall accuracy) of each method on each image.
        power: the weights are ``max(quality, 1e-3) ** power`` over the others, normalised per image.
        which: ``B`` method indices: the maps of that one method per image only (what a scene's
            error map needs: each window's chosen method), as one ``B×2×H×W`` tensor.

    Returns:
        One ``B×2×H×W`` float32 tensor per method, channels as :data:`QUALITY_NAMES` (one tensor for
        the methods ``which`` names).
    """
    m = len(probs)
    if m < MIN_METHODS:
        raise RSSQAError(f"quality-weighted agreement: needs at least {MIN_METHODS} methods, got {m}")
    if len(preds) != m or tuple(quality.shape) != (probs[0].shape[0], m):
        raise RSSQAError(
            f"quality-weighted agreement: {m} probability maps, {len(preds)} class maps and quality "
            f"{tuple(quality.shape)}; expected B x {m} for B = {probs[0].shape[0]}"
        )
    w = quality.float().to(probs[0].device).clamp(1e-3, 1.0).pow(power)  # B×M
    if which is None:
        return [_weighted_votes(probs, preds, w, j, slice(None)) for j in range(m)]
    out = torch.zeros((len(w), 2, *preds[0].shape[1:]), device=w.device)
    for j in which.unique().tolist():
        rows = (which == j).nonzero().squeeze(1).to(w.device)
        out[rows] = _weighted_votes(probs, preds, w, j, rows)
    return out


def _weighted_votes(probs: Sequence[torch.Tensor], preds: Sequence[torch.Tensor], w: torch.Tensor, j: int, rows) -> torch.Tensor:
    """``q_share, q_support`` of method ``j`` on images ``rows``: ``b×2×H×W``."""
    others = w[rows].clone()
    others[:, j] = 0
    others = others / others.sum(1, keepdim=True)
    mine = preds[j][rows]
    idx = mine.unsqueeze(1)
    share = torch.zeros(mine.shape, device=w.device)
    support = torch.zeros(mine.shape, device=w.device)
    for k in range(len(probs)):
        if k == j:
            continue
        wk = others[:, k].view(-1, 1, 1)
        share += wk * (preds[k][rows] == mine).float()
        support += wk * probs[k][rows].float().gather(1, idx).squeeze(1)
    return torch.stack([share, support], 1)
