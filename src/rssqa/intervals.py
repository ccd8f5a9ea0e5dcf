"""How far a predicted OA may be from the true one: split-conformal intervals from held-out rows.

A quality head predicts a number an analyst reads as the segmentation's overall accuracy, and that number
is only as useful as its error. :func:`fit` measures the error on rows the head was not trained on (the sqa
stage's val split): the signed residuals ``oa - pred``, in bins of the predicted value (Mondrian conformal
prediction: a head is surer of an image it scores 0.95 than of one it scores 0.5), and keeps, per bin, the
residual quantiles that make a ``level`` interval under the finite-sample rule of split conformal prediction
(Vovk et al. 2005; Lei et al. 2018): with ``n`` held-out residuals sorted, the upper offset is the
``ceil((n + 1)(1 - a/2))``-th and the lower the ``floor((n + 1) a/2)``-th, ``a = 1 - level``, so that a new row
exchangeable with them falls inside with probability at least ``level``. Where a bin holds too few rows
for that, its bound is the end of the OA range. :func:`bounds` applies the offsets, clipped to [0, 1].

The guarantee holds for rows like the held-out ones: images of the same kind as the val split's, methods the
scorer was trained with. On another area or sensor it need not, which is why the sqa stage also measures the
coverage on its test split and, with group folds, on every area held out in turn (:func:`coverage`).

The arithmetic is a sort and two order statistics per bin, written here rather than taken from a
conformal-prediction package, which would add its own dependencies to the scoring path for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError

LEVEL = 0.9  # the intervals' nominal coverage
BINS = 3  # Mondrian bins of the predicted OA (equal counts of the held-out rows)


def _order_statistic(sorted_r: np.ndarray, k: int, fallback: float) -> float:
    """The ``k``-th smallest (1-based) of ``sorted_r``; ``fallback`` where ``k`` is outside ``1..n``."""
    return float(sorted_r[k - 1]) if 1 <= k <= len(sorted_r) else fallback


def fit(pred: Any, oa: Any, level: float = LEVEL, bins: int = BINS) -> dict[str, Any]:
    """Interval offsets from held-out predictions and their true OA.

    Args:
        pred: predicted OA of the held-out rows.
        oa: their true OA.
        level: nominal coverage, in (0, 1).
        bins: bins of the predicted value, of equal counts (1: one interval width for every prediction).

    Returns:
        ``{"level", "edges", "low", "high", "n"}``: the inner bin edges of the predicted value, and per bin the
        offsets added to a prediction for the interval's ends (``-1`` / ``+1`` where the bin holds too few rows,
        so that the clipped interval is all of [0, 1]) and its number of held-out rows.
    """
    p = np.asarray(pred, np.float64).reshape(-1)
    t = np.asarray(oa, np.float64).reshape(-1)
    if len(p) != len(t) or not len(p):
        raise RSSQAError(f"intervals: {len(p)} predictions for {len(t)} true values; need as many, at least one")
    if not 0 < level < 1 or bins < 1:
        raise RSSQAError(f"intervals: level {level} must be in (0, 1) and bins {bins} at least 1")
    edges = np.unique(np.quantile(p, np.arange(1, bins) / bins)) if bins > 1 else np.zeros(0)
    which = np.searchsorted(edges, p, side="right")
    alpha = 1.0 - level
    low, high, n = [], [], []
    for b in range(len(edges) + 1):
        r = np.sort(t[which == b] - p[which == b])
        k = len(r)
        low.append(_order_statistic(r, math.floor((k + 1) * alpha / 2), -1.0))
        high.append(_order_statistic(r, math.ceil((k + 1) * (1 - alpha / 2)), 1.0))
        n.append(k)
    return {"level": level, "edges": edges.tolist(), "low": low, "high": high, "n": n}


def bounds(pred: Any, fitted: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The interval of each prediction, ``(low, high)``, clipped to [0, 1]."""
    p = np.asarray(pred, np.float64)
    which = np.searchsorted(np.asarray(fitted["edges"], np.float64), p, side="right")
    low = np.clip(p + np.asarray(fitted["low"])[which], 0.0, 1.0)
    high = np.clip(p + np.asarray(fitted["high"])[which], 0.0, 1.0)
    return low, high


def outside(pred: Any, oa: Any, fitted: Mapping[str, Any]) -> np.ndarray:
    """Per row whose true OA is known, ``N×3``: whether the OA lies below its interval, above it, and the
    interval's width (what :func:`summarise` pools; rows of several fits can be stacked first)."""
    t = np.asarray(oa, np.float64).reshape(-1)
    low, high = bounds(np.asarray(pred, np.float64).reshape(-1), fitted)
    return np.stack([t < low, t > high, high - low], 1).astype(np.float64)


def summarise(rows: np.ndarray) -> dict[str, float]:
    """``coverage`` (share of rows whose OA lies inside), ``below`` / ``above`` (shares outside on each side),
    ``mean_width`` and ``n`` of :func:`outside`'s rows."""
    if not len(rows):
        return {"coverage": math.nan, "below": math.nan, "above": math.nan, "mean_width": math.nan, "n": 0}
    below, above = float(rows[:, 0].mean()), float(rows[:, 1].mean())
    return {"coverage": 1.0 - below - above, "below": below, "above": above, "mean_width": float(rows[:, 2].mean()), "n": len(rows)}


def coverage(pred: Any, oa: Any, fitted: Mapping[str, Any]) -> dict[str, float]:
    """How the intervals of ``pred`` did on rows whose true OA is known (:func:`summarise` of :func:`outside`)."""
    return summarise(outside(pred, oa, fitted))
