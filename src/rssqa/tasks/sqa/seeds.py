"""How much of an sqa run's headline is its seed? The quality heads trained again under other seeds.

A finished sqa run reports one fit per head, made from one seed. Its figures carry a bootstrap interval
over test images, but not the spread that a rerun with another seed would show: on the demo's RS-SQED
the ranking head's test regret moves by more than its distance to the target from the seed alone. This
module trains RS-SQA, RS-SQA with agreement and the ranking head again on the same RS-SQED, with the
same hyper-parameters and the same splits, once per seed (the seed of the initial weights, dropout
and the order of the training batches: what ``seed_everything`` sets in a rerun), and reports every seed's headline figures
beside their median and range (and, asked for, the pixel error head's map, ``error_map``: the head
trained again per seed, weighted by that seed's recommending model and its fits per fold of the train
split, as the stage trains it; and ``loso``: RS-SQA and the agreement head with each source left out in
turn, on how many held-out sources each is above ``consensus``):

- SRCC on the test split, and minus ``consensus`` with the paired bootstrap interval and its verdict;
- recommendation by that head: top1, regret, the share of the best-fixed-to-oracle gap closed, and the
  chosen method's OA minus the best fixed method's (bootstrap over images, verdict).

The run's own seed, when among the seeds, is a reproduction check: its figures must equal the run's.
Nothing of the run is changed; the fits and the summary go to ``<sqa run>/seeds/``.

    python -m rssqa.tasks.sqa.seeds --run runs/demo/sqa --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rssqa import metrics
from rssqa.errors import RSSQAError
from rssqa.progress import line
from rssqa.runs import is_done, read_summary, write_summary
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.fits import FitJob, Fits, TrainerRecipe
from rssqa.tasks.sqa.loso import above_consensus, leave_one_source_out, loso_jobs
from rssqa.tasks.sqa.pixel import PixelConfig
from rssqa.tasks.sqa.pixel_cache import drop_seam_caches, fill_seam_cache
from rssqa.tasks.sqa.run import (
    AGREEMENT_MODEL,
    ERROR_MAP,
    LABEL_FREE,
    RANKING_MODEL,
    RECOMMENDERS,
    baseline_scores,
    crossfit_jobs,
    error_map_scores,
    pixel_head_for,
    recommendation,
)

LABEL = "sqa/seeds"
FOLDER = "seeds"  # under the sqa run folder
MODELS = ("rs_sqa", AGREEMENT_MODEL, RANKING_MODEL)  # the default; ERROR_MAP and LOSO too when asked for
LOSO = "loso"  # leave each source out in turn (rssqa.tasks.sqa.loso), per seed
FIGURES = ("srcc", "srcc_minus_consensus", "top1", "regret", "gap_closed", "chosen_minus_best_fixed")


def model_hparams(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run name -> hyper-parameters of the heads an sqa summary was trained with (those it has)."""
    if "hparams" not in summary:
        raise RSSQAError("seeds: the sqa summary has no hparams (a run older than this tool); run the sqa stage again")
    base = dict(summary["hparams"])
    out = {"rs_sqa": base}
    if "agreement_hparams" in summary:
        out[AGREEMENT_MODEL] = {**base, **summary["agreement_hparams"]}
    if "ranking_hparams" in summary:
        out[RANKING_MODEL] = {**base, **summary["ranking_hparams"]}
    return out


def head_figures(data: SQADataModule, preds: dict[str, np.ndarray], consensus: np.ndarray | None, seed: int) -> dict[str, Any]:
    """One head's test figures: SRCC, minus ``consensus`` (paired bootstrap), and recommendation."""
    rows = data.rows("test")
    oa = data.oa[rows].double().numpy()
    out: dict[str, Any] = {"srcc": metrics.quality_metrics(preds["test"], oa)["srcc"]}
    if consensus is not None:
        vs = metrics.paired_bootstrap(preds["test"], consensus, oa, data.image_idx[rows].numpy(), seed=seed)["srcc"]
        out["srcc_minus_consensus"] = vs["diff"]
        out["vs_consensus"] = vs
    rec = recommendation(data, preds)
    out.update({k: rec[k] for k in ("top1", "regret", "gap_closed")})
    out["chosen_minus_best_fixed"] = rec["vs_best_fixed"]["diff"]
    out["vs_best_fixed"] = rec["vs_best_fixed"]
    return out


def _range(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per figure: median, min and max over the seeds, and how many seeds say ``ahead``."""
    out: dict[str, dict[str, float]] = {}
    for key in FIGURES:
        values = [v[key] for v in per_seed.values() if v.get(key) is not None]
        if values:
            out[key] = _range(values)
    for key in ("vs_consensus", "vs_best_fixed"):
        verdicts = [v[key]["verdict"] for v in per_seed.values() if key in v]
        if verdicts:
            out[key] = {"ahead": sum(x == "ahead" for x in verdicts), "of": len(verdicts)}
    return out


def reproduced(summary: dict[str, Any], name: str, figures: dict[str, Any], tol: float = 1e-6) -> bool | None:
    """Whether a fit with the run's own seed gives the run's own SRCC and regret (``None``: not recorded)."""
    srcc = summary["test"]["srcc"] if name == "rs_sqa" else (summary.get("baselines", {}).get(name) or {}).get("srcc")
    regret = summary["recommend"]["regret"] if name == "rs_sqa" else (summary.get("recommend_baselines", {}).get(name) or {}).get("regret")
    if srcc is None or regret is None:
        return None
    return abs(srcc - figures["srcc"]) <= tol and abs(regret - figures["regret"]) <= tol


def loso_summary(by_source: dict[int, dict[str, Any]], models: Sequence[str], run: dict[str, Any], run_seed: int) -> dict[str, Any]:
    """Per model: per seed the counts of :func:`~rssqa.tasks.sqa.loso.above_consensus` and each held-out source's SRCC minus
    consensus's; over the seeds the counts' median, min and max; ``reproduced`` (the run's seed gives
    the run's ``leave_one_source_out``)."""
    out: dict[str, Any] = {}
    for m in models:
        per = {
            str(s): {**above_consensus(f, m), "minus_consensus": {src: f[src][m]["srcc"] - f[src]["consensus"]["srcc"] for src in f}}
            for s, f in by_source.items()
        }  # fmt: skip
        spread_ = {k: _range([v[k] for v in per.values()]) for k in ("above", "ahead")}
        same = None
        if run_seed in by_source:
            mine, theirs = by_source[run_seed], run["leave_one_source_out"]
            same = all(abs(mine[src][m]["srcc"] - theirs[src][m]["srcc"]) <= 1e-6 for src in theirs)
        out[m] = {"per_seed": per, "spread": spread_, "reproduced": same}
    return out


def _fingerprint(run: Path) -> str:
    return hashlib.sha256((run / "summary.json").read_bytes()).hexdigest()[:16]


def seed_spread(
    run: str | Path, seeds: Sequence[int], models: Sequence[str] | None = None, workers: int = 1, threads: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Train ``models`` of the sqa run folder ``run`` once per seed; write and return ``run/seeds/summary.json``.

    Args:
        run: a finished sqa run folder (``summary.json`` and ``config.yaml``).
        seeds: the seeds (each one fit per model).
        models: which of :data:`MODELS` (those the run trained; default: all of them it trained) and
            :data:`ERROR_MAP`.
        workers: processes that train side by side (as the sqa stage's ``fit_workers``).
        threads: torch threads per process (0: torch's default; the run's own ``threads`` reproduces it).
        force: train again even when ``run/seeds`` already holds these seeds and models (without it,
            the models it holds for these seeds are kept and only the others trained).
    """
    t0 = time.perf_counter()
    run = Path(run)
    if not is_done(run):
        raise RSSQAError(f"{run}: not a finished sqa run (no summary.json); run the sqa stage first")
    if not seeds:
        raise RSSQAError("seeds: give at least one seed")
    summary, fingerprint = read_summary(run), _fingerprint(run)
    if models is None:
        models = [m for m in MODELS if m in model_hparams(summary)]
    out = run / FOLDER
    kept: dict[str, Any] = {}  # models already done for these seeds: kept, not trained again
    kept_loso = None
    if is_done(out) and not force:
        done = read_summary(out)
        if done.get("seeds") == [int(s) for s in seeds] and done.get("run_fingerprint") == fingerprint:
            have = set(done.get("models", {})) | ({LOSO} if done.get("loso") else set())
            if have >= set(models):
                line(LABEL, f"{out}: these seeds are done already (force to train again)")
                return done
            kept, kept_loso = done["models"], done.get("loso")
            models = [m for m in models if m not in have]
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RSSQAError(f"{run / 'config.yaml'}: cannot read the run's config ({e})") from None
    hp = model_hparams(summary)
    unknown = [m for m in models if m not in hp and m not in (ERROR_MAP, LOSO)]
    if unknown:
        raise RSSQAError(f"seeds: the run trained no {unknown[0]!r} (it has {sorted(hp)})")
    pixel = PixelConfig.of(config.get("pixel"))
    if ERROR_MAP in models and not (pixel.enabled and summary.get("pixel_error")):
        raise RSSQAError("seeds: error_map needs a run with the pixel error head (pixel.enabled)")
    if LOSO in models and not summary.get("leave_one_source_out"):
        raise RSSQAError("seeds: loso needs a run that left each source out (loso: true, two sources or more)")
    loso_models = {k: hp[k] for k in ("rs_sqa", AGREEMENT_MODEL) if k in hp}  # as the stage leaves sources out
    recommender = next(k for k in RECOMMENDERS if k in hp)
    # the heads to train: those asked for, and the recommender that weighs the pixel head's inputs
    fitted = [m for m in hp if m in models or (ERROR_MAP in models and m == recommender)]
    own = {k: v for k, v in (config.get("data") or {}).items() if k in inspect.signature(SQADataModule.__init__).parameters}
    data = SQADataModule(**{**own, "cache_dir": str(run / "cache"), "seed": config.get("seed_everything", 0)})
    data.setup("fit")
    recipe = TrainerRecipe(str(out), {**(config.get("trainer") or {}), "default_root_dir": str(out)}, wandb=False)
    consensus = baseline_scores(data).get("consensus", {}).get("test")
    run_seed = int(summary.get("seed", 0))
    jobs = {int(s): [FitJob(f"seed{s}_{m}", hp[m], seed=int(s), data_seed=int(s)) for m in fitted] for s in seeds}
    folds = {s: [] for s in jobs}
    if ERROR_MAP in models:  # the recommender once per fold of the train split, per seed (as the stage fits it)
        for s in jobs:
            folds[s] = [dataclasses.replace(j, run=f"seed{s}_{j.run}", seed=s, data_seed=s)
                        for j in crossfit_jobs(data, pixel, {recommender: hp[recommender]}, s)]  # fmt: skip
    held_out = {s: [] for s in jobs}
    if LOSO in models:
        held_out = {s: [dataclasses.replace(j, run=f"seed{s}_{j.run}", seed=s, data_seed=s) for j in loso_jobs(loso_models, data, s)]
                    for s in jobs}  # fmt: skip
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in models if m != LOSO}
    by_source: dict[int, dict[str, Any]] = {}

    def record(name: str, seed: int, preds: dict[str, np.ndarray]) -> None:
        results[name][seed] = r = head_figures(data, preds, consensus, seed=run_seed)
        line(LABEL, f"seed {seed} {name}: test SRCC {r['srcc']:.3f}, regret {r['regret']:.4f}")

    with Fits(data, recipe, workers, threads) as fits:
        for s in jobs:
            for job in (*jobs[s], *folds[s], *held_out[s]):
                fits.submit(job)
        shared = ERROR_MAP in models and len(jobs) > 1  # a pixel head per seed on the same images: the methods run once
        if shared:
            fill_seam_cache(data, pixel.block, pixel.cache_gb * 1e9)
        for s in jobs:
            for job in jobs[s]:
                name = job.run.split("_", 1)[1]
                if name in models:
                    record(name, s, fits.result(job.run)[1])
            if ERROR_MAP in models:  # in this process, while the workers go on with the next seeds' fits
                oof = [(j, fits.result(j.run)[1]["test"]) for j in folds[s]]
                _, _, by_row = pixel_head_for(data, pixel, s, fits.result(f"seed{s}_{recommender}")[1], oof)
                record(ERROR_MAP, s, {"test": error_map_scores(data, by_row)})
            if LOSO in models:
                by_source[s] = leave_one_source_out(
                    loso_models, data, lambda run, s=s: fits.result(f"seed{s}_{run}")[1]["test"], baseline_scores,
                    recommendation, LABEL_FREE,
                )  # fmt: skip
                line(LABEL, f"seed {s} leave one source out: above consensus on "
                            + ", ".join(f"{m} {above_consensus(by_source[s], m)['above']}" for m in loso_models))  # fmt: skip
        if shared:
            drop_seam_caches(data)
    report = {
        "run": str(run),
        "run_fingerprint": fingerprint,  # the run these figures belong to (a rerun of it starts them again)
        "run_seed": run_seed,
        "seeds": [int(s) for s in seeds],
        "models": {
            **kept,
            **{
                m: {
                    "per_seed": {str(s): v for s, v in per.items()},
                    "spread": spread(per),
                    "reproduced": reproduced(summary, m, per[run_seed]) if run_seed in per else None,
                }
                for m, per in results.items()
            },
        },
        **({"loso": loso_summary(by_source, loso_models, summary, run_seed)} if by_source else {"loso": kept_loso} if kept_loso else {}),
        "n_test_images": len(set(data.image_idx[data.rows("test")].tolist())),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_summary(out, report)
    return report


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Train an sqa run's quality heads again under other seeds; report the spread.")
    ap.add_argument("--run", required=True, help="a finished sqa run folder, e.g. runs/demo/sqa")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--models", nargs="+", default=None, choices=(*MODELS, ERROR_MAP, LOSO),
                    help="the heads to train again (default: those of MODELS the run trained); error_map: the pixel "
                    "error head's map (minutes per seed); loso: RS-SQA and the agreement head, each source left out")
    ap.add_argument("--workers", type=int, default=2, help="processes that train side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--force", action="store_true", help="train again even when these seeds are done")
    a = ap.parse_args(args)
    from rssqa.tracking import quiet_lightning

    quiet_lightning()
    torch.set_num_threads(a.threads)
    try:
        report = seed_spread(a.run, a.seeds, a.models, a.workers, a.threads, a.force)
    except RSSQAError as e:  # one line, as every stage: the key or file and what was wrong
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for m, v in report["models"].items():
        s = v["spread"]
        print(f"{m}: SRCC {s['srcc']['median']:.3f} [{s['srcc']['min']:.3f}, {s['srcc']['max']:.3f}], "
              f"regret {s['regret']['median']:.4f} [{s['regret']['min']:.4f}, {s['regret']['max']:.4f}], "
              f"reproduced {v['reproduced']}")  # fmt: skip
    for m, v in report.get("loso", {}).items():
        a = v["spread"]["above"]
        print(f"{m}, each source left out: above consensus on {a['median']:g} [{a['min']}, {a['max']}] sources, "
              f"reproduced {v['reproduced']}")  # fmt: skip
    print(Path(report["run"]) / FOLDER / "summary.json")
    return report


if __name__ == "__main__":
    main()
