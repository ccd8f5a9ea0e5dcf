"""A scene index (the world's ``scenes.json``) scored scene by scene, one or several processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rssqa.errors import RSSQAError
from rssqa.scene.evaluate import pooled_figures
from rssqa.scene.job import SceneJob, SceneOptions

_WORKER_SCORER: dict[str, Any] = {}


def _index_job(args: tuple[Any, dict[str, Any], str, str, int, int, bool]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One scene of an index: the scorer (or, in a worker process, its folder, loaded once) runs it.
    Returns the scene's row and its evaluation's per-window arrays (for the pooled figures)."""
    scorer, e, base, out, k, n, progress = args
    in_worker = isinstance(scorer, str)
    if in_worker:
        if scorer not in _WORKER_SCORER:
            from rssqa.scorer import Scorer

            torch.set_num_threads(1)
            _WORKER_SCORER[scorer] = Scorer.load(scorer)
        scorer = _WORKER_SCORER[scorer]
    image, source, sid = Path(base) / e["image"], e["source"], str(e["id"])
    truth = Path(base) / e["truth"] if e.get("truth") else None
    if progress:
        print(f"[scene] {k + 1}/{n} {source}/{sid}", file=sys.stderr, flush=True)
    opts = SceneOptions(source=source, truth=str(truth) if truth else None, progress=progress and not in_worker,
                        classes=e.get("classes"), palette=e.get("palette"))  # fmt: skip
    job = SceneJob(scorer, image, Path(out) / source / sid, opts)
    summary = job.run()
    row = {"source": source, "id": sid, "folder": f"{source}/{sid}", "size": summary["size"],
           "windows": summary["windows"]["scored"], "seconds": summary["timings"]["total_s"],
           "head": summary["head"], "error_model": summary["error_model"], "evaluation": summary.get("evaluation")}  # fmt: skip
    return row, job.pool


def score_scene_index(
    scorer: Any, index: str | os.PathLike, out: str | os.PathLike, progress: bool = True, workers: int = 1
) -> dict[str, Any]:
    """Score every scene of a scene index (``scenes.json``: ``{"scenes": [{"source", "id", "image",
    "truth"}, ...]}``, paths relative to the index's folder's parent, as the embedded world writes it)
    into ``out/<source>/<id>/``, measuring each against its truth.

    Args:
        scorer: a loaded :class:`rssqa.scorer.Scorer`, or its folder (needed for ``workers > 1``).
        workers: scenes scored side by side, each in its own one-thread process.

    Returns:
        ``scenes`` (one row per scene: its ``evaluation`` and timings) and ``overall``: scenes where
        the fused map is ahead of / tied with / behind the best single method (95% interval over
        windows), the mean of fused minus best single OA, of the oracle's margin, and of the error
        head's AUROC margin over the best per-pixel baseline; ``pooled``: every scene together
        (:func:`rssqa.scene.evaluate.pooled_figures`), with intervals; ``mean_interval_coverage``: of the (scene,
        method) pairs, how many have their true OA inside the band of their mean predicted OA.
    """
    index = Path(index)
    if not index.is_file():
        raise RSSQAError(f"{index}: scene index not found")
    try:
        entries = json.loads(index.read_text())["scenes"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RSSQAError(f"{index}: not a scene index ({type(e).__name__}: {e})") from None
    for k, e in enumerate(entries):
        missing = [key for key in ("source", "id", "image") if key not in e]
        if missing:
            raise RSSQAError(f"{index}: scene {k} has no {', '.join(missing)}")
    base = str(index.parent.parent)
    if workers > 1 and len(entries) > 1:
        if not isinstance(scorer, (str, os.PathLike)):
            raise RSSQAError("scenes: several workers need the scorer's folder, not a loaded scorer")
        from concurrent.futures import ProcessPoolExecutor

        from rssqa.processes import worker_context

        jobs = [(str(scorer), e, base, str(out), k, len(entries), progress) for k, e in enumerate(entries)]
        # one-thread workers: forked from this process where that is safe (they start with its imports)
        with ProcessPoolExecutor(min(workers, len(entries)), mp_context=worker_context(one_thread=True)) as pool:
            done = list(pool.map(_index_job, jobs))
    else:
        if isinstance(scorer, (str, os.PathLike)):
            from rssqa.scorer import Scorer

            scorer = Scorer.load(scorer)
        done = [_index_job((scorer, e, base, str(out), k, len(entries), progress)) for k, e in enumerate(entries)]
    rows = [row for row, _ in done]
    pools = [p for _, p in done if p is not None]
    evals = [r["evaluation"] for r in rows if r["evaluation"] and "fused_vs_best_single" in r["evaluation"]]
    overall: dict[str, Any] = {"n_scenes": len(rows)}
    if evals:
        verdicts = [e["fused_vs_best_single"]["verdict"] for e in evals]
        overall.update(
            fused_ahead=verdicts.count("ahead"), fused_tie=verdicts.count("tie"), fused_behind=verdicts.count("behind"),
            mean_fused_minus_best_single=float(np.mean([e["fused_oa"] - e["best_single_oa"] for e in evals])),
            mean_oracle_minus_best_single=float(np.mean([e["oracle_oa"] - e["best_single_oa"] for e in evals])),
        )  # fmt: skip
        margins = [e["error_auroc_margin"] for e in evals if "error_auroc_margin" in e]
        if margins:
            overall["mean_error_auroc_margin"] = float(np.mean([m["diff"] for m in margins]))
            overall["error_auroc_ahead"] = sum(m["verdict"] == "ahead" for m in margins)
        overall["pooled"] = pooled_figures(pools)
        held = [v for e in evals for v in (e.get("in_mean_interval") or {}).values()]
        if held:  # (scene, method) pairs whose true OA lies in the band of their mean predicted OA
            overall["mean_interval_coverage"] = {"inside": int(sum(held)), "of": len(held), "share": float(np.mean(held))}
    return {"scenes": rows, "overall": overall}
