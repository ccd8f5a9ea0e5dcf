"""Agreement between methods against a per-pixel reference written the slow, obvious way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rssqa.agreement import agreement_statistics, quality_agreement_maps
from rssqa.errors import RSSQAError


def reference(probs: list[np.ndarray]) -> list[np.ndarray]:
    """share, majority, support per pixel for each method: loops over methods and pixels."""
    preds = [p.argmax(0) for p in probs]  # numpy argmax: first maximum
    c, h, w = probs[0].shape
    out = []
    for m, pm in enumerate(preds):
        maps = np.zeros((3, h, w))
        for y in range(h):
            for x in range(w):
                others = [k for k in range(len(probs)) if k != m]
                counts = np.bincount([preds[k][y, x] for k in others], minlength=c)
                maps[0, y, x] = np.mean([preds[k][y, x] == pm[y, x] for k in others])
                maps[1, y, x] = counts.argmax() == pm[y, x]
                maps[2, y, x] = np.mean([probs[k][pm[y, x], y, x] for k in others])
        out.append(maps)
    return out


@pytest.mark.parametrize("n_methods,classes", [(3, 2), (4, 3), (8, 6)])
def test_agreement_matches_the_reference(n_methods, classes):
    rng = np.random.default_rng(n_methods)
    # few classes and near-equal methods: plenty of ties in the vote
    base = rng.normal(size=(classes, 8, 8))
    probs = [torch.from_numpy(base + rng.normal(size=base.shape)).softmax(0).float() for _ in range(n_methods)]
    got = agreement_statistics([p[None] for p in probs], grid=2)
    want = reference([p.numpy() for p in probs])
    for g, r in zip(got, want, strict=True):
        assert np.allclose(g["agree_global"][0].numpy(), r.mean(axis=(1, 2)), atol=1e-6)
        assert np.allclose(g["agree_maps"][0].numpy(), r.reshape(3, 2, 4, 2, 4).mean(axis=(2, 4)), atol=1e-6)
        assert g["agreement"][0] == g["agree_global"][0, 0] and g["consensus"][0] == g["agree_global"][0, 1]


def test_agreement_extremes_and_errors():
    same = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).T.reshape(2, 1, 2)[None]  # 1×2×1×2
    out = agreement_statistics([same, same, same], grid=1)
    assert torch.allclose(out[0]["agree_global"][0, :2], torch.ones(2))  # everyone agrees
    flipped = same.flip(1)
    out = agreement_statistics([same, flipped, flipped], grid=1)
    assert out[0]["agreement"][0] == 0 and out[0]["consensus"][0] == 0  # the odd one out
    # one other agrees, one does not: a tied vote goes to the lower class, which is this method's on
    # the second pixel only
    assert out[1]["agreement"][0] == 0.5 and out[1]["consensus"][0] == 0.5
    with pytest.raises(RSSQAError, match="at least 3 methods"):
        agreement_statistics([same, same])
    with pytest.raises(RSSQAError, match="differ in shape"):
        agreement_statistics([same, same, torch.rand(1, 2, 2, 2)])


def test_quality_weighted_agreement_matches_the_reference():
    rng = np.random.default_rng(5)
    m, classes, power = 4, 3, 2.0
    probs = [torch.from_numpy(rng.normal(size=(2, classes, 5, 5))).softmax(1).float() for _ in range(m)]
    preds = [p.argmax(1) for p in probs]
    quality = torch.tensor([[0.9, 0.5, 0.2, 0.7], [0.3, 0.3, 0.3, 0.3]])
    got = quality_agreement_maps(probs, preds, quality, power)
    for j in range(m):
        for b in range(2):
            w = np.array([float(quality[b, k]) ** power if k != j else 0.0 for k in range(m)])
            w /= w.sum()
            for y, x in [(0, 0), (2, 3), (4, 1)]:
                c = int(preds[j][b, y, x])
                share = sum(w[k] * (int(preds[k][b, y, x]) == c) for k in range(m))
                support = sum(w[k] * float(probs[k][b, c, y, x]) for k in range(m))
                assert got[j][b, 0, y, x] == pytest.approx(share, abs=1e-6)
                assert got[j][b, 1, y, x] == pytest.approx(support, abs=1e-6)
    # one method per image (a scene's chosen ones): the same maps
    picked = quality_agreement_maps(probs, preds, quality, power, which=torch.tensor([2, 0]))
    assert torch.equal(picked[0], got[2][0]) and torch.equal(picked[1], got[0][1])
    # equal weights: the unweighted share and support
    plain = agreement_statistics(probs, grid=1, preds=preds, keep_maps=True)
    for g, p in zip(got, plain, strict=True):
        assert torch.allclose(g[1], p["pixels"][1, [0, 2]], atol=1e-6)
    # a strong method outvotes two weak ones: the weighted share follows the strong one
    one = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    flip = one.flip(1)
    maps = quality_agreement_maps([one, one, flip, flip], [t.argmax(1) for t in (one, one, flip, flip)],
                                  torch.tensor([[0.5, 0.9, 0.3, 0.3]]), 8)
    assert float(maps[0][0, 0]) > 0.9 and float(maps[2][0, 0]) < 0.1
    with pytest.raises(RSSQAError, match="quality"):
        quality_agreement_maps(probs, preds, quality[:, :3], power)
