"""Pooled pixel AUROC under resampling of images (or windows): the paired bootstrap of the pixel error head.

Used by the sqa stage (test images) and by a scene's evaluation (its windows). Pixels of one image
are not independent (nor are the methods of one image), so the interval of a pixel-AUROC difference
comes from drawing whole test images with replacement, as
:func:`rssqa.metrics.paired_bootstrap` does for per-image scores. Recomputing a pooled AUROC over
hundreds of thousands of pixels for every draw would mean a sort per draw; instead
:func:`pair_counts` counts, once, the correctly ordered (wrong, right) pixel pairs between every two
images, and a draw's AUROC is a quadratic form in how often each image was drawn. Exact, ties
counted half (the trapezoidal AUROC of torchmetrics).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError
from rssqa.metrics import verdict


def pair_counts(score: np.ndarray, target: np.ndarray, image: np.ndarray, n_images: int, step: int = 16) -> np.ndarray:
    """``A[i, j]``: over the wrong pixels of image ``i`` and the right pixels of image ``j``, the pairs
    the score orders correctly (1 each) or ties (1/2 each).

    The pooled AUROC of any reweighting of images by counts ``c`` is then ``cᵀAc / ((c·P)(c·N))``
    (``P``, ``N``: each image's wrong and right pixels): a bootstrap draw costs ``I²``, not a sort.

    Args:
        score: ``N`` scores (higher = more likely wrong).
        target: ``N`` bool, wrong pixels.
        image: ``N`` image index in ``[0, n_images)``.
        n_images: ``I``.
        step: images (columns) handled at once; bounds memory to ``distinct scores × step``.

    Returns:
        ``I×I`` float64.
    """
    from scipy.sparse import csr_matrix

    _, group = np.unique(score, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    pos, neg = target.astype(bool), ~target.astype(bool)
    gather = csr_matrix((np.ones(pos.sum()), (image[pos], np.arange(pos.sum()))), shape=(n_images, int(pos.sum())))
    out = np.zeros((n_images, n_images))
    for j0 in range(0, n_images, step):
        k = min(step, n_images - j0)
        sel = neg & (image >= j0) & (image < j0 + k)
        count = np.bincount(group[sel] * k + (image[sel] - j0), minlength=n_groups * k).reshape(n_groups, k).astype(np.float64)
        below = np.cumsum(count, 0) - 0.5 * count  # right pixels scored lower, ties counted half
        out[:, j0 : j0 + k] = gather @ below[group[pos]]
    return out


def _pair_sums(score: np.ndarray, t: np.ndarray, inverse: np.ndarray, n: int, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Per draw, the correctly ordered (wrong, right) pixel pairs with every pixel weighted by how often
    its group was drawn (ties half), and the same on all pixels once: the AUROC numerators.

    Two exact ways, the cheaper one: with fewer groups than draws (test images), the group-pair counts
    of :func:`pair_counts` and a quadratic form per draw; with many small groups (a scene's windows),
    a weighted rank sum per draw over the scores sorted once.
    """
    if n <= len(counts):
        pairs = pair_counts(score, t, inverse, n)
        ones = np.ones(n)
        return np.einsum("bi,ij,bj->b", counts, pairs, counts), float(ones @ pairs @ ones)
    _, tie = np.unique(score, return_inverse=True)  # tie groups, in ascending score
    n_ties = int(tie.max()) + 1 if len(tie) else 0

    def ordered(w: np.ndarray) -> float:
        right = np.bincount(tie, weights=w * ~t, minlength=n_ties)
        wrong = np.bincount(tie, weights=w * t, minlength=n_ties)
        return float(wrong @ (np.cumsum(right) - 0.5 * right))  # right pixels scored lower, ties half

    return np.array([ordered(c[inverse]) for c in counts]), ordered(np.ones(len(score)))


def auroc_bootstrap(
    a: np.ndarray, b: np.ndarray, target: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap over groups (images) of the pooled pixel AUROC of score ``a`` minus score ``b``.

    Whole images are drawn with replacement (all their pixels, of every method, together); both
    scores are measured on the same draws. The conventions of :func:`rssqa.metrics.paired_bootstrap`.

    Returns:
        ``diff`` (on all pixels), ``low``, ``high`` (2.5 and 97.5 percentiles of the drawn
        differences), ``a_better`` (share of draws in which ``a`` is ahead) and ``verdict``.
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n = len(uniq)
    if n < 2:
        raise RSSQAError(f"pixel bootstrap: needs at least two test images, got {n}")
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])
    return _bootstrap(a, b, target, inverse, n, counts)


def auroc_bootstrap_counts(a: np.ndarray, b: np.ndarray, target: np.ndarray, groups: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """:func:`auroc_bootstrap` with the draws given: ``counts[k, g]``, how often draw ``k`` takes the
    ``g``-th distinct value of ``groups`` (sorted). Each draw's AUROC is that of the pixels of the drawn
    groups pooled, a group drawn twice counting twice; draws without both kinds of pixel are left out.
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n = len(uniq)
    if np.ndim(counts) != 2 or np.shape(counts)[1] != n:
        raise RSSQAError(f"pixel bootstrap: counts of shape {np.shape(counts)}, expected draws x {n} groups")
    return _bootstrap(a, b, target, inverse, n, counts)


def _bootstrap(a: np.ndarray, b: np.ndarray, target: np.ndarray, inverse: np.ndarray, n: int, counts: np.ndarray) -> dict[str, Any]:
    """The bootstrap of :func:`auroc_bootstrap_counts`, each pixel's group as an index in ``[0, n)``."""
    t = np.asarray(target, bool)
    counts = np.asarray(counts, np.float64)
    pos = np.bincount(inverse, weights=t, minlength=n)
    neg = np.bincount(inverse, weights=~t, minlength=n)
    den = (counts @ pos) * (counts @ neg)
    diffs, point = [], []
    for score in (a, b):
        num, whole = _pair_sums(np.asarray(score, np.float64), t, inverse, n, counts)
        diffs.append(num / np.where(den > 0, den, np.nan))
        point.append(whole / (pos.sum() * neg.sum()))
    d = diffs[0] - diffs[1]
    d = d[np.isfinite(d)]
    low = float(np.percentile(d, 2.5)) if len(d) else math.nan
    high = float(np.percentile(d, 97.5)) if len(d) else math.nan
    return {
        "diff": float(point[0] - point[1]), "low": low, "high": high,
        "a_better": float((d > 0).mean()) if len(d) else math.nan, "verdict": verdict(low, high),
    }  # fmt: skip
