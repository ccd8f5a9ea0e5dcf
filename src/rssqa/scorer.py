"""The deployable RS-SQA scorer: predicted OA of any segmentation method's result on an image, no labels.

A scorer folder (what the sqa stage exports under ``runs/<profile>/sqa/scorer/``) holds
``scorer.json`` (the head's configuration, the CLIP-RS it was trained with and its fingerprint, the
segmentation methods and their checkpoints, relative to the folder) and ``scorer.safetensors`` (the
quality head's weights, input standardisation included).

Scoring runs CLIP-RS once per image and then every requested method on it. Deterministic: no random
crops or augmentation, and every forward pass has the same batch size (``chunk``, the last chunk
zero-padded), so an image's score is bit-identical alone or in any batch.

Example:
    >>> scorer = Scorer.load("runs/demo/sqa/scorer")                        # doctest: +SKIP
    >>> scores = scorer.score([image_hw3_uint8], ["unet", "fpn"], "vaihingen")  # doctest: +SKIP
    >>> scorer.recommend([image_hw3_uint8], source="vaihingen")[0][0]        # doctest: +SKIP
    ('unet', 0.83)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rssqa.errors import RSSQAError
from rssqa.models.sqa import RSSQA, clip_image_features, segmentation_inputs
from rssqa.recommend import rank_methods

if TYPE_CHECKING:
    from rssqa.models.segmenters import Segmenter
    from rssqa.tasks.sqa import SQADataModule, SQATask

CONFIG = "scorer.json"
WEIGHTS = "scorer.safetensors"
FORMAT = 1


def _rel(path: str | os.PathLike, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start.resolve())


def export_scorer(task: SQATask, data: SQADataModule, out_dir: str | os.PathLike, best_fixed: str | None = None) -> Path:
    """Write the trained head and everything needed to run it as a scorer folder, atomically.

    Args:
        task: the trained (best validation) RS-SQA task.
        data: its data module (CLIP path and fingerprint, layers, RS-SQED folder, methods).
        out_dir: the scorer folder; replaced if it exists.
        best_fixed: the method best on the train split (recorded for reports).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sem = data.sem["clip_rs"]
    checkpoints: dict[str, dict[str, str]] = {}
    for source in sorted(set(data.source_of.tolist())):
        checkpoints[source] = {}
        for method in data.methods:
            path = data.sqed.folder / "methods" / source / method / "final.ckpt"
            if path.is_file():
                checkpoints[source][method] = _rel(path, out_dir)
    config = {
        "format": FORMAT,
        "model": task.model_kwargs(),
        "layers": list(data.hparams.layers),
        "max_classes": data.hparams.max_classes,
        "grid": data.grid,
        "hist_bins": data.hist_bins,
        "clip": {
            "path": _rel(sem["path"], out_dir),
            "fingerprint": sem["fingerprint"],
            "embed_dim": int(sem["embed"].shape[1]),
            "token_dim": int(sem["tokens"].shape[1]),
        },
        "chunk": data.hparams.clip_chunk,
        "methods": list(data.methods),
        "checkpoints": checkpoints,
        "best_fixed_method": best_fixed,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in task.model.state_dict().items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


@dataclass
class _Method:
    name: str
    segmenter: Segmenter
    adapter: int  # per-method adapter index, -1 for the shared adapter only
    feat_dim: int


class Scorer:
    """RS-SQA as a deployable scorer (see the module docstring).

    Args:
        model: the quality head, in eval mode.
        clip: the frozen CLIP-RS (open_clip) model.
        config: the scorer's ``scorer.json`` content.
        folder: the scorer folder (relative paths in ``config`` resolve against it).
        chunk: forward batch size; part of the numerics.
    """

    def __init__(self, model: RSSQA, clip: torch.nn.Module, config: dict[str, Any], folder: Path, chunk: int | None = None):
        self.model, self.clip, self.config, self.folder = model.eval(), clip.eval(), config, folder
        self.chunk = int(chunk or config.get("chunk", 8))
        if self.chunk < 1:
            raise RSSQAError(f"chunk: must be positive, got {self.chunk}")
        from rssqa.models.clip import image_size

        self.min_size = image_size(clip)
        self._methods: dict[tuple[str, str], _Method] = {}

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | os.PathLike, clip: str | os.PathLike | None = None, chunk: int | None = None) -> Scorer:
        """Load a scorer folder, with the CLIP it records or ``clip`` (which must be that same model).

        Raises:
            RSSQAError: missing or invalid files, or a CLIP that is not the one the scorer was trained with.
        """
        from rssqa.models.clip import load_clip
        from rssqa.tasks.sqa import clip_fingerprint

        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise RSSQAError(f"{path}: scorer config not found (a scorer folder is written by the sqa stage)")
        try:
            config = json.loads(path.read_text())
            model_kwargs, clip_cfg = config["model"], config["clip"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RSSQAError(f"{path}: not a scorer config ({type(e).__name__}: {e})") from None
        if config.get("format") != FORMAT:
            raise RSSQAError(f"{path}: scorer format {config.get('format')!r}, this version reads {FORMAT}")
        model = RSSQA(**model_kwargs)
        weights = folder / WEIGHTS
        try:
            state = load_file(str(weights))
            model.load_state_dict(state, strict=True)
        except FileNotFoundError:
            raise RSSQAError(f"{weights}: scorer weights not found") from None
        except (RuntimeError, OSError) as e:
            raise RSSQAError(f"{weights}: does not fit {path} ({str(e).splitlines()[0][:160]})") from None
        clip_path = Path(clip) if clip is not None else folder / clip_cfg["path"]
        clip_model, *_ = load_clip(clip_path)
        found = clip_fingerprint(clip_model)
        if found != clip_cfg["fingerprint"]:
            raise RSSQAError(
                f"{clip_path}: not the CLIP this scorer was trained with (fingerprint {found}, "
                f"{path} expects {clip_cfg['fingerprint']})"
            )
        return cls(model, clip_model, config, folder, chunk)

    @classmethod
    def from_parts(
        cls,
        model: RSSQA,
        clip: torch.nn.Module,
        segmenters: dict[str, Segmenter],
        layers: Sequence[str] = ("encoder", "decoder"),
        max_classes: int = 8,
        chunk: int = 16,
        source: str = "custom",
    ) -> Scorer:
        """A scorer from models in memory (no folder): ``segmenters`` become the methods of ``source``."""
        seg = next(iter(segmenters.values()))
        config = {
            "format": FORMAT, "layers": list(layers), "max_classes": max_classes, "grid": seg.grid,
            "hist_bins": seg.hist_bins, "chunk": chunk, "checkpoints": {source: dict.fromkeys(segmenters, "")},
        }  # fmt: skip
        scorer = cls(model, clip, config, Path("."), chunk)
        for name, s in segmenters.items():
            idx = int(model.method_index([name])[0])
            scorer._methods[(source, name)] = _Method(name, s.eval(), idx, model.method_weight.shape[1] if idx >= 0 else 0)
        return scorer

    @property
    def sources(self) -> list[str]:
        """Sources with registered method checkpoints."""
        return sorted(self.config.get("checkpoints", {}))

    def methods(self, source: str | None = None) -> list[str]:
        """Registered methods of ``source`` (checkpoints recorded in the scorer)."""
        return sorted(self.config["checkpoints"][self.resolve_source(source)])

    def resolve_source(self, source: str | None) -> str:
        """``source``, or the only one when there is one; a one-line error otherwise."""
        sources = self.sources
        if source is None:
            if len(sources) == 1:
                return sources[0]
            raise RSSQAError(f"--source: this scorer knows several sources; choose one of {', '.join(sources)}")
        if source not in sources:
            raise RSSQAError(f"--source: {source!r} unknown; choose one of {', '.join(sources)}")
        return source

    def method(self, name: str, source: str | None = None) -> _Method:
        """A registered method of ``source`` (its segmenter loaded once)."""
        source = self.resolve_source(source)
        key = (source, name)
        if key not in self._methods:
            known = self.config["checkpoints"][source]
            if name not in known:
                raise RSSQAError(f"--method: {name!r} has no checkpoint for {source}; choose from {', '.join(sorted(known))}")
            seg = self._load_segmenter(self.folder / known[name])
            idx = int(self.model.method_index([name])[0])
            self._methods[key] = _Method(name, seg, idx, self.model.method_weight.shape[1] if idx >= 0 else 0)
        return self._methods[key]

    def add_checkpoint(self, path: str | os.PathLike) -> str:
        """Register a user's segmenter checkpoint (a sqed Lightning checkpoint); returns its key.

        It is scored through the shared, method-agnostic adapter only.
        """
        path = Path(path)
        seg = self._load_segmenter(path)
        key = ("<checkpoint>", str(path))
        self._methods[key] = _Method(f"{seg.spec.name} ({path.name})", seg, -1, 0)
        return str(path)

    def _load_segmenter(self, path: Path) -> Segmenter:
        from rssqa.tasks.sqed import load_segmenter

        seg = load_segmenter(path)
        if seg.grid != self.config["grid"] or seg.hist_bins != self.config["hist_bins"]:
            raise RSSQAError(
                f"{path}: grid {seg.grid} / {seg.hist_bins} bins, but the scorer reads grid {self.config['grid']} / "
                f"{self.config['hist_bins']} bins"
            )
        missing = [k for k in self.config["layers"] if k not in seg.spec.features]
        if missing:
            raise RSSQAError(f"{path}: the segmenter has no feature layers {missing} (the scorer reads {self.config['layers']})")
        return seg

    # ------------------------------------------------------------------------------------ scoring
    def check_image(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """``image`` as contiguous ``H×W×3`` uint8, or a one-line error naming ``name``."""
        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise RSSQAError(f"{name}: {a.dtype} pixels; expected 8-bit (uint8)")
        if a.ndim != 3 or a.shape[2] != 3:
            raise RSSQAError(f"{name}: shape {a.shape}; expected H x W x 3 (three channels)")
        if min(a.shape[:2]) < self.min_size:
            raise RSSQAError(
                f"{name}: {a.shape[1]}x{a.shape[0]} px is smaller than the {self.min_size}x{self.min_size} px the scorer takes"
            )
        return np.ascontiguousarray(a)

    @torch.no_grad()
    def _score_chunk(self, images: np.ndarray, methods: Sequence[_Method]) -> np.ndarray:
        """Scores of ``n <= chunk`` same-size images: ``n×M``. Always one forward of ``chunk`` rows."""
        from rssqa.models.clip import to_model_input

        n = len(images)
        if n < self.chunk:
            images = np.concatenate([images, np.zeros((self.chunk - n, *images.shape[1:]), np.uint8)])
        pixels = torch.from_numpy(images)
        embed, tokens = clip_image_features(self.clip, to_model_input(self.clip, pixels), self.chunk)
        sem = self.model.encode_semantics(embed, tokens) if self.model.uses_sem else None
        x01 = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        out = np.zeros((n, len(methods)))
        for j, m in enumerate(methods):
            seg = None
            if self.model.uses_seg:
                stats = m.segmenter.describe(x01)
                inp = segmentation_inputs(stats, self.config["layers"], self.config["max_classes"], m.feat_dim)
                idx = torch.full((self.chunk,), m.adapter, dtype=torch.long)
                seg = self.model.encode_segmentation(inp["seg_cells"], inp["seg_global"], inp.get("seg_feats"), idx)
            out[:, j] = self.model.score(sem, seg)[:n].double().numpy()
        return out

    def score(
        self,
        images: Sequence[np.ndarray],
        methods: Sequence[str] | None = None,
        source: str | None = None,
        checkpoints: Sequence[str] = (),
        names: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Predicted OA of each method's segmentation of each image.

        Args:
            images: ``H×W×3`` uint8 images (sizes may differ; same-size images share forward passes).
            methods: registered method names of ``source`` (default: all of them unless ``checkpoints``).
            source: which source's method checkpoints to use (optional when the scorer has one).
            checkpoints: user segmenter checkpoints, scored after ``methods``.
            names: image names for error messages.

        Returns:
            ``N×M`` scores in (0, 1), methods in the order given (then the checkpoints).
        """
        chosen = self.resolve_methods(methods, source, checkpoints)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        imgs = [self.check_image(im, nm) for im, nm in zip(images, names, strict=True)]
        out = np.zeros((len(imgs), len(chosen)))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(imgs):
            by_size.setdefault(im.shape[:2], []).append(i)
        for idx in by_size.values():
            for start in range(0, len(idx), self.chunk):
                part = idx[start : start + self.chunk]
                out[part] = self._score_chunk(np.stack([imgs[i] for i in part]), chosen)
        return out

    def resolve_methods(self, methods: Sequence[str] | None, source: str | None, checkpoints: Sequence[str] = ()) -> list[_Method]:
        """The methods to run: registered names of ``source`` then user checkpoints."""
        chosen: list[_Method] = []
        if methods is None and not checkpoints:
            methods = self.methods(source)
        for name in methods or ():
            chosen.append(self.method(name, source))
        for path in checkpoints:
            key = ("<checkpoint>", str(Path(path)))
            if key not in self._methods:
                self.add_checkpoint(path)
            chosen.append(self._methods[key])
        if not chosen:
            raise RSSQAError("no methods to score")
        return chosen

    def method_names(self, methods: Sequence[str] | None, source: str | None, checkpoints: Sequence[str] = ()) -> list[str]:
        """Display names of :meth:`resolve_methods`."""
        return [m.name for m in self.resolve_methods(methods, source, checkpoints)]

    def recommend(
        self, images: Sequence[np.ndarray], methods: Sequence[str] | None = None, source: str | None = None,
        names: Sequence[str] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Per image, the methods ranked by predicted OA: ``[[(method, score), ...], ...]``."""
        labels = self.method_names(methods, source)
        scores = self.score(images, methods, source, names=names)
        return [rank_methods(dict(zip(labels, row.tolist(), strict=True))) for row in scores]
