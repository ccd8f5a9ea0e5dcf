"""Training objective of RS-SQA: regression to OA, a PLCC term and a pairwise ranking term.

Each term has a weight in config and is switched off by a weight of 0 (the paper ablates its loss
terms). The ranking term looks at every pair of rows in the batch whose OA differs by more than
``rank_min_gap``; a second ranking term looks only at pairs of methods on the same image, which is
what recommendation needs (in a batch of ``k`` images with ``m`` methods each, only about ``1/k`` of
all pairs are such pairs, so the first term alone hardly sees them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rssqa.errors import RSSQAError


def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(1 - Pearson(pred, target)) / 2`` over a batch, in [0, 1]; 0 for a batch that cannot correlate.

    Args:
        pred: ``N`` predicted scores.
        target: ``N`` true OA.
    """
    if pred.numel() < 2:
        return pred.sum() * 0.0
    p = pred - pred.mean()
    t = target - target.mean()
    denom = p.norm() * t.norm()
    if float(denom.detach()) < 1e-8:
        return pred.sum() * 0.0
    return (1.0 - (p * t).sum() / denom) / 2.0


def pairwise_rank_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor | None = None,
    min_gap: float = 0.0,
    scale: float = 20.0,
) -> torch.Tensor:
    """Logistic loss on ordered pairs: for OA_i > OA_j + min_gap, ``softplus(-scale * (s_i - s_j))``.

    Args:
        pred: ``N`` predicted scores.
        target: ``N`` true OA.
        groups: ``N`` integer group ids; pairs only within a group (same image) when given.
        min_gap: OA difference below which a pair is not ordered (label noise).
        scale: sharpness, in inverse score units.

    Returns:
        Mean loss over ordered pairs (0 when there are none).
    """
    better = (target.unsqueeze(1) - target.unsqueeze(0)) > min_gap  # [i, j]: i should score above j
    if groups is not None:
        better &= groups.unsqueeze(1) == groups.unsqueeze(0)
    if not bool(better.any()):
        return pred.sum() * 0.0
    diff = pred.unsqueeze(1) - pred.unsqueeze(0)
    return F.softplus(-scale * diff[better]).mean()


def listwise_loss(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, temperature: float = 0.02, scale: float = 20.0) -> torch.Tensor:
    """ListNet loss within groups (the methods of one image): cross-entropy between the softmax of the
    true OA (``OA / temperature``) and the softmax of the scores (``scale * score``), averaged over groups
    of two or more rows. It asks for the right order of an image's methods, the best first, which is
    what a recommendation needs; a score offset shared by the image does not matter to it.

    Args:
        pred: ``N`` predicted scores.
        target: ``N`` true OA.
        groups: ``N`` integer group ids.
        temperature: OA difference that makes a method about e times as likely the best.
        scale: sharpness of the predicted distribution, in inverse score units.
    """
    ids, inv = torch.unique(groups, return_inverse=True)
    n_groups = len(ids)
    counts = torch.zeros(n_groups, device=pred.device).index_add_(0, inv, torch.ones_like(pred))
    if not bool((counts > 1).any()):
        return pred.sum() * 0.0

    def log_softmax_in_groups(x: torch.Tensor) -> torch.Tensor:
        top = torch.full((n_groups,), -torch.inf, device=x.device, dtype=x.dtype).scatter_reduce(0, inv, x, "amax")
        e = torch.exp(x - top[inv])
        return x - top[inv] - torch.log(torch.zeros(n_groups, device=x.device, dtype=x.dtype).index_add_(0, inv, e))[inv]

    p_true = torch.exp(log_softmax_in_groups(target.to(pred.dtype) / temperature))
    ce = -(p_true * log_softmax_in_groups(scale * pred))
    per_group = torch.zeros(n_groups, device=pred.device, dtype=pred.dtype).index_add_(0, inv, ce)
    return per_group[counts > 1].mean()


class SQALoss(nn.Module):
    """Weighted sum of MSE to OA, PLCC and pairwise ranking terms.

    Args:
        w_mse: weight of the mean squared error to OA.
        w_plcc: weight of :func:`plcc_loss`.
        w_rank: weight of :func:`pairwise_rank_loss` over every pair in the batch.
        w_rank_image: weight of :func:`pairwise_rank_loss` over pairs of methods on the same image.
        rank_min_gap: OA gap below which a pair is not used for ranking.
        rank_scale: sharpness of the ranking term.
        w_list: weight of :func:`listwise_loss` over the methods of each image (0: off).
        list_temperature: OA temperature of the listwise target.
    """

    def __init__(
        self,
        w_mse: float = 1.0,
        w_plcc: float = 0.5,
        w_rank: float = 0.5,
        w_rank_image: float = 0.0,
        rank_min_gap: float = 0.0,
        rank_scale: float = 20.0,
        w_list: float = 0.0,
        list_temperature: float = 0.02,
    ):
        super().__init__()
        if min(w_mse, w_plcc, w_rank, w_rank_image, w_list) < 0 or w_mse + w_plcc + w_rank + w_rank_image + w_list == 0:
            raise RSSQAError("sqa.loss: weights must be >= 0 and not all 0")
        if list_temperature <= 0:
            raise RSSQAError(f"sqa.loss: list_temperature must be > 0, got {list_temperature}")
        self.w_mse, self.w_plcc, self.w_rank = w_mse, w_plcc, w_rank
        self.w_list, self.list_temperature = w_list, list_temperature
        self.w_rank_image, self.rank_min_gap, self.rank_scale = w_rank_image, rank_min_gap, rank_scale

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, image_idx: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms for ``N`` predictions and targets; ``image_idx`` ``N`` for the same-image terms.

        Returns:
            ``{"loss", "mse", "plcc", "rank", "rank_image", "list"}`` (terms unweighted, ``loss`` weighted).
        """
        zero = pred.sum() * 0.0
        terms = {
            "mse": F.mse_loss(pred, target) if self.w_mse else zero,
            "plcc": plcc_loss(pred, target) if self.w_plcc else zero,
            "rank": pairwise_rank_loss(pred, target, None, self.rank_min_gap, self.rank_scale) if self.w_rank else zero,
            "rank_image": pairwise_rank_loss(pred, target, image_idx, self.rank_min_gap, self.rank_scale)
            if self.w_rank_image and image_idx is not None
            else zero,
        }
        terms["list"] = (
            listwise_loss(pred, target, image_idx, self.list_temperature, self.rank_scale)
            if self.w_list and image_idx is not None
            else zero
        )
        terms["loss"] = (
            self.w_mse * terms["mse"]
            + self.w_plcc * terms["plcc"]
            + self.w_rank * terms["rank"]
            + self.w_rank_image * terms["rank_image"]
            + self.w_list * terms["list"]
        )
        return terms
