"""Leave one source out: does the quality head hold on a source it never saw?

For each source in turn, the head is trained on the other sources' RS-SQED rows (their train split,
selected on their val split) and tested on the held-out source's test rows, the same rows the main
table uses for that source. The methods and RS-SQED stay as built. Over-fitting to the sources seen
in training shows here as a drop against the training-free ``consensus``.

The held-out source's methods are networks of their own (trained on that source), which no
per-method adapter has read: they are scored through the shared path alone, as an unseen method is
(:meth:`~rssqa.tasks.sqa.data.SQADataModule.adapter_index`). Measured on the demo before that rule,
with each method name's adapter applied to the held-out networks, the agreement model was above
consensus on 1 of the 4 held-out sources; with it, 3 of 4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rssqa import metrics
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.fits import FitJob


def held_out_splits(data: SQADataModule) -> dict[str, np.ndarray]:
    """Per source: the split of every table row with that source held out (its test rows only, the
    other sources' train and val rows; everything else ``unused``)."""
    sources = sorted(set(data.source_of.tolist()))
    if len(sources) < 2:
        return {}
    out = {}
    for held in sources:
        on_held = data.source_of == held
        split = data.split_of.copy()
        split[on_held & (data.split_of != "test")] = "unused"
        split[~on_held & (data.split_of == "test")] = "unused"
        out[held] = split
    return out


def run_name(held: str, model: str) -> str:
    """The fit of ``model`` with source ``held`` left out."""
    return f"loso_{held}_{model}"


def loso_jobs(models: Mapping[str, dict[str, Any]], data: SQADataModule, seed: int = 0) -> list[FitJob]:
    """The fits :func:`leave_one_source_out` reads: each of ``models`` (run name -> :class:`SQATask`
    arguments) with each source held out in turn."""
    return [
        FitJob(run_name(held, name), hparams, split_of=split, seed=seed)
        for held, split in held_out_splits(data).items()
        for name, hparams in models.items()
    ]


def leave_one_source_out(
    models: Mapping[str, dict[str, Any]],
    data: SQADataModule,
    test_predictions: Callable[[str], np.ndarray],
    baselines: Callable[[SQADataModule], dict[str, Any]],
    recommendation: Callable[[SQADataModule, dict[str, np.ndarray]], dict[str, Any]],
    label_free: Sequence[str],
) -> dict[str, Any]:
    """Train each of ``models`` on all sources but one, test on that one, for every source.

    Args:
        models: run name -> :class:`SQATask` arguments (e.g. ``rs_sqa`` and ``with_agreement``).
        data: the prepared data module (its splits are restored afterwards).
        test_predictions: fit name (:func:`run_name`) -> its predictions on that fold's test rows (the
            fits of :func:`loso_jobs`, trained wherever :class:`~rssqa.tasks.sqa.fits.Fits` runs them).
        baselines: :func:`rssqa.tasks.sqa.run.baseline_scores` (``atc`` is refitted on the other sources).
        recommendation: :func:`rssqa.tasks.sqa.choice.recommendation`.
        label_free: names of the label-free baselines to report beside the models.

    Returns:
        ``{held_out_source: {score: {srcc, regret, chosen_oa}, "best_label_free": name, "n_images": n}}``
        with every learned model, every label-free baseline, and the best label-free baseline other
        than ``consensus`` named; each learned model also has ``vs_consensus`` (SRCC minus consensus's:
        diff, low, high, verdict of a paired bootstrap over the held-out source's test images).
    """
    original = data.split_of.copy()
    out: dict[str, Any] = {}
    try:
        for held, split in held_out_splits(data).items():
            data.split_of = split
            rows = data.rows("test")
            oa = data.oa[rows].double().numpy()
            scores = {name: test_predictions(run_name(held, name)) for name in models}
            base = baselines(data)
            base.pop("_atc_thresholds", None)
            scores.update({k: v["test"] for k, v in base.items() if k in label_free})
            fold: dict[str, Any] = {}
            images = data.image_idx[rows].numpy()
            for name, pred in scores.items():
                rec = recommendation(data, {"test": pred})
                fold[name] = {"srcc": metrics.srcc(pred, oa), "regret": rec["regret"], "chosen_oa": rec["chosen_oa"]}
                if name in models and "consensus" in scores:  # how sure: a paired bootstrap over the source's images
                    vs = metrics.paired_bootstrap(pred, scores["consensus"], oa, images)["srcc"]
                    fold[name]["vs_consensus"] = {k: vs[k] for k in ("diff", "low", "high", "verdict")}
            others = [k for k in label_free if k in fold and k != "consensus"]
            fold["best_label_free"] = max(others, key=lambda k: np.nan_to_num(fold[k]["srcc"], nan=-2.0)) if others else None
            fold["n_images"] = len(set(data.image_idx[rows].tolist()))
            out[held] = fold
    finally:
        data.split_of = original
    return out


def above_consensus(folds: Mapping[str, Any], model: str) -> dict[str, int]:
    """Of :func:`leave_one_source_out`'s held-out sources: on how many ``model`` ranks better than
    ``consensus`` in SRCC (``above``), on how many the paired bootstrap says ahead (``ahead``), of ``of``."""
    return {
        "above": sum(f[model]["srcc"] > f["consensus"]["srcc"] for f in folds.values()),
        "ahead": sum(f[model]["vs_consensus"]["verdict"] == "ahead" for f in folds.values()),
        "of": len(folds),
    }
