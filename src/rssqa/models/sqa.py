"""RS-SQA: semantic features of a frozen CLIP-RS gate the segmentation method's own features.

Two branches meet on a ``g×g`` grid of cells (``L = g*g`` tokens of width ``w``):

- semantic branch: the CLIP-RS pooled image embedding (``B×E``) and its last-layer patch tokens
  (``B×T×h×w``, resampled to ``g×g``), projected to ``w``. The CLIP encoder itself is frozen and lives
  outside this module (:mod:`rssqa.models.quality_inputs` computes what the head reads, live or cached).
- segmentation branch: method-agnostic inputs through one shared adapter (per-cell descriptors
  ``B×S×g×g`` such as confidence, margin and entropy maps and channel-count-free statistics of the
  method's intermediate features, plus per-image statistics ``B×G`` such as the confidence histogram),
  so that a method never seen in training can still be scored; optionally, per-method adapters on the
  method's raw pooled features (``B×F×g×g``, zero-padded to the widest method).

They meet in a Simple Cross-Gating Block (the simplified cross-gating of COVER): project both,
``gate = GELU(projected semantics)``, ``out = seg + proj(proj(seg) * gate)``; then mean pooling over cells,
a two-layer MLP and a sigmoid give a score in (0, 1) that predicts OA. Ablation variants replace the
block by plain concatenation (``no_gating``) or drop a branch (``image_only``, ``seg_only``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rssqa.agreement import AGREEMENT_NAMES
from rssqa.errors import RSSQAError

Variant = Literal["full", "no_gating", "image_only", "seg_only"]
VARIANTS: tuple[str, ...] = ("full", "no_gating", "image_only", "seg_only")


class CrossGating(nn.Module):
    """Simple Cross-Gating Block: semantics gate segmentation features, with a residual.

    Args:
        width: token width ``w`` of both inputs.
    """

    def __init__(self, width: int):
        super().__init__()
        self.proj_sem = nn.Linear(width, width)
        self.proj_seg = nn.Linear(width, width)
        self.proj_out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, seg: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
        """Gate ``seg`` (``B×L×w``) by ``sem`` (``B×L×w``); returns ``B×L×w``."""
        gate = F.gelu(self.proj_sem(sem))
        return self.norm(seg + self.proj_out(self.proj_seg(seg) * gate))


class Concat(nn.Module):
    """The no-gating ablation: concatenate both branches per cell and mix with one layer."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, seg: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
        """``B×L×w`` twice -> ``B×L×w``."""
        return self.norm(seg + F.gelu(self.mix(torch.cat([seg, sem], dim=-1))))


CONSTANT = 1e-6  # a training-split standard deviation below this: the channel is constant there


def safe_scale(std: torch.Tensor) -> torch.Tensor:
    """Standard deviations to divide by: 1 where a channel is constant on the training split.

    Dividing by a floored spread instead turns any later departure from the constant into a huge
    input: the seventh-largest class share is 0 on every image of a source with six classes, and an
    image of a source with seven came out 59,000 standard deviations away, which pinned the head's
    output to one value on that source (leave one source out, LoveDA held out). Centred but not
    scaled, such a channel contributes what it measures.
    """
    return torch.where(std < CONSTANT, torch.ones_like(std), std)


class Standardize(nn.Module):
    """Fixed per-channel standardisation with statistics measured on the training split.

    The statistics are buffers, so they travel with the checkpoint and scoring never depends on the
    batch (unlike batch norm in training mode).
    """

    def __init__(self, channels: int, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-channel mean and std; a channel with no spread on the training split is centred,
        not scaled (:func:`safe_scale`)."""
        self.mean.copy_(mean.detach().reshape(-1).to(self.mean))
        self.std.copy_(safe_scale(std.detach().reshape(-1).to(self.std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return (x - self.mean.view(shape)) / self.std.view(shape)


_NEEDS_AGREEMENT = "sqa: this head reads agreement between methods; score a method among at least 3"


class RSSQA(nn.Module):
    """The RS-SQA quality head (everything after the frozen encoders).

    Args:
        embed_dim: CLIP pooled embedding width ``E``.
        token_dim: CLIP patch token width ``T``.
        cell_dim: method-agnostic per-cell descriptor channels ``S``.
        global_dim: method-agnostic per-image statistics ``G``.
        grid: cells per side ``g`` of the segmentation branch (semantic tokens are resampled to it).
        width: common token width ``w``.
        hidden: hidden units of the two-layer MLP.
        variant: ``full`` (cross-gating), ``no_gating``, ``image_only`` or ``seg_only``.
        methods: method names with their own adapter (empty: shared adapter only).
        feat_dim: channels ``F`` of the zero-padded raw method features the per-method adapters read.
        dropout: dropout before the last layer.
        agreement: the segmentation branch also reads the method's agreement with the other methods
            of the image (``agree_maps`` ``B×A×g×g`` beside the cell descriptors, ``agree_global`` ``B×A``
            beside the global statistics; :mod:`rssqa.agreement`). Not in the paper: a variant.
        agreement_skip: with ``agreement``, the per-image agreement also reaches the output logit by a
            linear term of its own (starting at zero), so that a small training set can lean on the
            agreement directly instead of only through the fused tokens.
    """

    def __init__(
        self,
        embed_dim: int,
        token_dim: int,
        cell_dim: int,
        global_dim: int,
        grid: int = 4,
        width: int = 64,
        hidden: int = 64,
        variant: Variant = "full",
        methods: tuple[str, ...] | list[str] = (),
        feat_dim: int = 0,
        dropout: float = 0.1,
        agreement: bool = False,
        agreement_skip: bool = False,
    ):
        super().__init__()
        if agreement_skip and not agreement:
            raise RSSQAError("sqa.agreement_skip: needs the agreement inputs (agreement: true)")
        if variant not in VARIANTS:
            raise RSSQAError(f"sqa.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if methods and feat_dim <= 0:
            raise RSSQAError("sqa.feat_dim: per-method adapters need the raw feature width (> 0)")
        self.variant, self.grid, self.width = variant, grid, width
        self.methods = list(methods)
        self.uses_sem = variant != "seg_only"
        self.uses_seg = variant != "image_only"

        self.norm_embed = Standardize(embed_dim, channel_dim=1)
        self.norm_tokens = Standardize(token_dim, channel_dim=1)
        self.norm_cells = Standardize(cell_dim, channel_dim=1)
        self.norm_global = Standardize(global_dim, channel_dim=1)

        self.sem_tokens = nn.Linear(token_dim, width)
        self.sem_embed = nn.Linear(embed_dim, width)
        self.sem_norm = nn.LayerNorm(width)
        self.seg_cells = nn.Linear(cell_dim, width)
        self.seg_global = nn.Linear(global_dim, width)
        self.seg_norm = nn.LayerNorm(width)
        self.agreement = agreement
        if agreement:
            n = len(AGREEMENT_NAMES)
            self.norm_agree_maps = Standardize(n, channel_dim=1)
            self.norm_agree_global = Standardize(n, channel_dim=1)
            self.agree_cells = nn.Linear(n, width)
            self.agree_global = nn.Linear(n, width)
        self.agree_logit = nn.Linear(len(AGREEMENT_NAMES), 1) if agreement_skip else None
        if self.agree_logit is not None:  # starts as no term at all
            nn.init.zeros_(self.agree_logit.weight)
            nn.init.zeros_(self.agree_logit.bias)
        # per-method adapters as one batched weight: row m maps method m's padded features to w, plus a
        # per-method offset (what is typical of the method); both start at zero = the shared adapter alone
        self.method_weight = nn.Parameter(torch.zeros(len(self.methods), feat_dim, width)) if self.methods else None
        self.method_bias = nn.Parameter(torch.zeros(len(self.methods), width)) if self.methods else None
        # raw features are standardised per method: channel k of one method means nothing to another
        self.register_buffer("feat_mean", torch.zeros(len(self.methods), feat_dim))
        self.register_buffer("feat_std", torch.ones(len(self.methods), feat_dim))
        self.pos = nn.Parameter(torch.zeros(grid * grid, width))
        nn.init.normal_(self.pos, std=0.02)

        self.fuse: nn.Module | None = None
        if variant == "full":
            self.fuse = CrossGating(width)
        elif variant == "no_gating":
            self.fuse = Concat(width)
        self.head = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def set_output_prior(self, mean_oa: float) -> None:
        """Start the score at ``mean_oa`` (the last layer's bias at its logit, clipped to 0.01..0.99): a head
        trained for a few hundred steps then learns what sets a row apart from the typical one rather than
        first climbing from 0.5 to the typical OA, which an early-stopped or weight-averaged head would
        not finish (on the Dubai set, whose OA averages 0.77, it stopped at predictions 0.2 too low)."""
        p = min(max(float(mean_oa), 0.01), 0.99)
        with torch.no_grad():
            self.head[-1].bias.fill_(math.log(p / (1.0 - p)))

    def set_agreement_prior(self, agree_global: torch.Tensor, oa: torch.Tensor, steps: int = 100) -> None:
        """Start the score at the training rows' OA as the per-image agreement alone predicts it: the direct
        agreement term (``agreement_skip``) and the last layer's bias are fitted, by least squares on OA
        through the sigmoid, to ``agree_global`` ``B×A`` and ``oa`` ``B`` (the training split), so that the
        head begins as a calibrated vote of the other methods and learns what sets a row apart from it.
        Call after the input statistics are set (the fit reads the standardised agreement)."""
        if self.agree_logit is None:
            raise RSSQAError("sqa.agreement_prior: needs the direct agreement term (agreement_skip: true)")
        if len(oa) != len(agree_global) or len(oa) < 2:
            raise RSSQAError(f"sqa.agreement_prior: needs at least 2 rows of agreement and OA, got {len(agree_global)} and {len(oa)}")
        y = oa.double()
        with torch.no_grad():
            z = self.norm_agree_global(agree_global.double())
            p = y.clamp(0.01, 0.99).mean()
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.log(p / (1 - p)).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (torch.sigmoid(z @ w + b) - y).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            self.agree_logit.weight.copy_(w.detach().view_as(self.agree_logit.weight))
            self.agree_logit.bias.zero_()
            self.head[-1].bias.fill_(float(b.detach()))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-method standardisation of the raw features: ``M×F`` mean and std (measured on train)."""
        self.feat_mean.copy_(mean.to(self.feat_mean))
        self.feat_std.copy_(safe_scale(std.to(self.feat_std)))

    def method_index(self, names: list[str]) -> torch.Tensor:
        """Adapter index per method name, ``-1`` for a method without its own adapter."""
        lookup = {m: i for i, m in enumerate(self.methods)}
        return torch.tensor([lookup.get(n, -1) for n in names], dtype=torch.long)

    def encode_semantics(self, sem_embed: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        """Semantic tokens of each image; compute once per image, reuse for every method.

        Args:
            sem_embed: ``B×E`` CLIP pooled embedding.
            sem_tokens: ``B×T×h×w`` CLIP patch tokens.

        Returns:
            ``B×L×w`` with ``L = g*g``.
        """
        tokens = _pool(self.norm_tokens(sem_tokens), self.grid).flatten(2).transpose(1, 2)
        x = self.sem_tokens(tokens) + self.sem_embed(self.norm_embed(sem_embed)).unsqueeze(1)
        return self.sem_norm(x + self.pos)

    def encode_segmentation(
        self,
        seg_cells: torch.Tensor,
        seg_global: torch.Tensor,
        seg_feats: torch.Tensor | None = None,
        method_idx: torch.Tensor | None = None,
        agree_maps: torch.Tensor | None = None,
        agree_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segmentation tokens of each (image, method).

        Args:
            seg_cells: ``B×S×g×g`` method-agnostic per-cell descriptors.
            seg_global: ``B×G`` method-agnostic per-image statistics.
            seg_feats: ``B×F×g×g`` raw method features (zero-padded), for the per-method adapters.
            method_idx: ``B`` adapter index per row (:meth:`method_index`), ``-1`` for none.
            agree_maps: ``B×A×g×g`` agreement with the other methods (read when ``agreement``).
            agree_global: ``B×A`` its per-image means.

        Returns:
            ``B×L×w``.
        """
        if seg_cells.shape[-1] != self.grid or seg_cells.shape[-2] != self.grid:
            raise RSSQAError(f"sqa: segmentation grid {tuple(seg_cells.shape[-2:])} != model grid {self.grid}")
        cells = self.norm_cells(seg_cells).flatten(2).transpose(1, 2)
        x = self.seg_cells(cells) + self.seg_global(self.norm_global(seg_global)).unsqueeze(1)
        if self.agreement:
            if agree_maps is None or agree_global is None:
                raise RSSQAError(_NEEDS_AGREEMENT)
            maps = self.norm_agree_maps(agree_maps).flatten(2).transpose(1, 2)
            x = x + self.agree_cells(maps) + self.agree_global(self.norm_agree_global(agree_global)).unsqueeze(1)
        if self.method_weight is not None and seg_feats is not None and method_idx is not None:
            x = x + self._adapt(seg_feats.flatten(2).transpose(1, 2), method_idx)
        return self.seg_norm(x + self.pos)

    def _adapt(self, feats: torch.Tensor, method_idx: torch.Tensor) -> torch.Tensor:
        """The per-method adapters on ``B×L×F`` raw features: ``B×L×w`` (zero for rows of no known method).

        Rows are grouped by method, one matrix product per method present (not one gathered ``F×w``
        weight per row, which costs a copy of the weight per row and its scatter in the backward).
        """
        out = feats.new_zeros((*feats.shape[:2], self.width))
        for m in torch.unique(method_idx).tolist():
            if m < 0:
                continue
            rows = torch.nonzero(method_idx == m).squeeze(1)
            z = (feats[rows] - self.feat_mean[m]) / self.feat_std[m]
            out = out.index_copy(0, rows, z @ self.method_weight[m] + self.method_bias[m])
        return out

    def score(self, sem: torch.Tensor | None, seg: torch.Tensor | None, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Quality in (0, 1) from encoded tokens, ``B×L×w`` each (one may be ``None`` for an ablation),
        with ``offset`` ``B`` added to the logit (the agreement's direct term)."""
        if self.variant == "image_only":
            h = sem
        elif self.variant == "seg_only":
            h = seg
        else:
            h = self.fuse(seg, sem)
        logit = self.head(h.mean(dim=1)).squeeze(-1)
        return torch.sigmoid(logit if offset is None else logit + offset)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Score a batch of (image, method) rows.

        Args:
            batch: ``sem_embed`` ``B×E``, ``sem_tokens`` ``B×T×h×w``, ``seg_cells`` ``B×S×g×g``,
                ``seg_global`` ``B×G``, optionally ``seg_feats`` ``B×F×g×g`` and ``method_idx`` ``B``.

        Returns:
            ``B`` predicted OA in (0, 1).
        """
        sem = None
        if self.uses_sem:
            embed, tokens = batch["sem_embed"], batch["sem_tokens"]
            image = batch.get("image_idx")
            if image is not None and len(image) > 1:  # the methods of one image share its semantic tokens
                first, inverse = _first_of_each(image)
                sem = self.encode_semantics(embed[first], tokens[first])[inverse]
            else:
                sem = self.encode_semantics(embed, tokens)
        seg = (
            self.encode_segmentation(
                batch["seg_cells"], batch["seg_global"], batch.get("seg_feats"), batch.get("method_idx"),
                batch.get("agree_maps"), batch.get("agree_global"),
            )
            if self.uses_seg
            else None
        )
        return self.score(sem, seg, self.agreement_offset(batch.get("agree_global")))

    def agreement_offset(self, agree_global: torch.Tensor | None) -> torch.Tensor | None:
        """The agreement's direct term of the logit, ``B`` (``None`` without ``agreement_skip``)."""
        if self.agree_logit is None:
            return None
        if agree_global is None:
            raise RSSQAError(_NEEDS_AGREEMENT)
        return self.agree_logit(self.norm_agree_global(agree_global)).squeeze(-1)


def _pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``B×C×H×W`` average-pooled to ``grid×grid`` (a reshape and a mean where the grid divides the size,
    the same numbers as ``adaptive_avg_pool2d`` at a fraction of its CPU time)."""
    h, w = x.shape[-2:]
    if h % grid or w % grid:
        return F.adaptive_avg_pool2d(x, grid)
    return x.unflatten(3, (grid, w // grid)).unflatten(2, (grid, h // grid)).mean((3, 5))


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``N`` ids: the position of each distinct id's first row, and each row's distinct-id index."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(uniq),), len(ids), device=ids.device, dtype=pos.dtype).scatter_reduce(0, inverse, pos, "amin")
    return first, inverse
