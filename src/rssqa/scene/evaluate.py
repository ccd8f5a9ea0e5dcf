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


def _finish_eval(ev: dict[str, Any], names: list[str], agreement: bool, fused: np.ndarray, n_boot: int = 1000) -> dict[str, Any]:
    """Scene-level figures with 95% intervals from a bootstrap over windows (the fused map against the
    best single method; the error head's AUROC against the best per-pixel baseline)."""
    from torchmetrics.functional.classification import binary_auroc

    from rssqa.metrics import verdict

    w = np.asarray(ev["windows"], np.int64).reshape(-1, 4 + len(names))
    if not len(w):
        return {"labelled_pixels": 0}
    lab, chosen, per = w[:, 2], w[:, 3], w[:, 4:]
    fused_hit, fused_lab = fused[w[:, 0], w[:, 1], 0], fused[w[:, 0], w[:, 1], 1]
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
    rows = [np.asarray(b, np.float64).reshape(-1, 2 + (3 if agreement else 2)) for b in ev["pixels"]]
    if rows:
        arr = torch.from_numpy(np.concatenate(rows))
        starts = np.cumsum([0, *(len(r) for r in rows)])
        target = arr[:, 0].long()
        names_b = list(PIXEL_BASELINES) if agreement else ["max_prob", "entropy"]
        out["error_pixels"] = len(arr)
        if 0 < int(target.sum()) < len(target):
            auroc = {"error_head": float(binary_auroc(arr[:, 1], target))}
            for i, nm in enumerate(names_b):
                auroc[nm] = float(binary_auroc(arr[:, 2 + i], target))
            best_b = max(names_b, key=lambda k: auroc[k])
            col = 2 + names_b.index(best_b)
            margins = []
            brng = np.random.default_rng(1)
            for _ in range(min(n_boot, 200)):  # a pooled AUROC per draw: 200 draws
                pick = torch.from_numpy(np.concatenate([np.arange(starts[k], starts[k + 1]) for k in brng.integers(0, len(rows), len(rows))]))
                t = target[pick]
                if 0 < int(t.sum()) < len(t):
                    margins.append(float(binary_auroc(arr[pick, 1], t) - binary_auroc(arr[pick, col], t)))
            lo, hi = (np.percentile(margins, [2.5, 97.5]) if margins else (float("nan"), float("nan")))
            out["error_auroc"] = auroc
            out["error_auroc_best_baseline"] = best_b
            out["error_auroc_margin"] = {"diff": auroc["error_head"] - auroc[best_b], "low": float(lo), "high": float(hi),
                                         "verdict": verdict(float(lo), float(hi))}  # fmt: skip
    return out
