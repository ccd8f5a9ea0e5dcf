"""Label-free baselines on probability tensors with known answers."""

import math

import pytest
import torch

from rssqa import baselines
from rssqa.errors import RSSQAError


def _probs(b=3, c=5, h=8, w=8, seed=0, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, c, h, w, generator=g) / temp, dim=1)


def test_extremes():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    onehot = torch.zeros(1, 4, 2, 2)
    onehot[:, 2] = 1.0
    assert baselines.msp(uniform).item() == pytest.approx(0.25)
    assert baselines.entropy(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert baselines.margin(uniform).item() == pytest.approx(0.0)
    for f in (baselines.msp, baselines.entropy, baselines.margin):
        assert f(onehot).item() == pytest.approx(1.0)


def test_hand_computed_pixel():
    # one image, two pixels: (0.7, 0.2, 0.1) and (0.5, 0.5, 0.0)
    p = torch.tensor([[0.7, 0.5], [0.2, 0.5], [0.1, 0.0]]).reshape(1, 3, 1, 2)
    assert baselines.msp(p).item() == pytest.approx(0.6)
    assert baselines.margin(p).item() == pytest.approx((0.5 + 0.0) / 2)
    h1 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    h2 = math.log(2)
    assert baselines.entropy(p).item() == pytest.approx(1 - (h1 + h2) / 2 / math.log(3))
    assert baselines.atc(p, 0.6).item() == pytest.approx(0.5)


def test_sharper_softmax_scores_higher():
    soft, sharp = _probs(temp=2.0), _probs(temp=0.3)
    for name, score in baselines.baseline_scores(sharp, 0.5).items():
        other = baselines.baseline_scores(soft, 0.5)[name]
        assert torch.all(score > other), name


def test_histogram_matches_exact_share_at_bin_edges():
    p = _probs(b=4, c=3, h=16, w=16, temp=0.5)
    hist = baselines.confidence_histogram(p, bins=20)
    assert torch.allclose(hist.sum(1), torch.ones(4, dtype=torch.float64))
    for t in (0.4, 0.55, 0.8, 0.95):
        assert torch.allclose(baselines.share_above(hist, t), baselines.atc(p, t), atol=1e-12)


def test_atc_threshold_makes_mean_share_equal_mean_oa():
    p = _probs(b=6, c=4, h=16, w=16, temp=0.6)
    hist = baselines.confidence_histogram(p, bins=50)
    oa = torch.tensor([0.55, 0.6, 0.7, 0.65, 0.5, 0.62])
    t = baselines.fit_atc_threshold(hist, oa)
    assert 0.0 < t < 1.0
    assert baselines.share_above(hist, t).mean().item() == pytest.approx(oa.mean().item(), abs=1e-6)
    # a higher mean accuracy needs a lower threshold
    assert baselines.fit_atc_threshold(hist, oa + 0.2) < t


def test_bad_shapes():
    with pytest.raises(RSSQAError, match="B x C x H x W"):
        baselines.msp(torch.rand(3, 8, 8))
    with pytest.raises(RSSQAError, match="N x K"):
        baselines.fit_atc_threshold(torch.rand(0, 5), [])


def test_top2_matches_topk_and_argmax():
    p = _probs(b=2, c=6, h=8, w=8, temp=0.7)
    v1, v2, idx = baselines.top2(p)
    ref = p.double().topk(2, dim=1).values
    assert torch.equal(v1, ref[:, 0]) and torch.equal(v2, ref[:, 1])
    assert torch.equal(idx, p.argmax(1))
