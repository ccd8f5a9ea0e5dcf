"""Label-free quality baselines: what a practitioner can read off a method's own softmax today.

Each baseline maps one image's class probabilities to one number that should rise with OA:

- ``msp``: mean over pixels of the maximum class probability.
- ``entropy``: minus the mean pixel entropy, reported as ``1 - mean(H) / log(C)``: an increasing affine
  map of ``-mean(H)``, so every rank and linear correlation is the same, but it lives in [0, 1] like OA
  (1 = every pixel certain) and its RMSE means something.
- ``margin``: mean over pixels of top-1 minus top-2 probability.
- ``atc``: Average Thresholded Confidence (Garg et al., 2022): the share of pixels whose maximum
  probability exceeds a threshold ``t`` fitted on the training split so that, there, the mean share
  equals the mean OA. Fitted per method, as ATC is per classifier.

Two entry points: functions on probability tensors ``B×C×H×W`` (rows summing to 1 over ``C``), and
functions on cached per-image statistics (the confidence histogram), which is what RS-SQED stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from rssqa.errors import RSSQAError

NAMES = ("msp", "entropy", "margin", "atc")


def _check(probs: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise RSSQAError(f"baselines: expected probabilities B x C x H x W with C >= 2, got {tuple(probs.shape)}")
    return probs if keep_dtype and probs.is_floating_point() else probs.double()


def max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel maximum class probability, ``B×C×H×W`` -> ``B×H×W``."""
    return _check(probs).amax(dim=1)


def msp(probs: torch.Tensor) -> torch.Tensor:
    """Mean maximum softmax probability per image, ``B×C×H×W`` -> ``B``, in [1/C, 1]."""
    return max_prob(probs).mean(dim=(1, 2))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """``1 - mean pixel entropy / log C`` per image, ``B×C×H×W`` -> ``B``, in [0, 1]."""
    p = _check(probs)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
    return 1.0 - h.mean(dim=(1, 2)) / math.log(p.shape[1])


def top2(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest and second-largest class probability and the arg-max, per pixel.

    The same numbers as ``topk(2, dim=1)`` and ``argmax(1)``, several times faster on CPU for the
    class axis of ``B×C×H×W`` tensors (one max, one masked max).

    Returns:
        ``(top1 B×H×W, top2 B×H×W, argmax B×H×W int64)``.
    """
    p = _check(probs, keep_dtype=True)  # exact in any floating dtype: no copy to float64
    v1, i1 = p.max(dim=1, keepdim=True)
    v2 = p.scatter(1, i1, float("-inf")).amax(dim=1)
    return v1.squeeze(1), v2, i1.squeeze(1)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Mean top-1 minus top-2 probability per image, ``B×C×H×W`` -> ``B``, in [0, 1]."""
    v1, v2, _ = top2(_check(probs))
    return (v1 - v2).mean(dim=(1, 2))


def atc(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of pixels whose maximum probability exceeds ``threshold``, ``B×C×H×W`` -> ``B``."""
    return (max_prob(probs) > threshold).double().mean(dim=(1, 2))


def confidence_histogram(probs: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Share of pixels per maximum-probability bin, equal bins over [0, 1].

    Args:
        probs: ``B×C×H×W`` class probabilities.
        bins: number of bins ``K``.

    Returns:
        ``B×K`` shares, each row summing to 1.
    """
    conf = max_prob(probs).flatten(1)
    idx = (conf * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(conf.shape[0], bins, dtype=torch.float64)
    hist.scatter_add_(1, idx, torch.ones_like(conf))
    return hist / conf.shape[1]


def share_above(hist: torch.Tensor | np.ndarray, threshold: float) -> torch.Tensor:
    """Share of pixels above ``threshold`` from a confidence histogram.

    Pixels are taken as spread evenly within a bin, so the share is piecewise linear in the threshold.

    Args:
        hist: ``N×K`` per-image shares over ``K`` equal bins on [0, 1].
        threshold: confidence threshold in [0, 1].

    Returns:
        ``N`` shares in [0, 1].
    """
    h = torch.as_tensor(np.asarray(hist), dtype=torch.float64)
    k = h.shape[-1]
    pos = min(max(threshold, 0.0), 1.0) * k
    b = min(int(pos), k - 1)
    frac_of_bin_above = 1.0 - (pos - b)
    return h[..., b + 1 :].sum(-1) + frac_of_bin_above * h[..., b]


def fit_atc_threshold(hist: torch.Tensor | np.ndarray, oa: Sequence[float] | np.ndarray) -> float:
    """Fit the ATC threshold: the ``t`` at which the mean share above ``t`` equals the mean OA.

    Args:
        hist: ``N×K`` confidence histograms of the training rows of one method.
        oa: their true OA, shape ``N``.

    Returns:
        The threshold in [0, 1] (bisection; the share is non-increasing in ``t``).
    """
    h = torch.as_tensor(np.asarray(hist), dtype=torch.float64)
    if h.ndim != 2 or h.shape[0] == 0:
        raise RSSQAError(f"baselines: ATC needs N x K training histograms, got {tuple(h.shape)}")
    target = float(np.mean(np.asarray(oa, dtype=np.float64)))
    mean_hist = h.mean(0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(share_above(mean_hist, mid)) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def baseline_scores(probs: torch.Tensor, atc_threshold: float | None = None) -> dict[str, torch.Tensor]:
    """Every baseline on a batch of probabilities, ``{name: B}`` (``atc`` only with a threshold)."""
    out = {"msp": msp(probs), "entropy": entropy(probs), "margin": margin(probs)}
    if atc_threshold is not None:
        out["atc"] = atc(probs, atc_threshold)
    return out
