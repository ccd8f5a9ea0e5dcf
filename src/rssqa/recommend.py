"""Per-image method recommendation from predicted quality, and how good the recommendations are.

Definitions (shared/DESIGN.md), per test image: the recommended method is the one with the highest
predicted score (ties broken by method name, so the choice is deterministic).

- ``top1``: share of images where the recommended method is a best-OA method (ties in OA all count).
- ``chosen_oa``: mean OA of the recommended methods.
- ``best_fixed_oa``: mean OA of the single method with the best mean OA on the train split.
- ``oracle_oa``: mean per-image best OA.
- ``regret``: ``oracle_oa - chosen_oa``.
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


def recommend_metrics(
    image_ids: Sequence[Any],
    methods: Sequence[str],
    oa: Sequence[float],
    scores: Sequence[float],
    best_fixed: str,
) -> dict[str, float]:
    """Score the per-image recommendations on a split (every image must have every method).

    Args:
        image_ids: image per row, length ``N``.
        methods: method per row, length ``N``.
        oa: true OA per row, length ``N``.
        scores: predicted quality per row, length ``N`` (higher is better).
        best_fixed: the method chosen on the train split (:func:`best_fixed_method`).

    Returns:
        ``{top1, regret, chosen_oa, best_fixed_oa, oracle_oa}`` as floats, plus ``n_images``.
    """
    true = _by_image(image_ids, methods, oa)
    pred = _by_image(image_ids, methods, scores)
    if not true:
        raise RSSQAError("recommend: no rows")
    all_methods = set().union(*(set(v) for v in true.values()))
    hits, chosen, fixed, oracle = [], [], [], []
    for image, row in sorted(true.items()):
        if set(row) != all_methods:
            missing = sorted(all_methods - set(row))
            raise RSSQAError(f"recommend: image {image} lacks methods {missing}")
        if best_fixed not in row:
            raise RSSQAError(f"recommend: fixed method {best_fixed!r} not among {sorted(row)}")
        pick = rank_methods(pred[image])[0][0]
        best = max(row.values())
        hits.append(row[pick] >= best - _TIE)
        chosen.append(row[pick])
        fixed.append(row[best_fixed])
        oracle.append(best)
    out = {
        "top1": float(np.mean(hits)),
        "chosen_oa": float(np.mean(chosen)),
        "best_fixed_oa": float(np.mean(fixed)),
        "oracle_oa": float(np.mean(oracle)),
        "n_images": len(true),
    }
    out["regret"] = out["oracle_oa"] - out["chosen_oa"]
    return out
