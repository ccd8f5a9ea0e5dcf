"""Whole scenes: a GeoTIFF in; quality, best-method, fused and error maps out, georeferenced.

A scene is read in overlapping windows of the size the scorer was trained on, one row of windows
(a strip) at a time, so memory stays bounded whatever the scene's size. For every window, every
method of the source segments it once (:class:`rssqa.models.quality_inputs.QualityInputs` with
``pixels``): the same pass gives the quality head its inputs, the recommendation (the ranking head
where the scorer has one and three methods or more run), the chosen method's class probabilities
and its per-pixel error probability (the scorer's pixel error head).

Outputs (Cloud-Optimised GeoTIFFs with the input's CRS and transform; nodata where the input has none):

- ``quality.tif`` float32: the recommended method's predicted OA, per window (each pixel takes the
  window whose centre is nearest); nodata -1;
- ``best_method.tif`` uint8: the recommended method's index (colour table; names in the metadata
  ``methods`` tag and ``scene.json``); nodata 255;
- ``fused.tif`` uint8: classes from each window's recommended method, its probabilities blended
  with a taper where windows overlap (class names and the source's palette when known); nodata 255;
- ``error.tif`` float32: per pixel, the predicted probability that ``fused.tif`` is wrong there
  (blended like the classes); nodata -1;
- ``scene.json`` (written last) and ``quicklook.png``.

Resumable: work in progress sits under ``<out>/.scene-work/``; after every strip the rows that no
later window touches are written there and the state is saved, so a rerun continues after the last
finished strip. Final names appear only when complete (``os.replace``).

With ``truth`` (a ground-truth raster on the same grid), the run also measures what the maps are
worth: OA of the fused map, of each single method and of the oracle (best method per window) on the
same pixels, and the error map's pixel AUROC against per-pixel label-free baselines.
"""

from __future__ import annotations

import hashlib
import json
import math
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

from rssqa.agreement import MIN_METHODS
from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import BASELINES as PIXEL_BASELINES
from rssqa.models.pixel_error import pixel_inputs

LAYERS = ("quality", "best_method", "fused", "error")
NODATA = {"quality": -1.0, "best_method": 255, "fused": 255, "error": -1.0}
DTYPES = {"quality": "float32", "best_method": "uint8", "fused": "uint8", "error": "float32"}
WORK = ".scene-work"
STATE = "state.json"
EVAL_PIXELS = 64  # pixels per window sampled for the error map's AUROC (with a truth raster)
CHECKPOINT_S = 20.0  # seconds between two saved states (a rerun continues from the last one)
GDAL_CACHE_MB = 128  # bounds GDAL's block cache (its default is a share of the machine's memory)
METHOD_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


CLASS_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip  (classes without a palette)


# ------------------------------------------------------------------------------------------ windows
def window_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` px covering ``length`` px with at least ``overlap`` px shared.

    The last window is aligned to the end, so every pixel is covered and no window leaves the scene.
    """
    if tile > length:
        raise RSSQAError(f"scene: {length} px is smaller than one {tile} px window")
    if not 0 <= overlap < tile:
        raise RSSQAError(f"--overlap: {overlap} px must be at least 0 and smaller than the {tile} px window")
    stride = tile - overlap
    n = max(1, math.ceil((length - tile) / stride) + 1)
    offsets = [min(i * stride, length - tile) for i in range(n)]
    return sorted(set(offsets))


def owned_bounds(offsets: Sequence[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Per window, the pixel range it owns along one axis: pixels nearest to its centre."""
    centres = [o + tile / 2 for o in offsets]
    cuts = [0, *(math.ceil((a + b) / 2 - 0.5) for a, b in zip(centres, centres[1:], strict=False)), length]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def taper(tile: int, overlap: int) -> np.ndarray:
    """``tile×tile`` blending weights: 1 inside, falling linearly over the ``overlap`` px at the edges."""
    x = np.arange(tile, dtype=np.float32)
    w = np.minimum(1.0, (np.minimum(x, tile - 1 - x) + 1.0) / (overlap + 1.0))
    return np.outer(w, w)


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


def _rasterio():
    try:
        import rasterio
    except ImportError:  # pragma: no cover - a dependency of the package
        raise RSSQAError("scene: rasterio is not installed (pip install rasterio)") from None
    return rasterio


def _open(path: Path, what: str):
    rasterio = _rasterio()
    if not path.is_file():
        raise RSSQAError(f"{path}: {what} not found")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise RSSQAError(f"{path}: not a readable raster ({str(e).splitlines()[0][:160]})") from None


def _fingerprint(path: Path, scorer_config: dict[str, Any], settings: dict[str, Any]) -> str:
    st = path.stat()
    blob = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, scorer_config, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


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
        self.scorer, self.path, self.out = scorer, Path(path), Path(out)
        self.opt = options or SceneOptions()
        self.source = scorer.resolve_source(self.opt.source)
        self.methods = scorer.resolve_methods(self.opt.methods, self.source)
        self.names = [m.name for m in self.methods]
        if len(self.names) > len(METHOD_COLOURS):
            raise RSSQAError(f"--methods: at most {len(METHOD_COLOURS)} methods per scene, got {len(self.names)}")
        self.agreement = len(self.methods) >= MIN_METHODS
        self.head = (
            scorer.ranking_model if self.agreement and scorer.ranking_model is not None
            else scorer.agreement_model if self.agreement and scorer.agreement_model is not None
            else scorer.model
        )  # fmt: skip
        self.head_name = "ranking" if self.head is scorer.ranking_model else "agreement" if self.head is scorer.agreement_model else "paper"
        self.pixel_head = getattr(scorer, "pixel_model", None)
        if self.pixel_head is not None and self.pixel_head.agreement and not self.agreement:
            self.pixel_head = None
        size = (scorer.config.get("image_sizes") or {}).get(self.source) or scorer.config.get("image_size") or [scorer.min_size] * 2
        self.tile = int(self.opt.tile or min(size))
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
        if self.opt.rescale is not None:
            lo, hi = self.opt.rescale
            pixels = np.clip((pixels.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(1, 2, 0)), valid

    # ---------------------------------------------------------------------------------- judging
    @torch.no_grad()
    def _judge(self, images: np.ndarray, evaluate: bool = False) -> dict[str, Any]:
        """Scores ``n×M``, and per window the chosen method's probabilities, error probabilities and,
        for evaluation, every method's class map and the per-pixel baselines of the chosen one."""
        n, chunk = len(images), self.scorer.chunk
        scores, probs, error, preds, base = [], [], [], [], []
        for start in range(0, n, chunk):
            part = images[start : start + chunk]
            k = len(part)
            padded = np.concatenate([part, np.zeros((chunk - k, *part.shape[1:]), np.uint8)]) if k < chunk else part
            inp = self.scorer._inputs(padded, self.methods, self.head, self.agreement, pixels=True)
            s = self.scorer.head_scores(inp, self.methods, len(self.methods), self.head, k)
            choice = s.argmax(1)
            pix = inp["pixels"]
            chosen = torch.stack([pix[c]["probs"][i].float().cpu() for i, c in enumerate(choice)])
            agree = torch.stack([pix[c]["agree"][i].float().cpu() for i, c in enumerate(choice)]) if self.agreement else None
            x = pixel_inputs(chosen, agree)
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
        rasterio = _rasterio()
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), _open(self.path, "scene") as src:
            bands, georef = self._check(src)
            if not georef:
                print(f"warning: {self.path}: no georeferencing (CRS/transform); the outputs carry none", file=sys.stderr)
            truth = _open(Path(self.opt.truth), "truth raster") if self.opt.truth else None
            try:
                if truth is not None and (truth.height, truth.width) != (src.height, src.width):
                    raise RSSQAError(f"{self.opt.truth}: {truth.width}x{truth.height} px, the scene is {src.width}x{src.height}")
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
                    "head": self.head_name, "truth": str(self.opt.truth or "")}  # fmt: skip
        key = _fingerprint(self.path, self.scorer.config, settings)
        state = self._load_state(work, key)
        n_classes = None
        profile = src.profile.copy()
        carry = None
        if state is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = {"key": key, "strips_done": 0, "n_windows": 0, "n_skipped": 0, "score_sum": [0.0] * len(self.names),
                     "chosen_count": [0] * len(self.names), "eval": None, "seconds": 0.0, "n_classes": None}  # fmt: skip
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
                elif strip is None:
                    pass  # nothing valid yet: the rows are written as nodata below
                last = i == len(rows_off) - 1
                done_to = h if last else rows_off[i + 1]
                self._write_rows(parts, strip, r0, done_to - r0, valid, w)
                if strip is not None and not last:
                    strip.shift(done_to - r0)
                state["strips_done"] = i + 1
                state["eval"] = truth is not None
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
        return self._summary(state, ev if truth is not None else None, src, georef, rows_off, cols_off, finish_s)

    def _load_state(self, work: Path, key: str) -> dict[str, Any] | None:
        path = work / STATE
        if not self.opt.resume or not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if state.get("key") != key or not all((work / f"{n}.tif").is_file() for n in LAYERS):
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
            choice = int(s.argmax())
            strip.probs[:, :, c : c + tile] += judged["probs"][k] * weight
            strip.error[:, c : c + tile] += judged["error"][k] * weight
            strip.weight[:, c : c + tile] += weight
            c0, c1 = col_own[j]
            strip.quality[a:b, c0:c1] = s[choice]
            strip.best[a:b, c0:c1] = choice
            state["score_sum"] = [x + float(v) for x, v in zip(state["score_sum"], s, strict=True)]
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
            d.update_tags(meaning="predicted probability that fused.tif is wrong at the pixel",
                          model="pixel error head" if self.pixel_head is not None else "1 - max probability")  # fmt: skip
        for name in LAYERS:
            categorical = name in ("best_method", "fused")
            tmp = self.out / f".{name}.tif.tmp"
            rio_copy(work / f"{name}.tif", tmp, driver="COG", compress="DEFLATE", blocksize=512,
                     overview_resampling="NEAREST" if categorical else "AVERAGE")  # fmt: skip
            os.replace(tmp, self.out / f"{name}.tif")

    def _summary(self, state, ev, src, georef, rows_off, cols_off, finish_s) -> dict[str, Any]:
        n = max(state["n_windows"], 1)
        out: dict[str, Any] = {
            "scene": str(self.path), "size": [src.height, src.width], "crs": str(src.crs) if georef else None,
            "transform": list(src.transform)[:6] if georef else None, "georeferenced": georef,
            "source": self.source, "methods": self.names, "head": self.head_name,
            "error_model": "pixel error head" if self.pixel_head is not None else "1 - max probability",
            "tile": self.tile, "overlap": self.overlap,
            "windows": {"total": len(rows_off) * len(cols_off), "scored": state["n_windows"], "skipped_nodata": state["n_skipped"],
                        "rows": len(rows_off), "cols": len(cols_off)},
            "mean_predicted_oa": {m: s / n for m, s in zip(self.names, state["score_sum"], strict=True)},
            "chosen_share": {m: c / n for m, c in zip(self.names, state["chosen_count"], strict=True)},
            "outputs": {name: f"{name}.tif" for name in LAYERS},
            "timings": {"scoring_s": round(state["seconds"], 3), "cog_s": round(finish_s, 3),
                        "windows_per_s": state["n_windows"] / max(state["seconds"], 1e-9)},
        }  # fmt: skip
        if ev is not None:
            with _open(Path(self.opt.truth), "truth raster") as truth:
                fused = fused_per_window(self.out / "fused.tif", truth, src, rows_off, cols_off,
                                         owned_bounds(rows_off, self.tile, src.height), owned_bounds(cols_off, self.tile, src.width))  # fmt: skip
            out["evaluation"] = _finish_eval(ev, self.names, self.agreement, fused)
        if self.opt.quicklook:
            try:
                out["outputs"]["quicklook"] = quicklook(self.out, self.path, self.names)
            except Exception as e:  # noqa: BLE001 - a missing picture must not fail a finished scene
                print(f"warning: quicklook not written ({type(e).__name__}: {e})", file=sys.stderr)
        return out


# ----------------------------------------------------------------------------------- evaluation
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


def fused_per_window(fused_path: Path, truth, valid_mask_src, rows_off, cols_off, row_own, col_own) -> np.ndarray:
    """Correct and labelled pixels of ``fused.tif`` in each window's owned pixels: ``R×C×2``."""
    rasterio = _rasterio()
    out = np.zeros((len(rows_off), len(cols_off), 2), np.int64)
    with rasterio.open(fused_path) as f:
        for i, (lo, hi) in enumerate(row_own):
            win = rasterio.windows.Window(0, lo, f.width, hi - lo)
            fused, g = f.read(1, window=win), truth.read(1, window=win)
            lab = (g != 255) & (valid_mask_src.dataset_mask(window=win) > 0)
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


# --------------------------------------------------------------------------------------- pictures
def _bar(total: int, done: int, show: bool, label: str):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="strip", desc=label, file=sys.stderr, dynamic_ncols=True)


def quicklook(folder: Path, scene: Path, methods: Sequence[str], side: int = 512) -> str:
    """``quicklook.png``: the scene and the four layers side by side, read from their overviews."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rasterio = _rasterio()
    from rasterio.enums import Resampling

    def small(path: Path, bands: Any = 1, nearest: bool = True) -> np.ndarray:
        with rasterio.open(path) as d:
            f = max(d.width, d.height) / side
            shape = (max(1, round(d.height / f)), max(1, round(d.width / f)))
            return d.read(bands, out_shape=shape if isinstance(bands, int) else (len(bands), *shape),
                          resampling=Resampling.nearest if nearest else Resampling.average)  # fmt: skip

    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    try:
        with rasterio.open(scene) as d:
            rgb = small(scene, [1, 2, 3] if d.count >= 3 else [1] * 3).transpose(1, 2, 0)
        axes[0].imshow(rgb)
    except Exception:  # noqa: BLE001 - the scene panel is a courtesy
        pass
    axes[0].set_title("scene")
    q = np.ma.masked_less(small(folder / "quality.tif", nearest=False), 0)
    im = axes[1].imshow(q, cmap="RdYlGn", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title("predicted OA (recommended method)")
    b = np.ma.masked_equal(small(folder / "best_method.tif"), 255)
    cmap = ListedColormap([np.array(c) / 255 for c in METHOD_COLOURS[: len(methods)]])
    axes[2].imshow(b, cmap=cmap, vmin=-0.5, vmax=len(methods) - 0.5, interpolation="nearest")
    axes[2].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=np.array(METHOD_COLOURS[i]) / 255) for i in range(len(methods))],
                   labels=list(methods), fontsize=6, loc="lower left")  # fmt: skip
    axes[2].set_title("recommended method")
    with rasterio.open(folder / "fused.tif") as d:
        try:
            cm = d.colormap(1)
            colours = ListedColormap([np.array(cm[i][:3]) / 255 for i in range(max(cm) + 1)]) if cm else "tab10"
            vmax = max(cm) if cm else 9
        except ValueError:
            colours, vmax = "tab10", 9
    axes[3].imshow(np.ma.masked_equal(small(folder / "fused.tif"), 255), cmap=colours, vmin=0, vmax=vmax, interpolation="nearest")
    axes[3].set_title("fused segmentation")
    e = np.ma.masked_less(small(folder / "error.tif", nearest=False), 0)
    im = axes[4].imshow(e, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[4], fraction=0.046)
    axes[4].set_title("predicted error probability")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = folder / ".quicklook.png.tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, folder / "quicklook.png")
    return "quicklook.png"


def score_scene_file(
    scorer: Any, path: str | os.PathLike, out: str | os.PathLike, options: SceneOptions | None = None
) -> dict[str, Any]:
    """Score one scene with ``scorer`` (:class:`rssqa.scorer.Scorer`); returns ``scene.json``'s content."""
    return SceneJob(scorer, path, out, options).run()


_WORKER_SCORER: dict[str, Any] = {}


def _index_job(args: tuple[Any, dict[str, Any], str, str, int, int, bool]) -> dict[str, Any]:
    """One scene of an index: the scorer (or, in a worker process, its folder, loaded once) runs it."""
    scorer, e, base, out, k, n, progress = args
    if isinstance(scorer, str):
        if scorer not in _WORKER_SCORER:
            from rssqa.scorer import Scorer

            torch.set_num_threads(1)
            _WORKER_SCORER[scorer] = Scorer.load(scorer)
        scorer = _WORKER_SCORER[scorer]
    image, source, sid = Path(base) / e["image"], e["source"], str(e["id"])
    truth = Path(base) / e["truth"] if e.get("truth") else None
    if progress:
        print(f"[scene] {k + 1}/{n} {source}/{sid}", file=sys.stderr, flush=True)
    opts = SceneOptions(source=source, truth=str(truth) if truth else None, progress=progress and not isinstance(args[0], str),
                        classes=e.get("classes"), palette=e.get("palette"))  # fmt: skip
    summary = SceneJob(scorer, image, Path(out) / source / sid, opts).run()
    return {"source": source, "id": sid, "folder": f"{source}/{sid}", "size": summary["size"],
            "windows": summary["windows"]["scored"], "seconds": summary["timings"]["total_s"],
            "head": summary["head"], "error_model": summary["error_model"], "evaluation": summary.get("evaluation")}  # fmt: skip


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
        head's AUROC margin over the best per-pixel baseline.
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
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(str(scorer), e, base, str(out), k, len(entries), progress) for k, e in enumerate(entries)]
        with ProcessPoolExecutor(min(workers, len(entries)), mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(_index_job, jobs))
    else:
        if isinstance(scorer, (str, os.PathLike)):
            from rssqa.scorer import Scorer

            scorer = Scorer.load(scorer)
        rows = [_index_job((scorer, e, base, str(out), k, len(entries), progress)) for k, e in enumerate(entries)]
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
    return {"scenes": rows, "overall": overall}
