"""Where a segmentation is wrong: a per-pixel error probability from label-free evidence.

For one method's result on an image, each pixel gets the channels :data:`PIXEL_NAMES`:

- from the method's own softmax: ``uncertainty`` (1 - max probability), ``entropy`` (normalised by
  ``log C``), ``margin`` (top-1 minus top-2 probability);
- from the other methods of the image (:func:`rssqa.agreement.agreement_maps`, at least three
  methods in all): ``share`` of the others that predict its class, ``majority`` (the others' vote is
  its class) and ``support`` (the others' mean probability of its class);
- the same two votes with each other method weighted by its predicted quality on the image
  (:func:`rssqa.agreement.quality_agreement_maps`, the scores of the image-level head that
  recommends methods): ``q_share`` and ``q_support``.

:class:`PixelErrorHead` reads these channels and, optionally, the frozen CLIP-RS patch tokens of the
image (projected and upsampled), and predicts the probability that the method's class is wrong at
each pixel. The same three per-pixel label-free baselines it is compared with are read off the same
channels (:data:`BASELINES`): training and scoring share one implementation (:func:`pixel_inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rssqa.errors import RSSQAError

PIXEL_NAMES = ("uncertainty", "entropy", "margin", "share", "majority", "support", "q_share", "q_support")
OWN = 3  # the first three channels come from the method's own softmax
AGREE = slice(3, 6)  # agreement with the other methods
QUALITY = slice(6, 8)  # agreement weighted by the others' predicted quality
# per-pixel label-free error scores (higher = more likely wrong), read off pixel_inputs' channels
BASELINES = {
    "max_prob": lambda x: x[:, 0],  # 1 - max probability
    "entropy": lambda x: x[:, 1],
    "disagreement": lambda x: 1.0 - x[:, 3],  # share of the other methods that disagree
}


@torch.no_grad()
def pixel_inputs(probs: torch.Tensor, agree: torch.Tensor | None = None, quality: torch.Tensor | None = None) -> torch.Tensor:
    """The per-pixel channels :data:`PIXEL_NAMES` of one method's result.

    Args:
        probs: ``B×C×H×W`` the method's softmax.
        agree: ``B×3×H×W`` its agreement with the other methods (``share, majority, support``), or
            ``None`` with fewer than three methods (those channels are then NaN).
        quality: ``B×2×H×W`` its quality-weighted agreement (``q_share, q_support``), or ``None``
            (NaN channels).

    Returns:
        ``B×8×H×W`` float32.
    """
    if probs.ndim != 4:
        raise RSSQAError(f"pixel inputs: probabilities of shape {tuple(probs.shape)}; expected B x C x H x W")
    p = probs.float()
    top2 = p.topk(2, dim=1).values if p.shape[1] > 1 else torch.cat([p, torch.zeros_like(p)], 1)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(1) / math.log(max(p.shape[1], 2))
    own = torch.stack([1.0 - top2[:, 0], h, top2[:, 0] - top2[:, 1]], 1)
    parts = [own]
    for name, maps, width in (("agreement", agree, 3), ("quality-weighted agreement", quality, 2)):
        if maps is None:
            maps = torch.full((p.shape[0], width, *p.shape[2:]), float("nan"), device=p.device)
        elif maps.shape[0] != p.shape[0] or maps.shape[2:] != p.shape[2:] or maps.shape[1] != width:
            raise RSSQAError(f"pixel inputs: {name} maps {tuple(maps.shape)} do not fit probabilities {tuple(p.shape)}")
        parts.append(maps.float().to(p.device))
    return torch.cat(parts, 1)


class PixelErrorHead(nn.Module):
    """Per-pixel probability that a method's class is wrong.

    A small fully convolutional network over :func:`pixel_inputs` (standardised), with the CLIP-RS
    patch tokens projected to ``token_channels`` and upsampled bilinearly when ``token_dim > 0``.

    Args:
        agreement: read the agreement channels (trained where RS-SQED has at least three methods).
        token_dim: width of the CLIP-RS patch tokens (0: no semantic input).
        token_channels: channels the tokens are projected to.
        hidden: channels of the two 3×3 convolutions.
        quality_power: > 0: also read the quality-weighted agreement channels, made with this power
            of the others' predicted quality (:func:`rssqa.agreement.quality_agreement_maps`); needs
            ``agreement``. 0: not read.
    """

    def __init__(
        self, agreement: bool = True, token_dim: int = 0, token_channels: int = 8, hidden: int = 16, quality_power: float = 0.0
    ):
        super().__init__()
        if quality_power and not agreement:
            raise RSSQAError("pixel error head: quality-weighted agreement needs the agreement channels (agreement=True)")
        self.agreement, self.token_dim, self.token_channels, self.hidden = agreement, token_dim, token_channels, hidden
        self.quality_power = float(quality_power)
        self.index = [*range(OWN)]
        self.index += [*range(AGREE.start, AGREE.stop)] if agreement else []
        self.index += [*range(QUALITY.start, QUALITY.stop)] if self.quality_power > 0 else []
        n = len(self.index)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.tokens = nn.Conv2d(token_dim, token_channels, 1) if token_dim > 0 else None
        width = n + (token_channels if token_dim > 0 else 0)
        self.net = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, 1, 1),
        )  # fmt: skip

    @property
    def kwargs(self) -> dict[str, int | bool]:
        """The constructor's arguments (what a scorer folder records)."""
        out: dict[str, int | bool | float] = {
            "agreement": self.agreement, "token_dim": self.token_dim, "token_channels": self.token_channels, "hidden": self.hidden,
        }  # fmt: skip
        return {**out, "quality_power": self.quality_power} if self.quality_power > 0 else out

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """The channels of :func:`pixel_inputs` (``B×8×H×W``) this head reads."""
        if x.shape[1] != len(PIXEL_NAMES):
            raise RSSQAError(f"pixel error head: inputs of {x.shape[1]} channels; expected {len(PIXEL_NAMES)} ({', '.join(PIXEL_NAMES)})")
        x = x[:, self.index]
        if torch.isnan(x).any():
            what = "quality-weighted agreement" if self.quality_power > 0 and not torch.isnan(x[:, AGREE]).any() else "agreement"
            raise RSSQAError(f"pixel error head: {what} channels missing (it needs at least three methods)")
        return x

    @torch.no_grad()
    def fit_standardisation(self, x: torch.Tensor) -> None:
        """Set the input standardisation from training pixels ``N×8`` (or ``B×8×H×W``)."""
        x = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.ndim == 4 else x
        x = x[:, self.index].float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-4))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Error logits ``B×H×W`` from ``B×8×H×W`` pixel inputs (and ``B×T×h×w`` tokens)."""
        x = (self.channels(x) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        if self.tokens is not None:
            if tokens is None:
                raise RSSQAError("pixel error head: it reads CLIP-RS patch tokens and none were given")
            t = F.interpolate(self.tokens(tokens.float()), size=x.shape[2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, t], 1)
        return self.net(x).squeeze(1)

    @torch.no_grad()
    def probability(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Error probability ``B×H×W`` in [0, 1]."""
        return torch.sigmoid(self(x, tokens))


def image_quality(error: torch.Tensor) -> torch.Tensor:
    """Predicted overall accuracy read off error maps: ``1 - mean`` error probability over each map's
    pixels, ``B×H×W`` -> ``B``. OA is the mean of per-pixel correctness, so a calibrated error map
    estimates it directly; label-free, every pixel counts (no mask says which are labelled)."""
    return 1.0 - error.float().mean(dim=(-2, -1))


def load_pixel_head(kwargs: Mapping[str, int | bool | float], state: Mapping[str, torch.Tensor], where: str) -> PixelErrorHead:
    """A :class:`PixelErrorHead` from its recorded arguments and weights, or a one-line error naming ``where``."""
    try:
        head = PixelErrorHead(**kwargs)
        head.load_state_dict(dict(state), strict=True)
    except (TypeError, RuntimeError) as e:
        raise RSSQAError(f"{where}: not a pixel error head ({str(e).splitlines()[0][:160]})") from None
    return head.eval()
