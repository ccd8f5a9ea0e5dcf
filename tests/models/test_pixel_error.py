"""The pixel error head on a synthetic per-pixel error signal, and its loading from recorded parts."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import BASELINES, PixelErrorHead, load_pixel_head, pixel_inputs


def _synthetic(n: int, seed: int, size: int = 24, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel inputs, tokens and a target that needs two channels at once and the pixel's neighbourhood:
    a pixel is wrong where its method is unsure and, around it, the other methods disagree."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, classes, size, size, generator=g).mul(2).softmax(1)
    agree = torch.rand(n, 3, size, size, generator=g)
    x = pixel_inputs(probs, agree)
    around = torch.nn.functional.avg_pool2d(x[:, 3:4], 3, 1, 1).squeeze(1)  # neighbours' share
    logit = 6 * (x[:, 0] - x[:, 0].mean()) - 8 * (around - around.mean())
    target = torch.rand(logit.shape, generator=g) < torch.sigmoid(logit)
    tokens = torch.randn(n, 4, 3, 3, generator=g)
    return x, tokens, target


def test_head_learns_a_pixel_error_signal():
    torch.manual_seed(0)
    x, tokens, y = _synthetic(48, 0)
    head = PixelErrorHead(agreement=True, token_dim=4, token_channels=2, hidden=8)
    head.fit_standardisation(x)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(120):
        rows = torch.arange(step * 8, step * 8 + 8) % len(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[rows], tokens[rows]), y[rows].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, tt, yt = _synthetic(16, 1)
    auroc = float(binary_auroc(head.probability(xt, tt).reshape(-1), yt.reshape(-1).long()))
    single = {k: float(binary_auroc(f(xt).reshape(-1), yt.reshape(-1).long())) for k, f in BASELINES.items()}
    assert auroc > 0.75, auroc  # chance is 0.5
    assert auroc > max(single.values()) + 0.03, (auroc, single)


def test_head_without_agreement_reads_the_own_channels_only():
    probs = torch.rand(2, 4, 8, 8).softmax(1)
    x = pixel_inputs(probs)  # agreement channels are NaN
    head = PixelErrorHead(agreement=False)
    assert torch.isfinite(head.probability(x)).all()
    with pytest.raises(RSSQAError, match="agreement channels missing"):
        PixelErrorHead(agreement=True)(x)


def test_head_with_quality_weights_reads_eight_channels():
    probs = torch.rand(2, 4, 8, 8).softmax(1)
    agree, quality = torch.rand(2, 3, 8, 8), torch.rand(2, 2, 8, 8)
    head = PixelErrorHead(agreement=True, quality_power=8)
    assert head.kwargs["quality_power"] == 8 and "quality_power" not in PixelErrorHead().kwargs
    head.fit_standardisation(pixel_inputs(probs, agree, quality))
    assert head.mean.numel() == 8 and torch.isfinite(head.probability(pixel_inputs(probs, agree, quality))).all()
    with pytest.raises(RSSQAError, match="quality-weighted agreement channels missing"):
        head(pixel_inputs(probs, agree))
    with pytest.raises(RSSQAError, match="needs the agreement channels"):
        PixelErrorHead(agreement=False, quality_power=8)
    with pytest.raises(RSSQAError, match="quality-weighted agreement maps"):
        pixel_inputs(probs, agree, quality[:, :1])


def test_load_pixel_head_round_trip_and_errors():
    head = PixelErrorHead(agreement=True, token_dim=6, hidden=4)
    head.fit_standardisation(torch.rand(100, 8))
    again = load_pixel_head(head.kwargs, head.state_dict(), "x.safetensors")
    x, t = torch.rand(1, 8, 8, 8), torch.randn(1, 6, 2, 2)
    assert torch.equal(again.probability(x, t), head.eval().probability(x, t))
    with pytest.raises(RSSQAError, match="x.safetensors: not a pixel error head"):
        load_pixel_head({**head.kwargs, "hidden": 5}, head.state_dict(), "x.safetensors")
