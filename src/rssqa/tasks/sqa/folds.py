"""Cross-validation over split groups: on a small labelled set, every area is the test split once.

A user's own labelled folder is often a handful of areas (the ``group_pattern`` of a source): a
split that holds whole areas leaves one or two areas for testing, and a figure measured on one
area says as much about that area as about the score. With ``group_folds: K`` the groups of the
train, val and test splits (never the seg split's, whose images trained the methods) are dealt into
``K`` folds of about equal size; each fold in turn is the test split, the next fold the val split,
the rest the train split. The quality heads are trained once per fold (:func:`fold_jobs`, run
wherever :class:`~rssqa.tasks.sqa.fits.Fits` runs them) and every image is scored by the heads that
never saw its area. :func:`cross_validate_groups` compares them with the label-free scores on those
out-of-fold rows: per fold, and pooled, with the paired bootstrap over images (SRCC) and a bootstrap
of the per-image gain of the recommended method over the best fixed method (chosen on each fold's
train split).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rssqa import intervals, metrics, recommend
from rssqa.errors import RSSQAError
from rssqa.tasks.sqa.choice import val_policy
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.fits import FitJob

ROTATING = ("train", "val", "test")  # the splits whose groups the folds deal out again


def _group_keys(data: SQADataModule) -> np.ndarray:
    """``source/group`` per table row (group names are a source's own)."""
    return np.array([f"{r['source']}/{r['group']}" for r in data.sqed.rows], dtype=object)


def fold_of_groups(data: SQADataModule, k: int) -> dict[str, int]:
    """Each group of the rotating splits -> its fold: largest groups first, each to the fold with the
    fewest rows so far (ties to the lower fold); the same table gives the same folds."""
    keys = _group_keys(data)
    rotating = np.isin(data.split_of, ROTATING)
    names, counts = np.unique(keys[rotating], return_counts=True)
    if k < 3:
        raise RSSQAError(f"group_folds: {k}; need at least 3 (a train, a val and a test fold), or 0 for none")
    if len(names) < k:
        raise RSSQAError(
            f"group_folds: {k} folds but only {len(names)} groups in the train, val and test splits "
            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); use at most {len(names)}"
        )  # fmt: skip
    sizes, out = np.zeros(k, int), {}
    for i in sorted(range(len(names)), key=lambda i: (-counts[i], names[i])):
        f = int(np.argmin(sizes))
        out[str(names[i])] = f
        sizes[f] += counts[i]
    return out


def fold_splits(data: SQADataModule, k: int) -> list[np.ndarray]:
    """Per fold, the split of every table row: its test fold ``test``, the next fold ``val``, the other
    folds ``train``; the seg split's rows ``unused``."""
    fold = fold_of_groups(data, k)
    keys = _group_keys(data)
    rotating = np.isin(data.split_of, ROTATING)
    row_fold = np.array([fold.get(g, -1) if r else -1 for g, r in zip(keys, rotating, strict=True)])
    out = []
    for f in range(k):
        split = np.full(len(keys), "unused", dtype=data.split_of.dtype)
        split[rotating] = "train"
        split[row_fold == f] = "test"
        split[row_fold == (f + 1) % k] = "val"
        out.append(split)
    return out


def crossfit_splits(data: SQADataModule, k: int) -> list[np.ndarray]:
    """Per fold, the split of every table row for out-of-fold quality weights on the train split: the
    train split's groups dealt into ``k`` folds (round robin over the sorted ``source/group`` keys; an
    image's methods share its group), the fold's rows ``test``, the other train rows ``train``, the val
    rows ``val`` (epoch selection, as in the full fit), everything else ``unused``. With fewer groups
    than ``k``, one fold per group; with fewer than two groups, none (no out-of-fold scores)."""
    if k < 2:
        raise RSSQAError(f"pixel.quality_folds: {k} folds; out-of-fold scores need at least 2")
    keys = _group_keys(data)
    train = data.split_of == "train"
    groups = sorted(set(keys[train].tolist()))
    if len(groups) < 2:
        return []
    k = min(k, len(groups))
    fold = {g: i % k for i, g in enumerate(groups)}
    out = []
    for f in range(k):
        split = np.full(len(keys), "unused", dtype=object)
        split[data.split_of == "val"] = "val"
        split[train] = ["test" if fold[g] == f else "train" for g in keys[train]]
        out.append(split)
    return out


def run_name(fold: int, model: str) -> str:
    """The fit of ``model`` on fold ``fold``."""
    return f"fold{fold}_{model}"


def fold_jobs(models: Mapping[str, dict[str, Any]], data: SQADataModule, k: int, seed: int = 0) -> list[FitJob]:
    """The fits :func:`cross_validate_groups` reads: each of ``models`` (run name -> :class:`SQATask` arguments) on each fold."""
    return [
        FitJob(run_name(f, name), hparams, split_of=split, seed=seed)
        for f, split in enumerate(fold_splits(data, k))
        for name, hparams in models.items()
    ]


def cross_validate_groups(
    models: Mapping[str, dict[str, Any]],
    data: SQADataModule,
    k: int,
    test_predictions: Callable[[str], np.ndarray],
    baselines: Callable[[SQADataModule], dict[str, Any]],
    best_fixed: Callable[[SQADataModule], str],
    label_free: Sequence[str],
    recommender: str,
    seed: int = 0,
    n_boot: int = 1000,
    extra: Callable[[int, SQADataModule], Mapping[str, np.ndarray]] | None = None,
    extra_names: Sequence[str] = (),
    val_predictions: Callable[[str], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Out-of-fold figures of ``models`` and the label-free scores, per fold and pooled.

    Args:
        models: run name -> :class:`SQATask` arguments (the fits of :func:`fold_jobs`).
        data: the prepared data module (its splits are restored afterwards).
        k: the number of folds.
        test_predictions: fit name (:func:`run_name`) -> its predictions on that fold's test rows.
        baselines: :func:`rssqa.tasks.sqa.run.baseline_scores` (``atc`` refitted on each fold's train split).
        best_fixed: the best fixed method on the data module's train split.
        label_free: the label-free scores to report beside the models.
        recommender: the model whose first-ranked method is the recommendation (``pooled.recommend``).
        seed: seeds the bootstraps.
        n_boot: bootstrap draws.
        extra: ``(fold, data)`` -> more learned scores on that fold's test rows (``data`` has the fold's
            split), named ``extra_names``: e.g. the error map of a pixel head trained for the fold.
        extra_names: the names ``extra`` returns; they are compared like ``models``.
        val_predictions: fit name -> its predictions on that fold's val rows: each fold then decides, as the
            stage does for its scorer (:func:`rssqa.tasks.sqa.choice.val_policy`), between the recommender's choices
            and the best fixed method on its val split, and ``pooled.policy`` holds what that decision gives; and
            each model's predicted-OA intervals come from its fold's val rows.

    Returns:
        ``{"k", "folds": [{groups, n_images, best_fixed_method, best_fixed_oa, oracle_oa, scores: {name: {srcc,
        regret, chosen_oa, interval}}}],
        "pooled": {n_images, n_rows, srcc: {name: value}, mean_fold_srcc: {name: value}, best_label_free, models,
        vs_consensus: {model: paired bootstrap}, vs_best_label_free: {model: ...}, recommend: {name:
        {chosen_oa, best_fixed_oa, oracle_oa, regret, gap_closed, vs_best_fixed}}, recommended_minus_best_fixed: {...},
        policy, intervals: {model: coverage}, error: {model: {bias, rmse}}}}``. A model's ``interval`` (with
        ``val_predictions``) is how the intervals of its predicted OA measured on the fold's val rows
        (:func:`rssqa.intervals.fit`) did on its test rows (the figures of :func:`rssqa.intervals.coverage`);
        ``pooled.intervals`` the same over every out-of-fold row.
    """
    original = data.split_of.copy()
    fold_of = fold_of_groups(data, k)
    n = len(data.split_of)
    learned = (*models, *extra_names)
    pooled = {name: np.full(n, np.nan) for name in (*learned, *label_free)}
    tested = np.zeros(n, bool)
    per_image: dict[str, list[np.ndarray]] = {}  # per score: images x (chosen, best fixed, best) OA, fold by fold
    covered: dict[str, list[np.ndarray]] = {}  # per model: intervals.outside's rows, fold by fold
    folds = []
    try:
        for f, split in enumerate(fold_splits(data, k)):
            data.split_of = split
            rows = data.rows("test")
            oa = data.oa[rows].double().numpy()
            scores = {name: np.asarray(test_predictions(run_name(f, name)), np.float64) for name in models}
            if extra is not None:
                scores.update({name: np.asarray(v, np.float64) for name, v in extra(f, data).items() if name in extra_names})
            base = baselines(data)
            base.pop("_atc_thresholds", None)
            scores.update({name: np.asarray(v["test"], np.float64) for name, v in base.items() if name in label_free})
            fixed = best_fixed(data)
            fold: dict[str, Any] = {
                "groups": sorted(g for g, i in fold_of.items() if i == f), "n_images": len(set(data.image_idx[rows].tolist())),
                "best_fixed_method": fixed, "scores": {},
            }  # fmt: skip
            for name, pred in scores.items():
                pooled[name][rows] = pred
                picks = np.stack(recommend.per_image_choices(data.image_idx[rows].tolist(), data.method_of[rows], oa, pred, fixed), 1)
                per_image.setdefault(name, []).append(picks)
                fold["scores"][name] = {"srcc": metrics.srcc(pred, oa), "chosen_oa": float(picks[:, 0].mean()),
                                        "regret": float((picks[:, 2] - picks[:, 0]).mean())}  # fmt: skip
            fold["best_fixed_oa"], fold["oracle_oa"] = float(picks[:, 1].mean()), float(picks[:, 2].mean())  # any score's
            if val_predictions is not None:  # each model's predicted-OA interval from the fold's val rows, tried on its test rows
                oa_val = data.oa[data.rows("val")].double().numpy()
                for name in models:
                    fitted = intervals.fit(np.asarray(val_predictions(run_name(f, name)), np.float64), oa_val)
                    covered.setdefault(name, []).append(intervals.outside(scores[name], oa, fitted))
                    fold["scores"][name]["interval"] = intervals.summarise(covered[name][-1])
            if val_predictions is not None and recommender in models:
                fold["policy"], _ = val_policy(data, np.asarray(val_predictions(run_name(f, recommender)), np.float64), fixed, n_boot, seed)
                mine = per_image[recommender][-1]
                per_image.setdefault(POLICY, []).append(mine if fold["policy"] == recommend.POLICY_MODEL else mine[:, [1, 1, 2]])
            tested[rows] = True
            folds.append(fold)
    finally:
        data.split_of = original
    rows = np.flatnonzero(tested)
    oa, images = data.oa[rows].double().numpy(), data.image_idx[rows].numpy()
    names = [m for m in pooled if np.isfinite(pooled[m][rows]).all()]
    srcc = {m: metrics.srcc(pooled[m][rows], oa) for m in names}
    others = [m for m in label_free if m in srcc and m != "consensus"]
    best_lf = max(others, key=lambda m: np.nan_to_num(srcc[m], nan=-2.0)) if others else None

    boot = metrics.PairedBootstrap(oa, images, n_boot, seed)

    def versus(against: str | None) -> dict[str, Any]:
        if against not in srcc:
            return {}
        return {m: boot.compare(pooled[m][rows], pooled[against][rows])["srcc"] for m in learned if m in srcc}

    choice = {}
    for m in names:
        every = np.concatenate(per_image[m])
        chosen, fixed_oa, oracle = every.mean(0)
        gap = oracle - fixed_oa
        choice[m] = {"chosen_oa": float(chosen), "best_fixed_oa": float(fixed_oa), "oracle_oa": float(oracle),
                     "regret": float(oracle - chosen), "gap_closed": float((chosen - fixed_oa) / gap) if gap > 0 else None,
                     "vs_best_fixed": metrics.mean_bootstrap(every[:, 0] - every[:, 1], n_boot, seed)}  # fmt: skip
    policy = None
    if POLICY in per_image:
        every = np.concatenate(per_image[POLICY])
        policy = {"per_fold": [f["policy"] for f in folds], "chosen_oa": float(every[:, 0].mean()),
                  "best_fixed_oa": float(every[:, 1].mean()), "oracle_oa": float(every[:, 2].mean()),
                  "vs_best_fixed": metrics.mean_bootstrap(every[:, 0] - every[:, 1], n_boot, seed)}  # fmt: skip
    picks = np.concatenate(per_image[recommender]) if recommender in per_image else np.zeros((0, 3))
    gain = picks[:, 0] - picks[:, 1]
    return {
        "k": k,
        "folds": folds,
        "pooled": {
            "n_images": len(np.unique(images)), "n_rows": len(rows), "srcc": srcc,
            "mean_fold_srcc": {m: float(np.mean([f["scores"][m]["srcc"] for f in folds])) for m in names},
            "best_label_free": best_lf, "vs_consensus": versus("consensus"), "vs_best_label_free": versus(best_lf),
            "models": [*models, *(m for m in extra_names if m in srcc)], "recommend": choice, "recommender": recommender,
            "recommended_minus_best_fixed": metrics.mean_bootstrap(gain, n_boot, seed) if len(gain) else None,
            "policy": policy, "intervals": {m: intervals.summarise(np.concatenate(c)) for m, c in covered.items()},
            # how far the models' predicted OA is from the truth on areas they never saw (scores and OA alike)
            "error": {m: {"bias": float(np.mean(pooled[m][rows] - oa)), "rmse": metrics.rmse(pooled[m][rows], oa)}
                      for m in learned if m in srcc},
        },  # fmt: skip
    }


POLICY = "_policy"  # per_image's entry for what each fold's policy chose

