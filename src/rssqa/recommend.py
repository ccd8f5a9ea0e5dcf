"""Per-image method recommendation from predicted quality, and how good the recommendations are.

Definitions (shared/DESIGN.md), per test image: the recommended method is the one with the highest
predicted score (ties broken by method name, so the choice is deterministic).

- ``top1``: share of images where the recommended method is a best-OA method (ties in OA all count).
- ``chosen_oa``: mean OA of the recommended methods.
- ``best_fixed_oa``: mean OA of the single method with the best mean OA on the train split.
- ``oracle_oa``: mean per-image best OA.
- ``regret``: ``oracle_oa - chosen_oa``.
- ``top1_within``: share of images where the recommended method is within ``tolerance`` OA of the best
  (when methods nearly tie, picking any of them loses little; ``top1`` alone cannot show that).

:func:`headroom` asks how exact a quality score must be for a top1 target: it ranks each image's methods
by their true OA plus Gaussian noise of a given size, so a model's within-image error can be read against
the top1 it would allow.

:func:`choose_policy` decides what ``rssqa recommend`` does with a trained scorer: rank by its
recommending model where that beat always running the best fixed method on the validation split
(the paired bootstrap interval of the per-image gain above zero), else put the best fixed method first
(:func:`apply_policy`): a per-image choice that has not shown a gain is the worse answer to give.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError

KEYS = ("top1", "regret", "chosen_oa", "best_fixed_oa", "oracle_oa")
# OA values are ratios of pixel counts; two methods with the same count of correct pixels tie exactly,
# this only absorbs float rounding.
_TIE = 1e-12


def _by_image(image_ids: Sequence[Any], methods: Sequence[str], values: Sequence[float]) -> dict:
    table: dict[str, dict[str, float]] = defaultdict(dict)
    if not (len(image_ids) == len(methods) == len(values)):
        raise RSSQAError(f"recommend: {len(image_ids)} image ids, {len(methods)} methods, {len(values)} values")
    for i, m, v in zip(image_ids, methods, values, strict=True):
        if m in table[str(i)]:
            raise RSSQAError(f"recommend: image {i!s} has method {m!r} twice")
        table[str(i)][str(m)] = float(v)
    return table


def _oa_matrix(image_ids: Sequence[Any], methods: Sequence[str], values: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """``(method names sorted, images × methods values)``; every image must have every method once."""
    table = _by_image(image_ids, methods, values)
    names = sorted(set().union(*(set(v) for v in table.values()))) if table else []
    if not names:
        raise RSSQAError("recommend: no rows")
    for image, row in sorted(table.items()):
        if len(row) != len(names):
            raise RSSQAError(f"recommend: image {image} lacks methods {sorted(set(names) - set(row))}")
    return names, np.array([[table[i][m] for m in names] for i in sorted(table)], dtype=np.float64)


def best_fixed_method(image_ids: Sequence[Any], methods: Sequence[str], oa: Sequence[float]) -> str:
    """The method with the highest mean OA (on the rows given: pass the train split).

    Args:
        image_ids: image per row, length ``N``.
        methods: method per row, length ``N``.
        oa: true OA per row in [0, 1], length ``N``.
    """
    by_method: dict[str, list[float]] = defaultdict(list)
    for m, v in zip(methods, oa, strict=True):
        by_method[str(m)].append(float(v))
    if not by_method:
        raise RSSQAError("recommend: no rows to choose a fixed method from")
    return max(sorted(by_method), key=lambda m: np.mean(by_method[m]))


def rank_methods(scores: dict[str, float]) -> list[tuple[str, float]]:
    """Methods of one image by decreasing predicted score, ties by name: ``[(method, score), ...]``."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


POLICY_MODEL, POLICY_FIXED = "model", "fixed"


def choose_policy(val_vs_fixed: dict[str, Any]) -> str:
    """:data:`POLICY_MODEL` where the recommending model's choices were ahead of the best fixed method on
    the validation split (``val_vs_fixed``: :func:`rssqa.metrics.mean_bootstrap` of the per-image gain,
    its verdict ``ahead``), else :data:`POLICY_FIXED`."""
    return POLICY_MODEL if val_vs_fixed.get("verdict") == "ahead" else POLICY_FIXED


def apply_policy(ranking: list[tuple[str, float]], fixed: str | None) -> list[tuple[str, float]]:
    """``ranking`` (:func:`rank_methods`) with ``fixed`` moved first when it is ranked (``None``: as it is)."""
    if fixed is None or fixed not in (m for m, _ in ranking):
        return ranking
    return [kv for kv in ranking if kv[0] == fixed] + [kv for kv in ranking if kv[0] != fixed]


def per_image_choices(
    image_ids: Sequence[Any], methods: Sequence[str], oa: Sequence[float], scores: Sequence[float], best_fixed: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (in sorted id order): the true OA of the method ``scores`` ranks first, of
    ``best_fixed``, and the best true OA. Every image must have every method; the arguments are
    those of :func:`recommend_metrics`."""
    names, true = _oa_matrix(image_ids, methods, oa)
    _, pred = _oa_matrix(image_ids, methods, scores)
    if best_fixed not in names:
        raise RSSQAError(f"recommend: fixed method {best_fixed!r} not among {names}")
    # argmax takes the first of equal scores; the columns are in name order, as in rank_methods
    return true[np.arange(len(true)), pred.argmax(axis=1)], true[:, names.index(best_fixed)], true.max(axis=1)


def recommend_metrics(
    image_ids: Sequence[Any],
    methods: Sequence[str],
    oa: Sequence[float],
    scores: Sequence[float],
    best_fixed: str,
    tolerance: float = 0.01,
) -> dict[str, float]:
    """Score the per-image recommendations on a split (every image must have every method).

    Args:
        image_ids: image per row, length ``N``.
        methods: method per row, length ``N``.
        oa: true OA per row, length ``N``.
        scores: predicted quality per row, length ``N`` (higher is better).
        best_fixed: the method chosen on the train split (:func:`best_fixed_method`).
        tolerance: OA gap to the best that still counts for ``top1_within``.

    Returns:
        ``{top1, regret, chosen_oa, best_fixed_oa, oracle_oa, top1_within}`` as floats, plus ``n_images``.
    """
    return choice_metrics(*per_image_choices(image_ids, methods, oa, scores, best_fixed), tolerance)


def choice_metrics(chosen: np.ndarray, fixed: np.ndarray, best: np.ndarray, tolerance: float = 0.01) -> dict[str, float]:
    """:func:`recommend_metrics` from :func:`per_image_choices`' three per-image OA arrays (for a caller
    that also needs the per-image figures)."""
    out = {
        "top1": float(np.mean(chosen >= best - _TIE)),
        "top1_within": float(np.mean(chosen >= best - tolerance - _TIE)),
        "chosen_oa": float(chosen.mean()),
        "best_fixed_oa": float(fixed.mean()),
        "oracle_oa": float(best.mean()),
        "n_images": len(chosen),
    }
    out["regret"] = out["oracle_oa"] - out["chosen_oa"]
    return out


def within_image_error(image_ids: Sequence[Any], methods: Sequence[str], oa: Sequence[float], scores: Sequence[float]) -> float:
    """Spread of a score's error once each image's own offset is removed: what recommendation suffers from.

    The per-image mean of ``score - OA`` is subtracted (a constant offset per image changes no ranking),
    and the spread is rescaled by ``sqrt(M / (M - 1))`` so it is on the scale of the noise ``sigma`` of
    :func:`headroom`.
    """
    err = _oa_matrix(image_ids, methods, scores)[1] - _oa_matrix(image_ids, methods, oa)[1]
    m = err.shape[1]
    centred = err - err.mean(axis=1, keepdims=True)
    return float(np.sqrt((centred**2).sum() / (centred.size - len(centred))) if m > 1 else 0.0)


def headroom(
    image_ids: Sequence[Any],
    methods: Sequence[str],
    oa: Sequence[float],
    sigmas: Sequence[float] = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1),
    target: float = 0.73,
    repeats: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """top1 of an oracle blurred by noise: each method's true OA plus ``N(0, sigma^2)``, per image.

    Args:
        image_ids, methods, oa: the split's rows (every image must have every method).
        sigmas: noise sizes to report.
        target: the top1 to find the largest allowed noise for (by bisection).
        repeats: noise draws averaged per sigma.
        seed: seed of the draws.

    Returns:
        ``top1_at_sigma`` ``{sigma: top1}``, ``sigma_for_target`` (the largest noise that still reaches
        ``target``; 0 when even a noise-free score misses it) and ``target``.
    """
    _, true = _oa_matrix(image_ids, methods, oa)
    best = true.max(axis=1, keepdims=True)
    gen = np.random.default_rng(seed)
    noise = gen.standard_normal((repeats, *true.shape))

    def top1(sigma: float) -> float:
        pick = np.argmax(true[None] + sigma * noise, axis=2)
        got = np.take_along_axis(np.broadcast_to(true, noise.shape), pick[..., None], axis=2)[..., 0]
        return float((got >= best[None, :, 0] - _TIE).mean())

    lo, hi = 0.0, 1.0
    if top1(lo) < target:
        hi = 0.0
    else:
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if top1(mid) >= target else (lo, mid)
    return {"top1_at_sigma": {f"{s:g}": top1(s) for s in sigmas}, "sigma_for_target": lo if hi > 0 else 0.0, "target": target}
