"""The sqa stage's run: RS-SQA and its ablations, the baselines, recommendation, figures, summary."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rssqa import baselines, intervals, metrics, recommend
from rssqa.agreement import AGREEMENT_NAMES
from rssqa.agreement import BASELINES as AGREEMENT_BASELINES
from rssqa.errors import RSSQAError
from rssqa.progress import line
from rssqa.runs import atomic_write_json, write_summary
from rssqa.tasks.sqa.choice import best_fixed, recommend_policy, recommendation
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.export import export_scorer
from rssqa.tasks.sqa.figures import plot_comparison, plot_embedding, plot_scatter
from rssqa.tasks.sqa.fits import FitJob, Fits, TrainerRecipe
from rssqa.tasks.sqa.folds import cross_validate_groups, crossfit_splits, fold_jobs, fold_splits
from rssqa.tasks.sqa.folds import run_name as fold_run_name
from rssqa.tasks.sqa.loso import above_consensus, leave_one_source_out, loso_jobs
from rssqa.tasks.sqa.pixel import PixelConfig, run_pixel
from rssqa.tasks.sqa.pixel_cache import drop_seam_caches, fill_seam_cache
from rssqa.tasks.sqa.pixel_rows import LABEL as PIXEL_LABEL
from rssqa.tasks.sqa.task import SQATask

# ablation name -> (model variant, semantic features); "rs_sqa" is the configured model itself
ABLATIONS: dict[str, tuple[str | None, str]] = {
    "image_only": ("image_only", "clip_rs"),
    "seg_only": ("seg_only", "clip_rs"),
    "no_gating": ("no_gating", "clip_rs"),
    "generic_clip": (None, "generic_clip"),
}
# label-free scores: the method's own softmax, and agreement with the other methods of the image
LABEL_FREE = ("msp", "entropy", "margin", "atc", *AGREEMENT_BASELINES)
AGREEMENT_MODEL = "with_agreement"  # RS-SQA that also reads agreement between methods (a variant)
RANKING_MODEL = "with_agreement_ranking"  # the same, trained with stronger ranking terms, for recommendation
CROSSFIT = "pxfold"  # the recommender's fits per fold of the train split (the pixel head's train-split weights)
PIXEL_FOLD = "pixel_fold"  # the pixel error heads of the group folds (run by the fit workers)
RECOMMENDERS = (RANKING_MODEL, AGREEMENT_MODEL, "rs_sqa")  # the first one trained recommends methods
ERROR_MAP = "error_map"  # the OA the pixel error head's map predicts (1 - its mean error probability)
# the exported heads, under the keys scorer.json gives them: their predicted OA gets an interval (rssqa.intervals)
SCORER_HEADS = {"rs_sqa": "model", AGREEMENT_MODEL: "agreement_model", RANKING_MODEL: "ranking_model"}
BASELINE_KEYS = (*LABEL_FREE, *ABLATIONS, AGREEMENT_MODEL, RANKING_MODEL, ERROR_MAP)
SUMMARY_METRICS = ("srcc", "plcc", "krcc", "rmse")


def baseline_scores(data: SQADataModule) -> dict[str, dict[str, np.ndarray]]:
    """The label-free baselines on every split: ``{name: {split: scores}}``.

    ``msp``, ``entropy`` and ``margin`` are read from the table; ``atc`` uses a per-method threshold
    fitted on the train split's confidence histograms; ``agreement`` and ``consensus`` (when RS-SQED
    has agreement between methods) are the mean share of the other methods that agree with the
    method's pixels, and its agreement with their majority vote.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    rows = data.sqed.rows
    for name in ("msp", "entropy", "margin"):
        col = np.array([r[name] for r in rows], dtype=np.float64)
        out[name] = {s: col[data.rows(s)] for s in ("train", "val", "test")}
    atc = np.zeros(len(rows))
    train = np.array(data.rows("train"))
    thresholds = {}
    for method in data.methods:
        fit_rows = train[data.method_of[train] == method]
        t = baselines.fit_atc_threshold(data.hist_conf[fit_rows], data.oa[fit_rows].double().numpy())
        thresholds[method] = t
        mine = np.flatnonzero(data.method_of == method)
        atc[mine] = baselines.share_above(data.hist_conf[mine], t).numpy()
    out["atc"] = {s: atc[data.rows(s)] for s in ("train", "val", "test")}
    if data.agree is not None:  # agreement with the other methods of the image (rssqa.agreement)
        glob = data.agree["agree_global"].double().numpy()
        for name, channel in (("agreement", "share"), ("consensus", "majority")):
            col = glob[:, AGREEMENT_NAMES.index(channel)]
            out[name] = {s: col[data.rows(s)] for s in ("train", "val", "test")}
    out["_atc_thresholds"] = thresholds  # type: ignore[assignment]
    return out


def _headline(pred: np.ndarray, oa: np.ndarray) -> dict[str, float]:
    m = metrics.quality_metrics(pred, oa)
    return {k: _finite(m[k]) for k in (*SUMMARY_METRICS, "plcc_logistic")}


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return _finite(float(obj))
    return obj


def evaluate(
    data: SQADataModule, preds: dict[str, np.ndarray], split: str = "test"
) -> dict[str, Any]:
    """Quality metrics of ``preds[split]`` overall, per source and per method."""
    rows = data.rows(split)
    oa = data.oa[rows].double().numpy()
    p = preds[split]
    return {
        **_headline(p, oa),
        "per_source": _clean(metrics.grouped_metrics(p, oa, data.source_of[rows])),
        "per_method": _clean(metrics.grouped_metrics(p, oa, data.method_of[rows])),
        "n_rows": len(rows),
    }


def recommended_methods(data: SQADataModule, score: np.ndarray, split: str = "test") -> dict[int, int]:
    """Image index -> index (in ``data.methods``) of the method ``score`` (over ``data.rows(split)``) ranks first."""
    rows = data.rows(split)
    best: dict[int, tuple[float, int]] = {}
    for img, m, v in zip(data.image_idx[rows].tolist(), data.method_of[rows], np.asarray(score).tolist(), strict=True):
        if img not in best or v > best[img][0]:
            best[img] = (v, data.methods.index(m))
    return {img: m for img, (_, m) in best.items()}


def predicted_quality(data: SQADataModule, score: np.ndarray, rows: Sequence[int]) -> dict[tuple[int, str], float]:
    """``(image index, method) -> score`` over the table rows ``rows`` (the pixel head's quality weights)."""
    return dict(zip(zip(data.image_idx[rows].tolist(), data.method_of[rows].tolist(), strict=True), np.asarray(score).tolist(), strict=True))


def fold_error_map(
    data: SQADataModule, split_of: np.ndarray, pixel: PixelConfig, seed: int, quality: Mapping[str, Mapping[tuple[int, str], float]]
) -> dict[str, np.ndarray]:
    """A pixel head trained on a group fold (``split_of``, one split per table row; its agreement weighted by
    ``quality``, the fold's recommender's predicted OA on val and test), its error map's OA on the fold's test
    rows. Run by a fit worker (:meth:`~rssqa.tasks.sqa.fits.Fits.call`) on its own data module."""
    original = data.split_of
    data.split_of = split_of
    try:
        _, _, by_row = run_pixel(data, pixel, seed, None, quality)
        return {ERROR_MAP: error_map_scores(data, by_row)}
    finally:
        data.split_of = original


def error_map_scores(data: SQADataModule, by_row: Mapping[tuple[int, int], float], split: str = "test") -> np.ndarray:
    """The error map's OA (:func:`~rssqa.tasks.sqa.pixel.run_pixel`'s third result, by (image index, method
    index)) in the order of ``data.rows(split)``."""
    rows = data.rows(split)
    pairs = zip(data.image_idx[rows].tolist(), data.method_of[rows], strict=True)
    return np.array([by_row[(img, data.methods.index(m))] for img, m in pairs])


def recommendation_headroom(data: SQADataModule, preds: dict[str, dict[str, np.ndarray]], split: str = "test") -> dict[str, Any]:
    """How exact a score must be for top1 to reach 0.73 on ``split``, beside each learned model's
    within-image error (:func:`rssqa.recommend.headroom`, :func:`rssqa.recommend.within_image_error`)."""
    rows = data.rows(split)
    images, methods = data.image_idx[rows].tolist(), data.method_of[rows]
    oa = data.oa[rows].double().numpy()
    out = recommend.headroom(images, methods, oa)
    out["within_image_error"] = {k: recommend.within_image_error(images, methods, oa, p[split]) for k, p in preds.items()}
    return out


def run_sqa(
    task: SQATask,
    data: SQADataModule,
    recipe: TrainerRecipe,
    out: str | os.PathLike,
    ablations: Sequence[str] = tuple(ABLATIONS),
    seed: int = 0,
    agreement_model: bool = True,
    agreement_overrides: dict[str, Any] | None = None,
    loso: bool = False,
    ranking_overrides: dict[str, Any] | None = None,
    pixel: PixelConfig | dict[str, Any] | None = None,
    group_folds: int = 0,
    fit_workers: int = 1,
    threads: int = 0,
) -> dict[str, Any]:
    """The whole stage: RS-SQA, its ablations, the baselines, recommendation, figures, scorer, summary.

    Args:
        task: the configured RS-SQA task (its hyper-parameters are reused by the ablations).
        data: the data module.
        recipe: the Trainer of each fit (loggers and a val-SRCC checkpoint callback).
        out: the run folder; ``summary.json`` is written last.
        ablations: which of :data:`ABLATIONS` to train.
        seed: seeded before every fit, so each run starts from the same state.
        agreement_model: also train RS-SQA with agreement between methods (``with_agreement``) when
            RS-SQED has it; it is exported beside the paper's model and is what recommendation uses.
        agreement_overrides: hyper-parameters of the agreement model that differ from RS-SQA's.
        ranking_overrides: when given (and agreement is trained), a second agreement model with these
            options (stronger ranking terms), trained for recommendation alone (``with_agreement_ranking``):
            exported as the scorer's ranking head, which ``rssqa recommend`` uses.
        loso: also train RS-SQA (and the agreement model) leaving each source out in turn
            (:mod:`rssqa.tasks.sqa.loso`); the summary's ``leave_one_source_out``.
        pixel: the pixel error head's config (:class:`~rssqa.tasks.sqa.pixel.PixelConfig`; ``None``:
            its defaults): trained, tested against the per-pixel baselines (the summary's
            ``pixel_error``, null when disabled) and exported into the scorer.
        group_folds: when at least 3, also cross-validate over the split groups (:mod:`rssqa.tasks.sqa.folds`):
            RS-SQA and the agreement models trained once per fold, every image of the train, val and test
            splits scored by heads that never saw its group; the summary's ``group_folds``.
        fit_workers: processes that train the heads (:class:`~rssqa.tasks.sqa.fits.Fits`; 1: this one).
            Each fit is seeded alone, so with the same ``threads`` the numbers do not depend on it.
        threads: torch threads of each fit worker (0: torch's default).

    Returns:
        The summary.
    """
    t0 = time.perf_counter()
    out = Path(out)
    pixel = PixelConfig.of(pixel)
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise RSSQAError(f"ablations: {sorted(unknown)} unknown; choose from {list(ABLATIONS)}")
    data.setup("fit")
    if "generic_clip" in ablations and "generic_clip" not in data.sem:
        raise RSSQAError("ablations: generic_clip needs data.generic_clip (the raw-corpus CLIP, make pretrain-raw)")
    own = set(inspect.signature(SQATask.__init__).parameters) - {"self", "dims", "methods", "feat_dim"}
    hparams = {k: v for k, v in task.hparams.items() if k in own}
    for key, over in (("agreement_overrides", agreement_overrides), ("ranking_overrides", ranking_overrides)):
        bad = set(over or {}) - own
        if bad:
            raise RSSQAError(f"{key}: {sorted(bad)} are not model options")

    # every fit is known now: queued at once, so that worker processes (fit_workers > 1) train them while
    # this process goes on; the recommender and its folds first (the pixel head waits for them alone and
    # trains here while the workers go on with the ablations), LOSO last
    agree_hp = {**hparams, **(agreement_overrides or {}), "agreement": True}
    with_agreement = agreement_model and data.agree is not None
    loso_models = {"rs_sqa": hparams, **({AGREEMENT_MODEL: agree_hp} if with_agreement else {})}
    fold_models = {**loso_models, **({RANKING_MODEL: {**agree_hp, **ranking_overrides}} if with_agreement and ranking_overrides else {})}
    jobs = [FitJob(name, hp, seed=seed) for name, hp in fold_models.items()]  # RS-SQA and the agreement models
    crossfit = crossfit_jobs(data, pixel, fold_models, seed)
    jobs += crossfit
    for name in ablations:
        variant, semantic = ABLATIONS[name]
        jobs.append(FitJob(name, {**hparams, "variant": variant or hparams["variant"]}, semantic, seed=seed))
    if loso:
        jobs += loso_jobs(loso_models, data, seed)
    if group_folds:
        jobs += fold_jobs(fold_models, data, group_folds, seed)
    recommender = next(k for k in RECOMMENDERS if k in fold_models)
    with_map = bool(group_folds) and pixel.enabled and pixel.group_folds and recommender != "rs_sqa"
    with Fits(data, recipe, fit_workers, threads) as fits:
        for job in jobs:
            fits.submit(job)
        seam = {}
        if with_map:  # several pixel heads read the same images: the methods run over each one once
            t = time.perf_counter()
            seam = {"sources": fill_seam_cache(data, pixel.block, pixel.cache_gb * 1e9), "seconds": round(time.perf_counter() - t, 2)}
        summary = _evaluate_runs(
            fits, [j.run for j in jobs if not j.run.startswith(("loso_", "fold", CROSSFIT))], data, out, seed, pixel, hparams,
            agreement_overrides, ranking_overrides, crossfit,
        )  # fmt: skip
        if seam:
            summary["pixel_seam_cache"] = seam
        if with_map:
            # a pixel head per group fold, weighted by that fold's recommender: queued to the fit workers, which
            # are done with the fits by now, while this process goes on (leave one source out)
            for f, split in enumerate(fold_splits(data, group_folds)):
                scores = fits.result(fold_run_name(f, recommender))[1]
                quality = {s: predicted_quality(data, scores[s], np.flatnonzero(split == s).tolist()) for s in ("val", "test")}
                fits.call(f"{PIXEL_FOLD}{f}", fold_error_map, split, pixel, seed, quality)
        if loso:
            folds = leave_one_source_out(
                loso_models, data, lambda run: fits.result(run)[1]["test"], baseline_scores, recommendation, LABEL_FREE
            )  # fmt: skip
            summary["leave_one_source_out"] = folds
            if folds and all("consensus" in f for f in folds.values()):
                # on how many held-out sources each learned model ranks better than consensus (SRCC), and on how
                # many the paired bootstrap says ahead (the interval excludes zero)
                counts = {m: above_consensus(folds, m) for m in loso_models}
                summary["loso_above_consensus"] = {m: c["above"] for m, c in counts.items()}
                summary["loso_ahead_of_consensus"] = {m: c["ahead"] for m, c in counts.items()}
        if group_folds:
            summary["group_folds"] = cross_validate_groups(
                fold_models, data, group_folds, lambda run: fits.result(run)[1]["test"], baseline_scores, best_fixed,
                LABEL_FREE, recommender, seed, extra=(lambda f, _: fits.call_result(f"{PIXEL_FOLD}{f}")) if with_map else None,
                extra_names=(ERROR_MAP,) if with_map else (), val_predictions=lambda run: fits.result(run)[1]["val"],
            )  # fmt: skip
        if seam:
            drop_seam_caches(data)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary = _clean(summary)
    write_summary(out, summary)
    return summary


def _evaluate_runs(
    fits: Fits,
    names: list[str],
    data: SQADataModule,
    out: Path,
    seed: int,
    pixel: PixelConfig,
    hparams: dict[str, Any],
    agreement_overrides: dict[str, Any] | None,
    ranking_overrides: dict[str, Any] | None,
    crossfit: Sequence[FitJob] = (),
) -> dict[str, Any]:
    """Everything but leave-one-source-out: the comparison, recommendation, figures, pixel head, scorer."""
    # the error map serves the method the scorer recommends: the ranking head, else the agreement model's, else
    # RS-SQA's; its head trains as soon as that fit and its folds are done, the other fits going on meanwhile
    recommender = fits.result(next(k for k in RECOMMENDERS if k in names))[1]
    folds = [(job, fits.result(job.run)[1]["test"]) for job in crossfit]
    pixel_head, pixel_error, pixel_quality = pixel_head_for(data, pixel, seed, recommender, folds) if pixel.enabled else (None, None, {})
    main, preds, best = fits.result("rs_sqa")
    runs = {"rs_sqa": {"preds": preds, "best_val_srcc": best, "variant": hparams["variant"]}}
    for name in names[1:]:
        t, p, b = fits.result(name)
        runs[name] = {"preds": p, "best_val_srcc": b, "variant": t.hparams.variant}
    agree_task = fits.result(AGREEMENT_MODEL)[0] if AGREEMENT_MODEL in runs else None
    rank_task = fits.result(RANKING_MODEL)[0] if RANKING_MODEL in runs else None
    # the table's order: RS-SQA, the ablations, then the agreement models
    runs = {k: runs[k] for k in sorted(runs, key=lambda k: (k in (AGREEMENT_MODEL, RANKING_MODEL), k != "rs_sqa"))}

    base = baseline_scores(data)
    thresholds = base.pop("_atc_thresholds")
    test_rows = data.rows("test")
    oa_test = data.oa[test_rows].double().numpy()
    test_scores = {**{k: v["test"] for k, v in base.items()}, **{k: v["preds"]["test"] for k, v in runs.items() if k != "rs_sqa"}}
    if pixel_error is not None:  # a score of its own: the OA each test row's error map predicts
        test_scores[ERROR_MAP] = error_map_scores(data, pixel_quality)
    table: dict[str, Any] = {k: _headline(test_scores[k], oa_test) if k in test_scores else None for k in BASELINE_KEYS}
    test = evaluate(data, preds)
    images_test = data.image_idx[test_rows].numpy()

    boot = metrics.PairedBootstrap(oa_test, images_test, seed=seed)  # one set of draws for every pair

    def versus(score: np.ndarray, skip: str) -> dict[str, Any]:
        return {
            k: boot.compare(score, test_scores[k] if k != "rs_sqa" else preds["test"])
            for k in ("rs_sqa", *BASELINE_KEYS) if k != skip and (k in test_scores or k == "rs_sqa")
        }  # fmt: skip

    rec = recommendation(data, preds)
    rec_baselines = {n: recommendation(data, base[n]) for n in LABEL_FREE if n in base}
    rec_baselines.update({n: recommendation(data, runs[n]["preds"]) for n in runs if n != "rs_sqa"})
    if ERROR_MAP in test_scores:
        rec_baselines[ERROR_MAP] = recommendation(data, {"test": test_scores[ERROR_MAP]})
    headroom = recommendation_headroom(data, {k: v["preds"] for k, v in runs.items()})
    rec_model = next(k for k in RECOMMENDERS if k in runs)
    policy = recommend_policy(data, rec_model, runs[rec_model]["preds"])

    # how far each exported head's predicted OA may be from the truth: offsets from the val rows, tried on test
    oa_val = data.oa[data.rows("val")].double().numpy()
    fitted = {name: intervals.fit(runs[name]["preds"]["val"], oa_val) for name in SCORER_HEADS if name in runs}
    tried = {name: {**f, "test": intervals.coverage(runs[name]["preds"]["test"], oa_test, f)} for name, f in fitted.items()}

    figures = out / "figures"
    plot_scatter(preds["test"], oa_test, data.method_of[test_rows], figures / "scatter_test.png", title="RS-SQA on test")
    sem = data.sem["clip_rs"]
    per_image_oa = np.zeros(len(data.image_keys))
    counts = np.zeros(len(data.image_keys))
    np.add.at(per_image_oa, data.image_idx.numpy(), data.oa.double().numpy())
    np.add.at(counts, data.image_idx.numpy(), 1)
    plot_embedding(sem["embed"].numpy(), per_image_oa / counts, figures / "clip_embedding.png", groups=_image_sources(data))
    plot_comparison(table, test, figures / "comparison.png")

    scorer_dir = export_scorer(
        main, data, out / "scorer", best_fixed=rec["best_fixed_method"], agreement=agree_task, ranking=rank_task,
        pixel=pixel_head, policy={k: policy[k] for k in ("policy", "model", "method")} | {"val_vs_best_fixed": policy["val"]["vs_best_fixed"]},
        intervals={SCORER_HEADS[name]: f for name, f in fitted.items()},
    )  # fmt: skip
    ranking = sorted(
        ((k, v["srcc"]) for k, v in {"rs_sqa": test, **{k: v for k, v in table.items() if v}}.items() if v["srcc"] is not None),
        key=lambda kv: -kv[1],
    )
    label_free = max((table[k]["srcc"] for k in LABEL_FREE if table[k] and table[k]["srcc"] is not None), default=None)
    summary = {
        "test": {k: test[k] for k in (*SUMMARY_METRICS, "plcc_logistic", "n_rows")},
        "test_per_source": test["per_source"],
        "test_per_method": test["per_method"],
        "baselines": table,
        "recommend": {k: rec[k] for k in (*recommend.KEYS, "top1_within", "gap_closed", "vs_best_fixed", "n_images", "best_fixed_method")},
        "recommend_baselines": {
            k: {m: v[m] for m in ("top1", "top1_within", "regret", "chosen_oa", "gap_closed", "vs_best_fixed")} for k, v in rec_baselines.items()
        },
        "recommend_headroom": headroom,
        "recommend_policy": policy,
        "pixel_error": pixel_error,
        "intervals": tried,
        "srcc_ranking": [k for k, _ in ranking],
        "vs_rs_sqa": {k: v for k, v in versus(preds["test"], "rs_sqa").items() if k != "rs_sqa"},
        "srcc_margin_over_label_free": None if label_free is None or test["srcc"] is None else test["srcc"] - label_free,
        "val_srcc": {k: _finite(v["best_val_srcc"]) for k, v in runs.items()},
        "atc_thresholds": thresholds,
        "n_rows": {s: len(data.rows(s)) for s in ("train", "val", "test")},
        "n_images": len(data.image_keys),
        "methods": data.methods,
        "sources": sorted(set(data.source_of.tolist())),
        "clip": str(data.hparams.clip),
        "generic_clip": data.hparams.generic_clip,
        "scorer": str(scorer_dir),
        "figures": sorted(str(p.relative_to(out)) for p in figures.glob("*.png")),
        "hparams": {k: v for k, v in hparams.items()},
        "seed": seed,
    }
    if AGREEMENT_MODEL in runs:
        summary["vs_with_agreement"] = versus(runs[AGREEMENT_MODEL]["preds"]["test"], AGREEMENT_MODEL)
        summary["agreement_hparams"] = {**(agreement_overrides or {}), "agreement": True}
    if ERROR_MAP in test_scores:
        summary["vs_error_map"] = versus(test_scores[ERROR_MAP], ERROR_MAP)
    if RANKING_MODEL in runs:
        summary["ranking_hparams"] = {**(agreement_overrides or {}), **ranking_overrides, "agreement": True}
    extra = {ERROR_MAP: {"test": test_scores[ERROR_MAP]}} if ERROR_MAP in test_scores else {}
    atomic_write_json(out / "predictions.json", _predictions(data, runs, {**base, **extra}))
    return summary


def pixel_head_for(
    data: SQADataModule, pixel: PixelConfig, seed: int, recommender: Mapping[str, np.ndarray],
    crossfit: Sequence[tuple[FitJob, np.ndarray]] = (),
) -> tuple[Any, dict[str, Any], dict[tuple[int, int], float]]:
    """The pixel error head weighted by a recommending model (:func:`~rssqa.tasks.sqa.pixel.run_pixel`).

    Args:
        recommender: the recommending model's predictions per split (``val``, ``test``).
        crossfit: each fold's fit of it on the train split (:func:`crossfit_jobs`) with its predictions
            on the fold's ``test`` rows: out-of-fold weights for the head's train-split rows.
    """
    chosen = recommended_methods(data, recommender["test"])
    quality = {s: predicted_quality(data, recommender[s], data.rows(s)) for s in ("val", "test")}
    if crossfit:  # out-of-fold scores on the train split, each from the fit that did not see its fold
        quality["train"] = {}
        for job, preds in crossfit:
            quality["train"].update(predicted_quality(data, preds, np.flatnonzero(job.split_of == "test")))
    return run_pixel(data, pixel, seed, chosen, quality)


def crossfit_jobs(data: SQADataModule, pixel: PixelConfig, models: dict[str, dict[str, Any]], seed: int) -> list[FitJob]:
    """The recommending model of ``models`` (run name -> hyper-parameters; the first of
    :data:`RECOMMENDERS`) once per fold of the train split (``pixel.quality_folds``): out-of-fold quality
    weights for the pixel head's train-split rows; none when the head reads no weights (they need agreement)."""
    name = next(k for k in RECOMMENDERS if k in models)
    if not (pixel.enabled and pixel.quality_power > 0 and pixel.quality_folds and name != "rs_sqa"):
        return []
    hp = models[name]
    splits = crossfit_splits(data, pixel.quality_folds)
    if not splits:
        line(PIXEL_LABEL, "pixel.quality_folds: the train split has fewer than two groups; the pixel head trains on val images only")
    return [FitJob(f"{CROSSFIT}{f}_{name}", hp, split_of=split, seed=seed) for f, split in enumerate(splits)]


def _image_sources(data: SQADataModule) -> np.ndarray:
    src = np.empty(len(data.image_keys), dtype=object)
    src[data.image_idx.numpy()] = data.source_of
    return src.astype(str)


def _predictions(data: SQADataModule, runs: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    rows = data.rows("test")
    table = data.sqed.rows
    return {
        "rows": [{"key": table[i]["key"], "method": table[i]["method"], "oa": table[i]["oa"]} for i in rows],
        "scores": {
            **{k: v["preds"]["test"].round(6).tolist() for k, v in runs.items()},
            **{k: np.asarray(v["test"]).round(6).tolist() for k, v in base.items()},
        },
    }
