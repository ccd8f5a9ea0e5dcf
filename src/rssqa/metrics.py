"""Agreement between predicted quality scores and true per-image OA.

Pure functions on 1-D vectors (torch tensors, numpy arrays or lists). The correlations come from
torchmetrics, computed in float64; the logistic fit behind ``plcc_logistic`` is the 4-parameter
monotonic logistic of the image-quality literature (VQEG), fitted with scipy. Every function returns
a Python float; a correlation that is undefined (constant input, fewer than two points) is ``nan``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeWarning, curve_fit
from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

from rssqa.errors import RSSQAError

METRICS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse")


def _pair(pred: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(pred, dtype=np.float64)).reshape(-1)
    t = torch.as_tensor(np.asarray(target, dtype=np.float64)).reshape(-1)
    if p.shape != t.shape:
        raise RSSQAError(f"metrics: {p.numel()} predictions for {t.numel()} targets")
    return p, t


def _undefined(p: torch.Tensor, t: torch.Tensor) -> bool:
    # A correlation with a constant vector has a zero denominator; say so with nan, not a warning.
    return p.numel() < 2 or bool(p.min() == p.max()) or bool(t.min() == t.max())


def srcc(pred: Any, target: Any) -> float:
    """Spearman rank correlation (ties get their average rank).

    Args:
        pred: predicted scores, shape ``N``.
        target: true OA in [0, 1], shape ``N``.
    """
    p, t = _pair(pred, target)
    return math.nan if _undefined(p, t) else float(spearman_corrcoef(p, t))


def plcc(pred: Any, target: Any) -> float:
    """Pearson linear correlation of the raw scores, shape ``N`` each."""
    p, t = _pair(pred, target)
    return math.nan if _undefined(p, t) else float(pearson_corrcoef(p, t))


def krcc(pred: Any, target: Any) -> float:
    """Kendall rank correlation, tau-b (corrected for ties), shape ``N`` each."""
    p, t = _pair(pred, target)
    return math.nan if _undefined(p, t) else float(kendall_rank_corrcoef(p, t, variant="b"))


def rmse(pred: Any, target: Any) -> float:
    """Root mean squared error ``sqrt(mean((pred - target)^2))``, in OA units."""
    p, t = _pair(pred, target)
    return math.nan if p.numel() == 0 else float(torch.sqrt(torch.mean((p - t) ** 2)))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The monotonic 4-parameter logistic ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``."""
    z = np.clip(-(x - b3) / (abs(b4) + 1e-12), -60.0, 60.0)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic4(pred: Any, target: Any) -> np.ndarray | None:
    """Least-squares fit of :func:`logistic4` mapping ``pred`` onto ``target``.

    Returns:
        The parameters ``(b1, b2, b3, b4)``, or ``None`` when the fit does not converge.
    """
    x = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    p0 = [y.max(), y.min(), float(np.median(x)), float(x.std()) or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(logistic4, x, y, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return params if np.all(np.isfinite(params)) else None


def plcc_logistic(pred: Any, target: Any) -> float:
    """Pearson correlation after mapping the scores through a fitted 4-parameter logistic.

    Falls back to the linear PLCC when the fit does not converge (the linear map is the limit a
    logistic can always approach, so this never flatters a score).
    """
    p, t = _pair(pred, target)
    if _undefined(p, t):
        return math.nan
    params = fit_logistic4(p.numpy(), t.numpy())
    if params is None:
        return plcc(p, t)
    return plcc(logistic4(p.numpy(), *params), t)


def quality_metrics(pred: Any, target: Any) -> dict[str, float]:
    """All of :data:`METRICS` at once: ``{srcc, plcc, plcc_logistic, krcc, rmse}``."""
    return {
        "srcc": srcc(pred, target),
        "plcc": plcc(pred, target),
        "plcc_logistic": plcc_logistic(pred, target),
        "krcc": krcc(pred, target),
        "rmse": rmse(pred, target),
    }


def grouped_metrics(pred: Any, target: Any, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """:func:`quality_metrics` within each group (per source, per method).

    Args:
        pred: predicted scores, shape ``N``.
        target: true OA, shape ``N``.
        groups: a group name per row, length ``N``.

    Returns:
        ``{group: {metric: value}}``, groups in sorted order.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    g = np.asarray(groups)
    if len(g) != len(p):
        raise RSSQAError(f"metrics: {len(g)} group labels for {len(p)} predictions")
    return {str(k): quality_metrics(p[g == k], t[g == k]) for k in sorted(set(g.tolist()))}


def paired_bootstrap(
    pred_a: Any,
    pred_b: Any,
    target: Any,
    groups: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How sure is "a correlates better with OA than b"? A paired bootstrap over groups (images).

    Whole groups are drawn with replacement (all methods of an image together, since their rows are not
    independent); both scores are measured on the same draw, so the spread of the difference is what
    the test set leaves open, not the spread of either score alone. Many pairs on one test set:
    :class:`PairedBootstrap` (the same numbers).

    Args:
        pred_a: the first score, shape ``N``.
        pred_b: the score to compare against, shape ``N``.
        target: true OA, shape ``N``.
        groups: group id per row (the image), length ``N``.
        n_boot: bootstrap draws.
        seed: seed of the draws.

    Returns:
        ``{"srcc": {...}, "plcc": {...}}``, each with ``diff`` (a - b on all rows), ``low`` and ``high``
        (the 2.5 and 97.5 percentiles of the drawn differences), ``a_better`` (share of draws in
        which a is ahead) and ``verdict`` (:func:`verdict`: the only words a claim may use).
    """
    return PairedBootstrap(target, groups, n_boot, seed).compare(pred_a, pred_b)


class PairedBootstrap:
    """The paired bootstraps of many scores on one test set (:func:`paired_bootstrap` per pair).

    The draws depend on the groups, ``n_boot`` and ``seed`` only, so every pair is measured on the same
    draws; each score's correlations over the draws are computed once and kept (keyed by its values),
    and a pair's differences are those of the two kept vectors: the numbers of :func:`paired_bootstrap`
    to the last bit, with one correlation pass per score instead of two per pair.

    Args:
        target: true OA, shape ``N``.
        groups: group id per row (the image), length ``N``; every group of one size.
        n_boot: bootstrap draws.
        seed: seed of the draws.
    """

    def __init__(self, target: Any, groups: Sequence[Any], n_boot: int = 1000, seed: int = 0):
        self.t = np.asarray(target, dtype=np.float64).reshape(-1)
        g = np.asarray(groups)
        if len(self.t) != len(g):
            raise RSSQAError(f"metrics: paired bootstrap needs equal lengths, got {len(self.t)} targets and {len(g)} groups")
        _, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
        sizes = {len(m) for m in members}
        if len(sizes) != 1:
            raise RSSQAError(f"metrics: paired bootstrap needs groups of one size (every image with every method), got sizes {sorted(sizes)}")
        draws = np.random.default_rng(seed).integers(0, len(members), (n_boot, len(members)))
        self.idx = np.stack([np.concatenate([members[k] for k in d]) for d in draws], axis=1)  # N × n_boot
        self._tt = torch.from_numpy(self.t[self.idx])
        self._target_ranks: torch.Tensor | None = None
        self._kept: dict[tuple[str, bytes], np.ndarray] = {}

    def _drawn(self, name: str, over_draws: Callable[[np.ndarray], torch.Tensor], pred: np.ndarray) -> np.ndarray:
        key = (name, pred.tobytes())
        if key not in self._kept:
            self._kept[key] = over_draws(pred[self.idx]).numpy()
        return self._kept[key]

    def _pearson(self, drawn: np.ndarray) -> torch.Tensor:
        """torchmetrics' ``pearson_corrcoef`` of each draw (a column of ``drawn``) with the target's."""
        return pearson_corrcoef(torch.from_numpy(drawn), self._tt)

    def _spearman(self, drawn: np.ndarray) -> torch.Tensor:
        """torchmetrics' ``spearman_corrcoef`` of each draw (a column of ``drawn``) with the target's, to the
        last bit, with every column ranked in one pass and the target's draws ranked once for every score
        (torchmetrics ranks column by column, both sides each time)."""
        if self._target_ranks is None:
            self._target_ranks = column_ranks(self._tt.numpy())
        return spearman_of_ranks(column_ranks(drawn), self._target_ranks)

    def compare(self, pred_a: Any, pred_b: Any) -> dict[str, dict[str, float]]:
        """``a`` against ``b``: what :func:`paired_bootstrap` returns."""
        a = np.asarray(pred_a, dtype=np.float64).reshape(-1)
        b = np.asarray(pred_b, dtype=np.float64).reshape(-1)
        if not (len(a) == len(b) == len(self.t)):
            raise RSSQAError(f"metrics: paired bootstrap needs equal lengths, got {len(a)}, {len(b)}, {len(self.t)}")
        out = {}
        for name, over_draws, one in (("srcc", self._spearman, srcc), ("plcc", self._pearson, plcc)):
            diffs = self._drawn(name, over_draws, a) - self._drawn(name, over_draws, b)
            diffs = diffs[np.isfinite(diffs)]
            out[name] = {
                "diff": one(a, self.t) - one(b, self.t),
                "low": float(np.percentile(diffs, 2.5)) if len(diffs) else math.nan,
                "high": float(np.percentile(diffs, 97.5)) if len(diffs) else math.nan,
                "a_better": float((diffs > 0).mean()) if len(diffs) else math.nan,
            }
            out[name]["verdict"] = verdict(out[name]["low"], out[name]["high"])
        return out


def column_ranks(x: np.ndarray) -> torch.Tensor:
    """The ranks within each column of ``x`` (``N×K``) from 1, ties sharing their mean rank, as float32 and
    laid out (a transposed ``K×N``) as torchmetrics' ``spearman_corrcoef`` makes them column by column:
    ``scipy.stats.rankdata`` over every column at once."""
    from scipy.stats import rankdata

    return torch.from_numpy(np.ascontiguousarray(rankdata(np.asarray(x).T, axis=1), dtype=np.float32)).T


def spearman_of_ranks(preds: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spearman correlation per column from :func:`column_ranks` of predictions and targets: the Pearson
    correlation of the ranks as torchmetrics' ``spearman_corrcoef`` computes it (its eps, clamped to [-1, 1])."""
    preds_diff = preds - preds.mean(0)
    target_diff = target - target.mean(0)
    cov = (preds_diff * target_diff).mean(0)
    preds_std = torch.sqrt((preds_diff * preds_diff).mean(0))
    target_std = torch.sqrt((target_diff * target_diff).mean(0))
    return torch.clamp(cov / (preds_std * target_std + eps), -1.0, 1.0)


def mean_bootstrap(diff: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-image differences (e.g. the chosen method's OA minus the best fixed method's) with the
    95% interval of a bootstrap over images, the share of draws above zero and the :func:`verdict`."""
    diff = np.asarray(diff, dtype=np.float64)
    if not len(diff):
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "a_better": math.nan, "verdict": "tie"}
    draws = np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))
    means = diff[draws].mean(1)
    low, high = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    return {"diff": float(diff.mean()), "low": low, "high": high, "a_better": float((means > 0).mean()), "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    """``ahead`` where a 95% interval of a difference lies above zero, ``behind`` below, ``tie`` otherwise."""
    if math.isfinite(low) and low > 0:
        return "ahead"
    if math.isfinite(high) and high < 0:
        return "behind"
    return "tie"
