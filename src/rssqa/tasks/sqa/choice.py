"""Choosing a method per image on a split of the sqa stage's data, and whether that choice earns its place.

:func:`recommendation` scores a score's per-image choices against the best fixed method (the one with the
highest mean OA on the train split) and the oracle. :func:`val_policy` is the one place that decides what
``rssqa recommend`` does with a recommending model (:func:`rssqa.recommend.choose_policy` on the val
split's per-image gain): the stage for its scorer (:func:`recommend_policy`) and every group fold for itself
(:func:`rssqa.tasks.sqa.folds.cross_validate_groups`) call it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rssqa import metrics, recommend
from rssqa.tasks.sqa.data import SQADataModule


def best_fixed(data: SQADataModule) -> str:
    """The method with the highest mean OA on the train split: what a user without a quality score runs."""
    train = data.rows("train")
    return recommend.best_fixed_method(data.image_idx[train].tolist(), data.method_of[train], data.oa[train].tolist())


def recommendation(
    data: SQADataModule,
    preds: dict[str, np.ndarray],
    split: str = "test",
    fixed: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-image method recommendation on ``split`` from ``preds[split]`` against ``fixed`` (default: the
    best fixed method on train); ``vs_best_fixed`` bootstraps the per-image gain over images (``n_boot``
    draws seeded with ``seed``)."""
    rows = data.rows(split)
    fixed = fixed or best_fixed(data)
    chosen, fixed_oa, best = recommend.per_image_choices(
        data.image_idx[rows].tolist(), data.method_of[rows], data.oa[rows].double().tolist(), np.asarray(preds[split]).tolist(), fixed
    )  # fmt: skip
    out = recommend.choice_metrics(chosen, fixed_oa, best)
    gap = out["oracle_oa"] - out["best_fixed_oa"]
    # share of the best-fixed-method-to-oracle gap that the score's choices close (1: the oracle)
    closed = (out["chosen_oa"] - out["best_fixed_oa"]) / gap if gap > 0 else float("nan")
    # how sure: the chosen method's OA minus the best fixed method's, per image, bootstrapped over images
    vs_fixed = metrics.mean_bootstrap(chosen - fixed_oa, n_boot, seed)
    return {**out, "best_fixed_method": fixed, "gap_closed": closed, "vs_best_fixed": vs_fixed}


def val_policy(
    data: SQADataModule, val_pred: np.ndarray, fixed: str | None = None, n_boot: int = 1000, seed: int = 0
) -> tuple[str, dict[str, Any]]:
    """:func:`rssqa.recommend.choose_policy` from a recommending model's predictions on the val rows
    (``val_pred``, in the order of ``data.rows("val")``): the policy and :func:`recommendation` on val."""
    val = recommendation(data, {"val": val_pred}, "val", fixed, n_boot, seed)
    return recommend.choose_policy(val["vs_best_fixed"]), val


def recommend_policy(data: SQADataModule, model: str, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    """What ``rssqa recommend`` does with the exported scorer: :func:`val_policy` for the recommending model
    ``model`` decides between ranking by the model and putting the best fixed method first; ``test`` holds the
    test figures of what was decided."""
    policy, val = val_policy(data, preds["val"])
    fixed = val["best_fixed_method"]
    if policy == recommend.POLICY_FIXED:  # a score that ranks the fixed method first on every image
        preds = {"test": (data.method_of[data.rows("test")] == fixed).astype(np.float64)}
    test = recommendation(data, preds)
    return {
        "policy": policy, "model": model, "method": fixed,
        "val": {k: val[k] for k in ("chosen_oa", "best_fixed_oa", "oracle_oa", "vs_best_fixed", "n_images")},
        "test": {k: test[k] for k in ("top1", "top1_within", "chosen_oa", "best_fixed_oa", "oracle_oa", "regret", "gap_closed", "vs_best_fixed")},
    }  # fmt: skip
