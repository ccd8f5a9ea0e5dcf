"""A scene's maps measured against a truth raster: OA of the fused map, each method and the oracle per
window; the error map's pixel AUROC against per-pixel baselines; intervals from a bootstrap over windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rssqa.models.pixel_error import BASELINES as PIXEL_BASELINES
from rssqa.scene.common import EVAL_PIXELS, _rasterio


def _new_eval(m: int) -> dict[str, Any]:
    # windows: per scored window [row, col, labelled, chosen correct, correct of each method] (owned pixels)
    return {"windows": [], "pixels": []}


def _evaluate_windows(ev, judged, windows, gt, valid, row_own, r0, col_own, tile, row_index: int) -> None:
    """Per window, on the pixels it owns: each method's correct pixels, the chosen one's and the
    best one's; and a sample of pixels (error probability, baselines, whether the chosen one is wrong)."""
    a, b = row_own[0] - r0, row_own[1] - r0
    for k, (j, c) in enumerate(windows):
        c0, c1 = col_own[j]
        g = gt[a:b, c0:c1]
        lab = (g != 255) & valid[a:b, c0:c1]
        if not lab.any():
            continue
        preds = judged["preds"][k][:, a:b, c0 - c : c1 - c]  # M×h×w
        correct = [int((p[lab] == g[lab]).sum()) for p in preds]
        choice = int(judged["scores"][k].argmax())
        ev["windows"].append([int(row_index), int(j), int(lab.sum()), correct[choice], *correct])
        # the error map's sample: the chosen method's pixels (the fused map's source in the window)
        gw = np.full((tile, tile), 255, np.uint8)
        gw[a:b, c0 - c : c1 - c] = np.where(lab, g, 255)
        idx = np.flatnonzero(gw != 255)
        # seeded by the window, so that a resumed run samples what an uninterrupted one does
        take = np.random.default_rng([row_index, j]).choice(idx, size=min(EVAL_PIXELS, idx.size), replace=False)
        wrong = (judged["preds"][k][choice].ravel()[take] != gw.ravel()[take]).astype(np.float32)
        err = judged["error"][k].ravel()[take]
        base = judged["baselines"][k].reshape(judged["baselines"].shape[1], -1)[:, take]
        ev["pixels"].append(np.concatenate([[wrong], [err], base]).T.astype(np.float32))


def fused_per_window(fused_path: Path, truth, src, row_own, col_own) -> np.ndarray:
    """Correct and labelled pixels (truth not 255, ``src`` holding data) of ``fused.tif`` in each
    window's owned pixels: ``R×C×2``."""
    rasterio = _rasterio()
    out = np.zeros((len(row_own), len(col_own), 2), np.int64)
    with rasterio.open(fused_path) as f:
        for i, (lo, hi) in enumerate(row_own):
            win = rasterio.windows.Window(0, lo, f.width, hi - lo)
            fused, g = f.read(1, window=win), truth.read(1, window=win)
            lab = (g != 255) & (src.dataset_mask(window=win) > 0)
            hit = (fused == g) & lab
            for j, (c0, c1) in enumerate(col_own):
                out[i, j] = hit[:, c0:c1].sum(), lab[:, c0:c1].sum()
    return out


def _finish_eval(
    ev: dict[str, Any], names: list[str], agreement: bool, fused: np.ndarray, n_boot: int = 1000
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Scene-level figures with 95% intervals from a bootstrap over windows (the fused map against the
    best single method; the error head's AUROC against the best per-pixel baseline), and the per-window
    arrays :func:`pooled_figures` reads (``None`` without labelled windows)."""
    w = np.asarray(ev["windows"], np.int64).reshape(-1, 4 + len(names))
    if not len(w):
        return {"labelled_pixels": 0}, None
    lab, per = w[:, 2], w[:, 4:]
    fused_hit, fused_lab = fused[w[:, 0], w[:, 1], 0], fused[w[:, 0], w[:, 1], 1]
    out = _scene_figures(w, names, fused_hit, fused_lab, n_boot)
    rows = [np.asarray(b, np.float64).reshape(-1, 2 + (3 if agreement else 2)) for b in ev["pixels"]]
    if rows:
        out.update(_error_figures([rows], agreement, n_boot))
    best = names.index(out["best_single_method"])
    pool = {"fused": np.stack([fused_hit, fused_lab], 1), "best": np.stack([per[:, best], lab], 1),
            "oracle": np.stack([per.max(1), lab], 1), "pixels": rows, "agreement": agreement}  # fmt: skip
    return out, pool


def _scene_figures(w: np.ndarray, names: list[str], fused_hit: np.ndarray, fused_lab: np.ndarray, n_boot: int) -> dict[str, Any]:
    from rssqa.metrics import verdict

    lab, chosen, per = w[:, 2], w[:, 3], w[:, 4:]
    total = max(int(lab.sum()), 1)
    per_method = {m: float(per[:, i].sum() / total) for i, m in enumerate(names)}
    best = max(per_method, key=per_method.get)
    bi = names.index(best)
    out: dict[str, Any] = {
        "fused_oa": float(fused_hit.sum() / max(fused_lab.sum(), 1)), "chosen_oa": float(chosen.sum() / total),
        "oracle_oa": float(per.max(1).sum() / total), "per_method_oa": per_method, "best_single_method": best,
        "best_single_oa": per_method[best], "labelled_pixels": int(lab.sum()), "n_windows": len(w),
    }  # fmt: skip
    gap = out["oracle_oa"] - out["best_single_oa"]
    out["gap_closed"] = (out["fused_oa"] - out["best_single_oa"]) / gap if gap > 0 else None
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(w), (n_boot, len(w)))
    diff = fused_hit[draws].sum(1) / np.maximum(fused_lab[draws].sum(1), 1) - per[draws, bi].sum(1) / np.maximum(lab[draws].sum(1), 1)
    low, high = np.percentile(diff, [2.5, 97.5])
    out["fused_vs_best_single"] = {"diff": out["fused_oa"] - out["best_single_oa"], "low": float(low), "high": float(high),
                                   "verdict": verdict(float(low), float(high))}  # fmt: skip
    return out


def _error_figures(scenes: list[list[np.ndarray]], agreement: bool, n_boot: int) -> dict[str, Any]:
    """The error map's pixel AUROC and the best per-pixel baseline's on the sampled pixels of every
    window of ``scenes`` (per scene, per window ``N×(2 + baselines)``: wrong, error probability,
    baselines), pooled; the margin's 95% interval from a bootstrap over windows within each scene."""
    from torchmetrics.functional.classification import binary_auroc

    from rssqa.metrics import verdict
    from rssqa.pixel_auroc import auroc_bootstrap_counts

    rows = [r for sc in scenes for r in sc]
    arr = torch.from_numpy(np.concatenate(rows))
    starts = np.cumsum([0, *(len(r) for r in rows)])
    first = np.cumsum([0, *(len(sc) for sc in scenes)])
    target = arr[:, 0].long()
    names_b = list(PIXEL_BASELINES) if agreement else ["max_prob", "entropy"]
    out: dict[str, Any] = {"error_pixels": len(arr)}
    if not 0 < int(target.sum()) < len(target):
        return out
    auroc = {"error_head": float(binary_auroc(arr[:, 1], target))}
    for i, nm in enumerate(names_b):
        auroc[nm] = float(binary_auroc(arr[:, 2 + i], target))
    best_b = max(names_b, key=lambda k: auroc[k])
    col = 2 + names_b.index(best_b)
    # 200 draws of windows within each scene, each draw's AUROC without a sort of its pixels (rssqa.pixel_auroc)
    brng = np.random.default_rng(1)
    counts = np.zeros((min(n_boot, 200), len(rows)), np.int64)
    for k in range(len(counts)):
        windows = np.concatenate([brng.integers(a, b, b - a) for a, b in zip(first[:-1], first[1:], strict=True)])
        counts[k] = np.bincount(windows, minlength=len(rows))
    sizes = np.diff(starts)
    window = np.repeat(np.arange(len(rows)), sizes)  # windows without sampled pixels drop out of both
    boot = auroc_bootstrap_counts(arr[:, 1].numpy(), arr[:, col].numpy(), target.numpy(), window, counts[:, sizes > 0])
    lo, hi = boot["low"], boot["high"]
    out["error_auroc"] = auroc
    out["error_auroc_best_baseline"] = best_b
    out["error_auroc_margin"] = {"diff": auroc["error_head"] - auroc[best_b], "low": float(lo), "high": float(hi),
                                 "verdict": verdict(float(lo), float(hi))}  # fmt: skip
    return out


def pooled_figures(pools: list[dict[str, Any]], n_boot: int = 1000) -> dict[str, Any]:
    """Several scenes together: the mean over scenes of the fused map's OA minus each scene's own best
    single method's (and the oracle's), with a 95% interval from a bootstrap over windows within each
    scene; the error map's AUROC against the best per-pixel baseline on the pixels of all scenes."""
    from rssqa.metrics import verdict

    if not pools:
        return {}
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(p["fused"]), (n_boot, len(p["fused"]))) for p in pools]

    def oa(a: np.ndarray, d: np.ndarray | None = None) -> np.ndarray | float:
        if d is None:
            return a[:, 0].sum() / max(a[:, 1].sum(), 1)
        return a[d, 0].sum(1) / np.maximum(a[d, 1].sum(1), 1)

    diff = np.mean([oa(p["fused"], d) - oa(p["best"], d) for p, d in zip(pools, draws, strict=True)], 0)
    low, high = np.percentile(diff, [2.5, 97.5])
    out: dict[str, Any] = {
        "n_scenes": len(pools),
        "fused_minus_best_single": {"diff": float(np.mean([oa(p["fused"]) - oa(p["best"]) for p in pools])),
                                    "low": float(low), "high": float(high), "verdict": verdict(float(low), float(high))},
        "oracle_minus_best_single": float(np.mean([oa(p["oracle"]) - oa(p["best"]) for p in pools])),
    }  # fmt: skip
    if all(p["pixels"] for p in pools):
        out.update(_error_figures([p["pixels"] for p in pools], pools[0]["agreement"], n_boot))
    return out
