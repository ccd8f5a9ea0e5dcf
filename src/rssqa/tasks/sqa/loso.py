"""Leave one source out: does the quality head hold on a source it never saw?

For each source in turn, the head is trained on the other sources' RS-SQED rows (their train split,
selected on their val split) and tested on the held-out source's test rows, the same rows the main
table uses for that source. The methods and RS-SQED stay as built. Over-fitting to the sources seen
in training shows here as a drop against the training-free ``consensus``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np

from rssqa import metrics
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.task import SQATask


def leave_one_source_out(
    models: Mapping[str, dict[str, Any]],
    data: SQADataModule,
    make_trainer: Callable[[str], L.Trainer],
    fit: Callable[..., tuple[SQATask, dict[str, np.ndarray], float]],
    baselines: Callable[[SQADataModule], dict[str, Any]],
    recommendation: Callable[[SQADataModule, dict[str, np.ndarray]], dict[str, Any]],
    label_free: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Train each of ``models`` on all sources but one, test on that one, for every source.

    Args:
        models: run name -> :class:`SQATask` arguments (e.g. ``rs_sqa`` and ``with_agreement``).
        data: the prepared data module (its splits are restored afterwards).
        make_trainer: run name -> a fresh Trainer.
        fit: :func:`rssqa.tasks.sqa.run.fit_one`.
        baselines: :func:`rssqa.tasks.sqa.run.baseline_scores` (``atc`` is refitted on the other sources).
        recommendation: :func:`rssqa.tasks.sqa.run.recommendation`.
        label_free: names of the label-free baselines to report beside the models.
        seed: seeded before every fit.

    Returns:
        ``{held_out_source: {score: {srcc, regret, chosen_oa}, "best_label_free": name, "n_images": n}}``
        with every learned model, every label-free baseline, and the best label-free baseline other
        than ``consensus`` named.
    """
    sources = sorted(set(data.source_of.tolist()))
    if len(sources) < 2:
        return {}
    original = data.split_of.copy()
    out: dict[str, Any] = {}
    try:
        for held in sources:
            on_held = data.source_of == held
            split = original.copy()
            split[on_held & (original != "test")] = "unused"  # the held-out source: its test rows only
            split[~on_held & (original == "test")] = "unused"  # the others: train and val only
            data.split_of = split
            rows = data.rows("test")
            oa = data.oa[rows].double().numpy()
            scores: dict[str, np.ndarray] = {}
            for name, hparams in models.items():
                L.seed_everything(seed, workers=True)
                _, preds, _ = fit(SQATask(**hparams), data, make_trainer(f"loso_{held}_{name}"))
                scores[name] = preds["test"]
            base = baselines(data)
            base.pop("_atc_thresholds", None)
            scores.update({k: v["test"] for k, v in base.items() if k in label_free})
            fold: dict[str, Any] = {}
            for name, pred in scores.items():
                rec = recommendation(data, {"test": pred})
                fold[name] = {"srcc": metrics.srcc(pred, oa), "regret": rec["regret"], "chosen_oa": rec["chosen_oa"]}
            others = [k for k in label_free if k in fold and k != "consensus"]
            fold["best_label_free"] = max(others, key=lambda k: np.nan_to_num(fold[k]["srcc"], nan=-2.0)) if others else None
            fold["n_images"] = len(set(data.image_idx[rows].tolist()))
            out[held] = fold
    finally:
        data.split_of = original
    return out
