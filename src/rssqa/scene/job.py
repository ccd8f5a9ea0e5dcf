"""One scene scored by one scorer: :class:`SceneJob` (windowed reading, judging, blending, writing, resuming)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rssqa.agreement import MIN_METHODS, quality_agreement_maps
from rssqa.data.segsets.rasters import to_8bit
from rssqa.errors import RSSQAError
from rssqa.intervals import bounds
from rssqa.models.pixel_error import BASELINES as PIXEL_BASELINES
from rssqa.models.pixel_error import pixel_inputs
from rssqa.scene.common import (
    CLASS_COLOURS,
    DTYPES,
    LAYERS,
    METHOD_COLOURS,
    NODATA,
    STATE,
    WORK,
    Resampled,
    _open,
    _rasterio,
    _save_json,
    gdal_env,
    trained_tile,
)
from rssqa.scene.evaluate import _evaluate_windows, _finish_eval, _new_eval, fused_per_window
from rssqa.scene.quicklook import quicklook
from rssqa.scene.windows import owned_bounds, taper, window_offsets

HEAD_NAMES = {"ranking_model": "ranking", "agreement_model": "agreement", "model": "paper"}  # scene.json's "head"
CHECKPOINT_S = 20.0  # seconds between two saved states (a rerun continues from the last one)


# ------------------------------------------------------------------------------------------- config
@dataclass
class SceneOptions:
    """How to read a scene. ``tile``/``overlap`` default to the scorer's training tile and a quarter of it."""

    source: str | None = None
    methods: Sequence[str] | None = None
    tile: int | None = None
    overlap: int | None = None
    bands: Sequence[int] | None = None  # 1-based band indexes of red, green, blue
    rescale: tuple[float, float] | None = None  # (low, high): other pixel types mapped linearly to 0-255
    truth: str | None = None
    classes: Sequence[str] | None = None  # class names and palette of fused.tif (default: the scorer's record)
    palette: Sequence[Sequence[int]] | None = None
    progress: bool = True
    resume: bool = True
    quicklook: bool = True
    by_score: bool = False  # each window's method by predicted OA, also where the scorer's validation chose its fixed method
    scale: float = 1.0  # read the scene (and truth) resampled by this factor (common.Resampled); the maps are on that grid


def _fingerprint(path: Path, scorer_config: dict[str, Any], settings: dict[str, Any]) -> str:
    st = path.stat()
    blob = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, scorer_config, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- core
class _Strip:
    """The rolling buffers of the rows one strip of windows can still change."""

    def __init__(self, rows: int, width: int, classes: int):
        self.probs = np.zeros((classes, rows, width), np.float32)
        self.error = np.zeros((rows, width), np.float32)
        self.weight = np.zeros((rows, width), np.float32)
        self.quality = np.full((rows, width), NODATA["quality"], np.float32)
        self.best = np.full((rows, width), NODATA["best_method"], np.uint8)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"probs": self.probs, "error": self.error, "weight": self.weight, "quality": self.quality, "best": self.best}

    def shift(self, rows: int) -> None:
        """Drop the first ``rows`` rows (written) and clear as many at the end."""
        for name, a in self.arrays().items():
            axis = 1 if name == "probs" else 0
            a[...] = np.roll(a, -rows, axis=axis)
            tail = (slice(None), slice(a.shape[1] - rows, None)) if axis else (slice(a.shape[0] - rows, None),)
            a[tail] = NODATA["quality"] if name == "quality" else NODATA["best_method"] if name == "best" else 0


class SceneJob:
    """One scene scored by one scorer (see the module docstring)."""

    def __init__(self, scorer: Any, path: str | os.PathLike, out: str | os.PathLike, options: SceneOptions | None = None):
        self.pool: dict[str, Any] | None = None
        self.scorer, self.path, self.out = scorer, Path(path), Path(out)
        self.opt = options or SceneOptions()
        self.source = scorer.resolve_source(self.opt.source)
        self.methods = scorer.resolve_methods(self.opt.methods, self.source)
        self.names = [m.name for m in self.methods]
        if len(self.names) > len(METHOD_COLOURS):
            raise RSSQAError(f"--methods: at most {len(METHOD_COLOURS)} methods per scene, got {len(self.names)}")
        self.agreement = len(self.methods) >= MIN_METHODS
        self.head = scorer.recommend_head(len(self.methods))  # ranking, else agreement (>= 3 methods), else the paper's
        self.head_name = HEAD_NAMES[scorer.head_key(self.head)]
        # the interval offsets of the head's predicted OA (its val split's): each window's band, whose means over the
        # windows band the scene's mean predicted OA
        self.fitted = scorer.interval(self.head)
        self.pixel_head = getattr(scorer, "pixel_model", None)
        if self.pixel_head is not None and self.pixel_head.agreement and not self.agreement:
            self.pixel_head = None
        self.error_model = "pixel error head" if self.pixel_head is not None else "1 - max probability"
        # every window's method is the scorer's best fixed one where its validation chose so (Scorer.fixed_first)
        self.fixed = None if self.opt.by_score else scorer.fixed_first(self.names)
        self.tile = int(self.opt.tile or trained_tile(scorer.config, self.source) or scorer.min_size)
        if self.tile < scorer.min_size:
            raise RSSQAError(f"--tile: {self.tile} px is smaller than the {scorer.min_size} px the scorer takes")
        self.overlap = int(self.tile // 4 if self.opt.overlap is None else self.opt.overlap)

    # ---------------------------------------------------------------------------------- reading
    def _check(self, src) -> tuple[list[int], bool]:
        bands = list(self.opt.bands) if self.opt.bands else None
        if bands is None:
            if src.count != 3:
                raise RSSQAError(
                    f"{self.path}: {src.count} band(s); the scorer reads three (red, green, blue): choose them with --bands R,G,B"
                )
            bands = [1, 2, 3]
        if len(bands) != 3 or not all(1 <= b <= src.count for b in bands):
            raise RSSQAError(f"--bands: {bands} must be three band numbers between 1 and {src.count} in {self.path}")
        dtypes = {src.dtypes[b - 1] for b in bands}
        if dtypes != {"uint8"} and self.opt.rescale is None:
            raise RSSQAError(
                f"{self.path}: {sorted(dtypes)} pixels; the scorer reads 8-bit bands: give --rescale LOW,HIGH (mapped to 0-255)"
            )
        if self.opt.rescale is not None and not self.opt.rescale[1] > self.opt.rescale[0]:
            raise RSSQAError(f"--rescale: {list(self.opt.rescale)}: HIGH must be above LOW")
        if src.height < self.tile or src.width < self.tile:
            raise RSSQAError(f"{self.path}: {src.width}x{src.height} px is smaller than one {self.tile}x{self.tile} px window")
        georef = src.crs is not None and not src.transform.is_identity
        return bands, georef

    def _read_strip(self, src, row: int, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rasterio = _rasterio()
        win = rasterio.windows.Window(0, row, src.width, self.tile)
        try:
            pixels = src.read(bands, window=win)
            valid = src.dataset_mask(window=win) > 0
        except rasterio.errors.RasterioIOError as e:
            raise RSSQAError(f"{self.path}: unreadable at rows {row}-{row + self.tile} ({str(e).splitlines()[0][:120]})") from None
        return np.ascontiguousarray(to_8bit(pixels, self.opt.rescale).transpose(1, 2, 0)), valid

    # ---------------------------------------------------------------------------------- judging
    @torch.no_grad()
    def _judge(self, images: np.ndarray, evaluate: bool = False) -> dict[str, Any]:
        """Scores ``n×M``, and per window the chosen method's probabilities, error probabilities and,
        for evaluation, every method's class map and the per-pixel baselines of the chosen one."""
        n, chunk = len(images), self.scorer.rows_for(images.shape[1:3])
        scores, probs, error, preds, base = [], [], [], [], []
        for start in range(0, n, chunk):
            part = images[start : start + chunk]
            k = len(part)
            padded = np.concatenate([part, np.zeros((chunk - k, *part.shape[1:]), np.uint8)]) if k < chunk else part
            inp = self.scorer._inputs(padded, self.methods, self.head, self.agreement, pixels=True)
            s = self.scorer.head_scores(inp, self.methods, len(self.methods), self.head, k)
            choice = s.argmax(1) if self.fixed is None else np.full(len(s), self.fixed)
            pix = inp["pixels"]
            chosen = torch.stack([pix[c]["probs"][i].float().cpu() for i, c in enumerate(choice)])
            agree = torch.stack([pix[c]["agree"][i].float().cpu() for i, c in enumerate(choice)]) if self.agreement else None
            weighted = None
            if self.pixel_head is not None and self.pixel_head.quality_power > 0:  # the others weighted by the scores
                quality = torch.ones(len(padded), len(self.methods))
                quality[:k] = torch.from_numpy(s).float()
                which = torch.zeros(len(padded), dtype=torch.long)
                which[:k] = torch.as_tensor(choice)
                weighted = quality_agreement_maps(
                    [p["probs"] for p in pix], [p["pred"] for p in pix], quality, self.pixel_head.quality_power, which
                )[:k].cpu()  # fmt: skip
            x = pixel_inputs(chosen, agree, weighted)
            if self.pixel_head is not None:
                tokens = inp.get("sem_tokens")
                tokens = tokens[:k] if tokens is not None and self.pixel_head.token_dim > 0 else None
                err = self.pixel_head.probability(x, tokens)
            else:
                err = x[:, 0]  # the method's own uncertainty, 1 - max probability
            scores.append(s)
            probs.append(chosen.numpy())
            error.append(err.float().numpy())
            if evaluate:
                preds.append(torch.stack([p["pred"][:k].cpu() for p in pix], 1).to(torch.uint8).numpy())  # k×M×h×w
                fns = PIXEL_BASELINES.values() if self.agreement else list(PIXEL_BASELINES.values())[:2]
                base.append(torch.stack([f(x) for f in fns], 1).numpy())
        out = {"scores": np.concatenate(scores), "probs": np.concatenate(probs), "error": np.concatenate(error)}
        if evaluate:
            out.update(preds=np.concatenate(preds), baselines=np.concatenate(base))
        return out

    # ---------------------------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        """Score the scene; returns (and writes) ``scene.json``'s content."""
        rasterio = _rasterio()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # said once, below, in words; rasterio would repeat it for every file opened or written
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            summary = self._open_and_run()
        summary["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        _save_json(self.out / "scene.json", summary)
        return summary

    def _open_and_run(self) -> dict[str, Any]:
        scale = self.opt.scale
        if not scale > 0:
            raise RSSQAError(f"--scale: must be a positive factor, got {scale:g}")
        with gdal_env(), _open(self.path, "scene") as file:
            src = file if scale == 1 else Resampled(file, scale)
            bands, georef = self._check(src)
            if not georef:
                print(f"warning: {self.path}: no georeferencing (CRS/transform); the outputs carry none", file=sys.stderr)
            truth = _open(Path(self.opt.truth), "truth raster") if self.opt.truth else None
            try:
                if truth is not None and (truth.height, truth.width) != (file.height, file.width):
                    raise RSSQAError(f"{self.opt.truth}: {truth.width}x{truth.height} px, the scene is {file.width}x{file.height}")
                if truth is not None and scale != 1:  # on the scene's new grid, classes by nearest neighbour
                    truth = Resampled(truth, scale, categorical=True)
                summary = self._run(src, bands, georef, truth)
            finally:
                if truth is not None:
                    truth.close()
        return summary

    def _classes(self) -> tuple[list[str], list[list[int]] | None]:
        meta = (self.scorer.config.get("classes") or {}).get(self.source) or {}
        names = self.opt.classes or meta.get("names") or []
        return list(names), (self.opt.palette or meta.get("palette"))

    def _run(self, src, bands: list[int], georef: bool, truth) -> dict[str, Any]:
        rasterio = _rasterio()
        h, w, tile = src.height, src.width, self.tile
        rows_off, cols_off = window_offsets(h, tile, self.overlap), window_offsets(w, tile, self.overlap)
        row_own, col_own = owned_bounds(rows_off, tile, h), owned_bounds(cols_off, tile, w)
        weight = taper(tile, self.overlap)
        self.out.mkdir(parents=True, exist_ok=True)
        work = self.out / WORK
        settings = {"methods": self.names, "source": self.source, "tile": tile, "overlap": self.overlap, "bands": bands,
                    "head": self.head_name, "fixed": self.fixed, "truth": str(self.opt.truth or ""),
                    **({"scale": self.opt.scale} if self.opt.scale != 1 else {})}  # fmt: skip
        key = _fingerprint(self.path, self.scorer.config, settings)
        state = self._load_state(work, key)
        n_classes = None
        profile = src.profile.copy()
        carry = None
        if state is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = self._fresh_state(key)
            self._create_parts(work, profile)
        else:
            n_classes = state["n_classes"]
            if n_classes is not None and (work / "carry.npz").is_file():
                carry = dict(np.load(work / "carry.npz"))
        ev = _new_eval(len(self.names))
        if carry is not None and "eval_windows" in carry:  # the evaluation so far, saved with the rows
            ev["windows"] = carry.pop("eval_windows").tolist()
            ends = np.cumsum(carry.pop("eval_counts"))
            ev["pixels"] = np.split(carry.pop("eval_pixels"), ends[:-1]) if len(ends) else []
        t_start = time.perf_counter()
        strip = None
        if carry is not None:
            strip = _Strip(tile, w, n_classes)
            for k, a in strip.arrays().items():
                a[...] = carry.pop(k)
        bar = _bar(len(rows_off), state["strips_done"], self.opt.progress, str(self.path.name))
        parts = {name: rasterio.open(work / f"{name}.tif", "r+") for name in LAYERS}
        saved = time.perf_counter()
        try:
            for i in range(state["strips_done"], len(rows_off)):
                r0 = rows_off[i]
                pixels, valid = self._read_strip(src, r0, bands)
                windows = [(j, c) for j, c in enumerate(cols_off) if valid[:, c : c + tile].any()]
                state["n_skipped"] += len(cols_off) - len(windows)
                gt = truth.read(1, window=rasterio.windows.Window(0, r0, w, tile)) if truth is not None else None
                if windows:
                    judged = self._judge(np.stack([pixels[:, c : c + tile] for _, c in windows]), evaluate=gt is not None)
                    if strip is None:
                        n_classes = state["n_classes"] = int(judged["probs"].shape[1])
                        strip = _Strip(tile, w, n_classes)
                    self._accumulate(strip, judged, windows, weight, row_own[i], r0, col_own, state)
                    if gt is not None:
                        _evaluate_windows(ev, judged, windows, gt, valid, row_own[i], r0, col_own, tile, i)
                last = i == len(rows_off) - 1
                done_to = h if last else rows_off[i + 1]
                self._write_rows(parts, strip, r0, done_to - r0, valid, w)
                if strip is not None and not last:
                    strip.shift(done_to - r0)
                state["strips_done"] = i + 1
                state["seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                if last or t_start - saved >= CHECKPOINT_S:
                    parts = self._checkpoint(parts, work, strip, state, ev if truth is not None else None)
                    saved = time.perf_counter()
                if bar is not None:
                    bar.update(1)
        finally:
            for d in parts.values():
                d.close()
            if bar is not None:
                bar.close()
        t_cog = time.perf_counter()
        self._finish(work, georef)
        finish_s = time.perf_counter() - t_cog
        shutil.rmtree(work, ignore_errors=True)
        summary = self._summary(state, src, georef, rows_off, cols_off, finish_s)
        if truth is not None:
            fused = fused_per_window(self.out / "fused.tif", truth, src, row_own, col_own)
            # the per-window arrays stay on the job, for figures pooled over several scenes (rssqa.scene.index)
            summary["evaluation"], self.pool = _finish_eval(ev, self.names, self.agreement, fused)
            band, true = summary["mean_predicted_oa_interval"], summary["evaluation"].get("per_method_oa")
            if band and true:  # whether each method's true OA on the scene lies in its mean's band
                summary["evaluation"]["in_mean_interval"] = {m: band["low"][m] <= true[m] <= band["high"][m] for m in self.names}
        if self.opt.quicklook:
            try:
                summary["outputs"]["quicklook"] = quicklook(self.out, self.path, self.names, bands, self.opt.rescale)
            except Exception as e:  # noqa: BLE001 - a missing picture must not fail a finished scene
                print(f"warning: quicklook not written ({type(e).__name__}: {e})", file=sys.stderr)
        return summary

    def _fresh_state(self, key: str) -> dict[str, Any]:
        """The state of a run that has scored nothing yet (what ``state.json`` holds, saved as the run goes)."""
        m = len(self.names)
        return {"key": key, "strips_done": 0, "n_windows": 0, "n_skipped": 0, "score_sum": [0.0] * m, "low_sum": [0.0] * m,
                "high_sum": [0.0] * m, "chosen_count": [0] * m, "seconds": 0.0, "n_classes": None}  # fmt: skip

    def _load_state(self, work: Path, key: str) -> dict[str, Any] | None:
        path = work / STATE
        if not self.opt.resume or not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        # another scene or settings, a state of an older version (fewer fields: starts over), or parts missing
        if state.get("key") != key or not self._fresh_state(key).keys() <= state.keys():
            return None
        if not all((work / f"{n}.tif").is_file() for n in LAYERS):
            return None
        return state

    def _create_parts(self, work: Path, profile: dict[str, Any]) -> None:
        rasterio = _rasterio()
        base = {"driver": "GTiff", "width": profile["width"], "height": profile["height"], "count": 1,
                "crs": profile.get("crs"), "transform": profile.get("transform"), "tiled": True,
                "blockxsize": 256, "blockysize": 256}  # fmt: skip
        for name in LAYERS:
            with rasterio.open(work / f"{name}.tif", "w", dtype=DTYPES[name], nodata=NODATA[name], **base) as d:
                d.update_tags(1, layer=name)

    def _accumulate(self, strip: _Strip, judged: dict[str, Any], windows, weight, row_own, r0, col_own, state) -> None:
        tile = self.tile
        a, b = row_own[0] - r0, row_own[1] - r0
        for k, (j, c) in enumerate(windows):
            s = judged["scores"][k]
            choice = int(s.argmax()) if self.fixed is None else self.fixed
            strip.probs[:, :, c : c + tile] += judged["probs"][k] * weight
            strip.error[:, c : c + tile] += judged["error"][k] * weight
            strip.weight[:, c : c + tile] += weight
            c0, c1 = col_own[j]
            strip.quality[a:b, c0:c1] = s[choice]
            strip.best[a:b, c0:c1] = choice
            state["score_sum"] = [x + float(v) for x, v in zip(state["score_sum"], s, strict=True)]
            if self.fitted is not None:
                low, high = bounds(s, self.fitted)
                state["low_sum"] = [x + float(v) for x, v in zip(state["low_sum"], low, strict=True)]
                state["high_sum"] = [x + float(v) for x, v in zip(state["high_sum"], high, strict=True)]
            state["chosen_count"][choice] += 1
            state["n_windows"] += 1

    def _write_rows(self, parts, strip: _Strip | None, r0: int, rows: int, valid: np.ndarray, w: int) -> None:
        rasterio = _rasterio()
        win = rasterio.windows.Window(0, r0, w, rows)
        ok = valid[:rows]
        if strip is None:
            for name in LAYERS:
                parts[name].write(np.full((rows, w), NODATA[name], DTYPES[name]), 1, window=win)
            return
        wt = strip.weight[:rows]
        ok = ok & (wt > 0)
        fused = strip.probs[:, :rows].argmax(0).astype(np.uint8)
        error = np.divide(strip.error[:rows], wt, out=np.zeros_like(wt), where=wt > 0)
        out = {
            "quality": np.where(ok, strip.quality[:rows], NODATA["quality"]).astype(np.float32),
            "best_method": np.where(ok, strip.best[:rows], NODATA["best_method"]).astype(np.uint8),
            "fused": np.where(ok, fused, NODATA["fused"]).astype(np.uint8),
            "error": np.where(ok, error, NODATA["error"]).astype(np.float32),
        }
        for name, a in out.items():
            parts[name].write(a, 1, window=win)

    def _checkpoint(self, parts, work: Path, strip: _Strip | None, state: dict[str, Any], ev: dict[str, Any] | None):
        """Flush the parts (close and reopen), then save the carried rows (and the evaluation so far)
        and the state, in that order."""
        rasterio = _rasterio()
        for d in parts.values():
            d.close()
        if strip is not None:
            tmp = work / "carry.tmp.npz"
            extra = {}
            if ev is not None:
                width = 4 + len(self.names)
                extra = {
                    "eval_windows": np.asarray(ev["windows"], np.int64).reshape(-1, width),
                    "eval_counts": np.asarray([len(b) for b in ev["pixels"]], np.int64),
                    "eval_pixels": np.concatenate(ev["pixels"]) if ev["pixels"] else np.zeros((0, 5), np.float32),
                }  # fmt: skip
            np.savez(tmp, **strip.arrays(), **extra)
            os.replace(tmp, work / "carry.npz")
        _save_json(work / STATE, state)
        return {name: rasterio.open(work / f"{name}.tif", "r+") for name in LAYERS}

    def _finish(self, work: Path, georef: bool) -> None:
        """Tag the parts, copy each to a Cloud-Optimised GeoTIFF, move it to its final name."""
        rasterio = _rasterio()
        from rasterio.shutil import copy as rio_copy

        names, palette = self._classes()
        with rasterio.open(work / "best_method.tif", "r+") as d:
            d.write_colormap(1, {i: (*METHOD_COLOURS[i], 255) for i in range(len(self.names))})
            d.update_tags(methods=json.dumps(self.names), source=self.source)
        with rasterio.open(work / "fused.tif", "r+") as d:
            colours = palette or CLASS_COLOURS  # the source's palette, else a categorical one
            d.write_colormap(1, {i: (*map(int, rgb), 255) for i, rgb in enumerate(colours)})
            d.update_tags(classes=json.dumps(names), source=self.source, methods=json.dumps(self.names))
        with rasterio.open(work / "quality.tif", "r+") as d:
            d.update_tags(meaning="predicted overall accuracy of the recommended method, per window", head=self.head_name)
        with rasterio.open(work / "error.tif", "r+") as d:
            d.update_tags(meaning="predicted probability that fused.tif is wrong at the pixel", model=self.error_model)
        for name in LAYERS:
            categorical = name in ("best_method", "fused")
            tmp = self.out / f".{name}.tif.tmp"
            rio_copy(work / f"{name}.tif", tmp, driver="COG", compress="DEFLATE", blocksize=512,
                     overview_resampling="NEAREST" if categorical else "AVERAGE")  # fmt: skip
            os.replace(tmp, self.out / f"{name}.tif")

    def _summary(self, state, src, georef, rows_off, cols_off, finish_s) -> dict[str, Any]:
        n = max(state["n_windows"], 1)
        out: dict[str, Any] = {
            "scene": str(self.path), "size": [src.height, src.width], "crs": str(src.crs) if georef else None,
            "transform": list(src.transform)[:6] if georef else None, "georeferenced": georef,
            "source": self.source, "methods": self.names, "head": self.head_name,
            "recommended_by": "score" if self.fixed is None else f"fixed: {self.names[self.fixed]} (the scorer's validation)",
            "error_model": self.error_model,
            "tile": self.tile, "overlap": self.overlap, "scale": self.opt.scale,
            "windows": {"total": len(rows_off) * len(cols_off), "scored": state["n_windows"], "skipped_nodata": state["n_skipped"],
                        "rows": len(rows_off), "cols": len(cols_off)},
            "mean_predicted_oa": {m: s / n for m, s in zip(self.names, state["score_sum"], strict=True)},
            "mean_predicted_oa_interval": None if self.fitted is None else {
                "level": self.fitted["level"], "low": {m: s / n for m, s in zip(self.names, state["low_sum"], strict=True)},
                "high": {m: s / n for m, s in zip(self.names, state["high_sum"], strict=True)}},
            "chosen_share": {m: c / n for m, c in zip(self.names, state["chosen_count"], strict=True)},
            "outputs": {name: f"{name}.tif" for name in LAYERS},
            "timings": {"scoring_s": round(state["seconds"], 3), "cog_s": round(finish_s, 3),
                        "windows_per_s": state["n_windows"] / max(state["seconds"], 1e-9)},
        }  # fmt: skip
        return out


def _bar(total: int, done: int, show: bool, label: str):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="strip", desc=label, file=sys.stderr, dynamic_ncols=True)


def score_scene_file(
    scorer: Any, path: str | os.PathLike, out: str | os.PathLike, options: SceneOptions | None = None
) -> dict[str, Any]:
    """Score one scene with ``scorer`` (:class:`rssqa.scorer.Scorer`); returns ``scene.json``'s content."""
    return SceneJob(scorer, path, out, options).run()
