"""The deployable RS-SQA scorer: predicted OA of any segmentation method's result on an image, no labels.

A scorer folder (what the sqa stage exports under ``runs/<profile>/sqa/scorer/``) holds
``scorer.json`` (the head's configuration, the CLIP-RS it was trained with and its fingerprint, the
segmentation methods and their checkpoints, relative to the folder) and ``scorer.safetensors`` (the
quality head's weights, input standardisation included); where the stage trained them, also the
agreement and ranking heads and ``scorer_pixel.safetensors``, the pixel error head
(:mod:`rssqa.models.pixel_error`, :meth:`Scorer.pixel_error`).

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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rssqa.agreement import MIN_METHODS, quality_agreement_maps
from rssqa.errors import RSSQAError
from rssqa.intervals import bounds
from rssqa.models.clip import clip_fingerprint, image_size, load_clip
from rssqa.models.pixel_error import PixelErrorHead, image_quality, pixel_inputs
from rssqa.models.quality_inputs import QualityInputs, forward_rows
from rssqa.models.segmenters import Segmenter, load_segmenter
from rssqa.models.sqa import RSSQA
from rssqa.recommend import POLICY_FIXED, apply_policy, rank_methods
from rssqa.scorer_folder import (
    AGREEMENT_WEIGHTS,
    CONFIG,
    FORMAT,
    PIXEL_WEIGHTS,
    RANKING_WEIGHTS,
    WEIGHTS,
    load_head,
    load_pixel_head,
    read_config,
)


@dataclass
class _Method:
    name: str
    segmenter: Segmenter
    adapter: int  # per-method adapter index, -1 for the shared adapter only
    feat_dim: int


def _by_shares(window_values: np.ndarray, parts: Sequence[tuple[Any, np.ndarray]]) -> np.ndarray:
    """Per image, its windows' rows averaged by the shares of its pixels each owns: ``W×M`` -> ``N×M``."""
    out, start = np.zeros((len(parts), window_values.shape[1])), 0
    for i, (_, share) in enumerate(parts):
        out[i], start = share @ window_values[start : start + len(share)], start + len(share)
    return out


class Scorer:
    """RS-SQA as a deployable scorer (see the module docstring).

    Args:
        model: the quality head, in eval mode.
        clip: the frozen CLIP-RS (open_clip) model.
        config: the scorer's ``scorer.json`` content.
        folder: the scorer folder (relative paths in ``config`` resolve against it).
        chunk: forward batch size; part of the numerics.
        agreement_model: the head that also reads agreement between methods (optional).
        ranking_model: an agreement head trained to rank methods, used by :meth:`recommend` (optional).
        pixel_model: the pixel error head, used by :meth:`pixel_error` (optional).
    """

    def __init__(
        self, model: RSSQA, clip: torch.nn.Module, config: dict[str, Any], folder: Path, chunk: int | None = None,
        agreement_model: RSSQA | None = None,
        ranking_model: RSSQA | None = None,
        pixel_model: PixelErrorHead | None = None,
    ):
        self.model, self.clip, self.config, self.folder = model.eval(), clip.eval(), config, folder
        self.agreement_model = agreement_model.eval() if agreement_model is not None else None
        self.ranking_model = ranking_model.eval() if ranking_model is not None else None
        self.pixel_model = pixel_model.eval() if pixel_model is not None else None
        self.chunk = int(chunk or config.get("chunk", 8))
        if self.chunk < 1:
            raise RSSQAError(f"chunk: must be positive, got {self.chunk}")
        # one implementation of the head's inputs, shared with RS-SQED labelling and training
        # the segmenters run with the forward batch RS-SQED labelling used (older folders: ``chunk``)
        seg_chunk = int(config.get("seg_chunk") or self.chunk)
        # an image larger than the training tiles runs in smaller batches (not padded to a chunk of tiles' work)
        tiles = [h * w for h, w in (config.get("image_sizes") or {}).values() if h and w]
        self.quality_inputs = QualityInputs(
            tuple(config["layers"]), config["max_classes"], 0, clip_chunk=self.chunk, seg_chunk=seg_chunk, grid=config["grid"],
            tile_pixels=max(tiles) if tiles else None,
        )  # fmt: skip
        self.min_size = image_size(clip)
        self._methods: dict[tuple[str, str], _Method] = {}

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | os.PathLike, clip: str | os.PathLike | None = None, chunk: int | None = None) -> Scorer:
        """Load a scorer folder, with the CLIP it records or ``clip`` (which must be that same model).

        Raises:
            RSSQAError: missing or invalid files, or a CLIP that is not the one the scorer was trained with.
        """
        folder = Path(folder)
        path = folder / CONFIG
        config = read_config(folder)
        try:
            model_kwargs, clip_cfg = config["model"], config["clip"]
        except (KeyError, TypeError) as e:
            raise RSSQAError(f"{path}: not a scorer config ({type(e).__name__}: {e})") from None
        if config.get("format") != FORMAT:
            raise RSSQAError(f"{path}: scorer format {config.get('format')!r}, this version reads {FORMAT}")
        model = load_head(model_kwargs, folder / WEIGHTS, path)
        agree, rank = config.get("agreement_model"), config.get("ranking_model")
        agreement_model = load_head(agree, folder / AGREEMENT_WEIGHTS, path) if agree else None
        ranking_model = load_head(rank, folder / RANKING_WEIGHTS, path) if rank else None
        pixel = config.get("pixel_model")
        pixel_model = load_pixel_head(pixel, folder / PIXEL_WEIGHTS) if pixel else None
        clip_path = Path(clip) if clip is not None else folder / clip_cfg["path"]
        clip_model, *_ = load_clip(clip_path)
        found = clip_fingerprint(clip_model)
        if found != clip_cfg["fingerprint"]:
            raise RSSQAError(
                f"{clip_path}: not the CLIP this scorer was trained with (fingerprint {found}, "
                f"{path} expects {clip_cfg['fingerprint']})"
            )
        return cls(model, clip_model, config, folder, chunk, agreement_model, ranking_model, pixel_model)

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
        agreement_model: RSSQA | None = None,
        tile: int | None = None,
    ) -> Scorer:
        """A scorer from models in memory (no folder): ``segmenters`` become the methods of ``source``
        (``tile``: the side of the tiles they were trained on, for :meth:`rows_for`)."""
        seg = next(iter(segmenters.values()))
        config = {
            "format": FORMAT, "layers": list(layers), "max_classes": max_classes, "grid": seg.grid,
            "hist_bins": seg.hist_bins, "chunk": chunk, "checkpoints": {source: dict.fromkeys(segmenters, "")},
            **({"image_sizes": {source: [tile, tile]}} if tile else {}),
        }  # fmt: skip
        scorer = cls(model, clip, config, Path("."), chunk, agreement_model)
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

    def reading(self, source: str | None = None) -> dict[str, Any]:
        """How the sqed stage read ``source``'s files (``read`` in ``scorer.json``: scale, gsd, bands, rescale; ``{}``: as they are)."""
        return self.config["read"].get(self.resolve_source(source), {}) if self.config.get("read") else {}

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

    def inputs(
        self, images: Sequence[np.ndarray], methods: Sequence[str] | None = None, source: str | None = None,
        checkpoints: Sequence[str] = (), agreement: bool = False,
    ) -> dict[str, Any]:
        """What the quality head reads for same-size images and each method (no scoring).

        The same numbers RS-SQED caches for training (:mod:`rssqa.models.quality_inputs`); with
        ``agreement``, also each method's agreement with the other methods given.

        Returns:
            ``sem_embed``, ``sem_tokens`` and ``methods``, one dict of segmentation inputs per method,
            in the order of :meth:`resolve_methods`.
        """
        chosen = self.resolve_methods(methods, source, checkpoints)
        imgs = [self.check_image(im, f"image {i}") for i, im in enumerate(images)]
        if len({im.shape for im in imgs}) > 1:
            raise RSSQAError("inputs: images of one size only (score() groups sizes itself)")
        n = len(imgs)
        out = self._inputs(np.stack(imgs), chosen, self.model, agreement)
        per_method = [{k: v[:n] for k, v in m.items()} for m in out.pop("methods")]
        return {**{k: v[:n] for k, v in out.items()}, "methods": per_method}

    def _inputs(
        self, images: np.ndarray, methods: Sequence[_Method], head: RSSQA, agreement: bool, pixels: bool = False
    ) -> dict[str, Any]:
        """Head inputs of ``images`` padded with zero images to whole chunks (the fixed forward batch,
        :meth:`rows_for`); with ``pixels``, also every method's per-pixel outputs (``QualityInputs`` ``pixels``)."""
        n, chunk = len(images), self.rows_for(images.shape[1:3])
        rows = -(-n // chunk) * chunk
        if n < rows:
            images = np.concatenate([images, np.zeros((rows - n, *images.shape[1:]), np.uint8)])
        segmenters = [m.segmenter for m in methods] if head.uses_seg or pixels else []
        feat_dims = [m.feat_dim for m in methods] if head.uses_seg or pixels else []
        clip = self.clip if head.uses_sem or pixels else None
        agreement = agreement and (head.uses_seg or pixels)
        return self.quality_inputs(images, segmenters, clip, feat_dims, agreement=agreement, pixels=pixels)

    def rows_for(self, size: Sequence[int]) -> int:
        """The fixed forward batch of images of ``size`` ``(H, W)``: ``chunk``, fewer for images larger than the
        training tiles (down to one: a whole scene-sized image is not padded with ``chunk - 1`` blank copies),
        :func:`~rssqa.models.quality_inputs.forward_rows`. It depends on the size alone, so an image scores the
        same alone or in any batch, and an image of the training tiles' size as RS-SQED labelled it."""
        return forward_rows(size, self.chunk, self.quality_inputs.tile_pixels)  # no tile sizes (older folders): chunk

    @torch.no_grad()
    def _score_chunk(self, images: np.ndarray, methods: Sequence[_Method], scored: int, head: RSSQA) -> np.ndarray:
        """Scores by ``head`` of ``n <= chunk`` same-size images for the first ``scored`` of ``methods``
        (the rest only give agreement): ``n×scored``. Always one forward of ``chunk`` rows."""
        return self.head_scores(self._inputs(images, methods, head, head.agreement), methods, scored, head, len(images))

    @torch.no_grad()
    def head_scores(self, inp: dict[str, Any], methods: Sequence[_Method], scored: int, head: RSSQA, n: int) -> np.ndarray:
        """Scores by ``head`` of the first ``n`` rows of head inputs ``inp`` (one chunk, from
        :meth:`_inputs` or :class:`QualityInputs`) for the first ``scored`` of ``methods``: ``n×scored``."""
        sem = head.encode_semantics(inp["sem_embed"], inp["sem_tokens"]) if head.uses_sem else None
        out = np.zeros((n, scored))
        for j, m in enumerate(methods[:scored]):
            # the method's own inputs: read by the segmentation branch and by the agreement's direct term
            s = inp["methods"][j] if head.uses_seg or head.agree_logit is not None else {}
            seg = None
            if head.uses_seg:
                idx = torch.full((len(s["seg_cells"]),), m.adapter, dtype=torch.long)
                seg = head.encode_segmentation(
                    s["seg_cells"], s["seg_global"], s.get("seg_feats"), idx, s.get("agree_maps"), s.get("agree_global")
                )
            out[:, j] = head.score(sem, seg, head.agreement_offset(s.get("agree_global")))[:n].double().numpy()
        return out

    def score(
        self,
        images: Sequence[np.ndarray],
        methods: Sequence[str] | None = None,
        source: str | None = None,
        checkpoints: Sequence[str] = (),
        names: Sequence[str] | None = None,
        with_methods: Sequence[str] = (),
        agreement: bool | None = None,
        ranking: bool = False,
        tiles: bool = True,
        interval: Mapping[str, Any] | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted OA of each method's segmentation of each image.

        An image larger than the tiles the heads were trained on (:func:`rssqa.scene.common.trained_tile`) is
        scored as those tiles: windows of the training size that cover it (the last flush with the edge),
        each scored as an image, and their scores averaged by the pixels each window owns (those nearest
        its centre), which is how a whole image's OA follows from its parts'; ``tiles=False`` scores it
        whole. On the Dubai set's val and test areas (18 whole images at the training scale, the agreement
        head) the windows ranked the eight methods better within each image: SRCC 0.63 against 0.45 whole,
        regret 0.038 against 0.068 (paired bootstrap over images: +0.18 [+0.11, +0.26], -0.030 [-0.048, -0.015]).

        Args:
            images: ``H×W×3`` uint8 images (sizes may differ; same-size images share forward passes).
            methods: registered method names of ``source`` (default: all of them unless ``checkpoints``).
            source: which source's method checkpoints to use (optional when the scorer has one).
            checkpoints: user segmenter checkpoints, scored after ``methods``.
            names: image names for error messages.
            with_methods: other registered methods run only for their agreement with the scored ones.
            agreement: score with the head that reads agreement between methods (default: when
                ``with_methods`` are given and the scorer has that head). It needs at least three
                methods in all.
            ranking: score with the ranking head (an agreement head trained to order methods; what
                :meth:`recommend` uses when the scorer has one). Implies ``agreement``.
            tiles: score an image larger than the training tiles window by window (above).
            interval: the head's interval offsets (:meth:`interval`): return each score's band too, the
                means of its windows' bounds by the same shares (what ``rssqa scene`` gives a scene's mean).

        Returns:
            ``N×M`` scores in (0, 1), methods in the order given (then the checkpoints); with ``interval``,
            ``(scores, low, high)``.
        """
        chosen = self.resolve_methods(methods, source, checkpoints)
        if ranking and self.ranking_model is None:
            raise RSSQAError("ranking: this scorer has no ranking head")
        use_agreement = self.use_agreement([m.name for m in chosen], with_methods, True if ranking else agreement)
        head = self.ranking_model if ranking else self.agreement_model if use_agreement else self.model
        others = [self.method(w, source) for w in dict.fromkeys(with_methods) if w not in {m.name for m in chosen}]
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        imgs = [self.check_image(im, nm) for im, nm in zip(images, names, strict=True)]
        from rssqa.scene.common import trained_tile  # (rssqa.scene imports this module)
        from rssqa.scene.windows import tile_windows

        # per image, its windows (an image larger than the training tiles) and their shares of its pixels
        parts = [tile_windows(im, trained_tile(self.config, source) if tiles else None) for im in imgs]
        flat = [w for windows, _ in parts for w in windows]
        scores = np.zeros((len(flat), len(chosen)))
        for part, batch in self._same_size_chunks(flat):
            scores[part] = self._score_chunk(batch, [*chosen, *others], len(chosen), head)
        if interval is None:
            return _by_shares(scores, parts)
        return tuple(_by_shares(x, parts) for x in (scores, *bounds(scores, interval)))

    def _same_size_chunks(self, imgs: Sequence[np.ndarray]):
        """``(indexes, N×H×W×3 batch)`` of at most :meth:`rows_for` same-size images, in order of first size seen."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(imgs):
            by_size.setdefault(im.shape[:2], []).append(i)
        for size, idx in by_size.items():
            chunk = self.rows_for(size)
            for start in range(0, len(idx), chunk):
                part = idx[start : start + chunk]
                yield part, np.stack([imgs[i] for i in part])

    @torch.no_grad()
    def pixel_error(
        self, images: Sequence[np.ndarray], methods: Sequence[str] | None = None, source: str | None = None,
        with_methods: Sequence[str] = (), names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Per-pixel probability that each method's class is wrong (the pixel error head).

        Args:
            images: ``H×W×3`` uint8 images (sizes may differ).
            methods: registered method names of ``source`` (default: all of them).
            source: which source's method checkpoints to use (optional when the scorer has one).
            with_methods: other registered methods run only for their agreement with these.
            names: image names for error messages.

        Returns:
            Per image, an ``M×H×W`` float32 array in [0, 1], methods in the order given.
        """
        head = self.pixel_model
        if head is None:
            raise RSSQAError("pixel error: this scorer has no pixel error head (the sqa stage's pixel.enabled)")
        chosen = self.resolve_methods(methods, source)
        others = [self.method(w, source) for w in dict.fromkeys(with_methods) if w not in {m.name for m in chosen}]
        run = [*chosen, *others]
        if head.agreement and len(run) < MIN_METHODS:
            raise RSSQAError(f"--with: the pixel error head reads agreement; it needs at least {MIN_METHODS} methods in all, got {len(run)}")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        imgs = [self.check_image(im, nm) for im, nm in zip(images, names, strict=True)]
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(imgs)
        for part, batch in self._same_size_chunks(imgs):
            n, chunk = len(batch), self.rows_for(batch.shape[1:3])
            if n < chunk:  # the fixed forward batch, as scoring
                batch = np.concatenate([batch, np.zeros((chunk - n, *batch.shape[1:]), np.uint8)])
            weighted = None
            if head.quality_power > 0:  # the others weighted by the recommending head's scores
                rec = self.recommend_head(len(run))
                inp = self._inputs(batch, run, rec, True, pixels=True)
                quality = torch.from_numpy(self.head_scores(inp, run, len(run), rec, chunk)).float()
                probs, preds = [p["probs"] for p in inp["pixels"]], [p["pred"] for p in inp["pixels"]]
                # the maps of the scored methods only (the others are run for their votes)
                weighted = [
                    quality_agreement_maps(probs, preds, quality, head.quality_power, torch.full((len(quality),), j))
                    for j in range(len(chosen))
                ]
            else:
                inp = self.quality_inputs(
                    batch, [m.segmenter for m in run], self.clip if head.token_dim > 0 else None, [0] * len(run),
                    agreement=head.agreement, pixels=True,
                )  # fmt: skip
            tokens = inp.get("sem_tokens") if head.token_dim > 0 else None
            maps = []
            for j, p in enumerate(inp["pixels"][: len(chosen)]):
                w = None if weighted is None else weighted[j].cpu()
                x = pixel_inputs(p["probs"].cpu(), p["agree"].cpu() if head.agreement else None, w)
                maps.append(head.probability(x, tokens)[:n])
            stacked = torch.stack(maps, 1).numpy().astype(np.float32)
            for j, i in enumerate(part):
                out[i] = stacked[j]
        return out

    def error_map_quality(
        self, images: Sequence[np.ndarray], methods: Sequence[str] | None = None, source: str | None = None,
        with_methods: Sequence[str] = (), names: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Predicted OA read off the pixel error head's maps: ``1 -`` the mean error probability of each
        method's map (:func:`~rssqa.models.pixel_error.image_quality`; arguments as :meth:`pixel_error`).

        Returns:
            ``n_images×M`` float64, methods in the order given.
        """
        maps = self.pixel_error(images, methods, source, with_methods, names)
        return np.stack([image_quality(torch.from_numpy(m)).double().numpy() for m in maps])

    def recommend_head(self, n_methods: int) -> RSSQA:
        """The head that ranks ``n_methods`` methods (:meth:`recommend`): the ranking head, else the
        agreement head (with at least three methods), else the paper's."""
        if n_methods >= MIN_METHODS:
            for head in (self.ranking_model, self.agreement_model):
                if head is not None:
                    return head
        return self.model

    def head_key(self, head: RSSQA) -> str:
        """Where ``head`` (one of this scorer's) is described in ``scorer.json``: ``ranking_model``,
        ``agreement_model`` or ``model`` (its arguments, and its interval offsets under ``intervals``)."""
        if head is not None and head is self.ranking_model:
            return "ranking_model"
        return "agreement_model" if head is not None and head is self.agreement_model else "model"

    def interval(self, head: RSSQA) -> dict[str, Any] | None:
        """The interval offsets of ``head``'s predicted OA, measured on the sqa stage's val split
        (:func:`rssqa.intervals.fit`), or ``None`` (a scorer from before they were recorded)."""
        return (self.config.get("intervals") or {}).get(self.head_key(head))

    def use_agreement(self, scored: Sequence[str], with_methods: Sequence[str] = (), agreement: bool | None = None) -> bool:
        """Whether scoring the methods named ``scored`` uses the agreement head (see :meth:`score`); a
        one-line error where it cannot."""
        wanted = bool(with_methods) if agreement is None else agreement
        if not wanted:
            return False
        if self.agreement_model is None:
            if agreement:
                raise RSSQAError("--agreement: this scorer has no agreement head (train it with RS-SQED of >= 3 methods)")
            return False
        total = len(set(scored) | set(with_methods))  # a method named twice counts once
        if total < MIN_METHODS:
            raise RSSQAError(f"--with: agreement needs at least {MIN_METHODS} methods in all, got {total}")
        return True

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
        names: Sequence[str] | None = None, tiles: bool = True, policy: bool = True, interval: Mapping[str, Any] | None = None,
    ) -> list[list[tuple]]:
        """Per image, the methods ranked by predicted OA: ``[[(method, score), ...], ...]``.

        With at least three methods, ranks with the scorer's ranking head (an agreement head trained to
        order methods) or else its agreement head, where it has them; the paper's head otherwise. An
        image larger than the training tiles is scored window by window (:meth:`score`, ``tiles``). With
        ``policy``, the scorer's best fixed method comes first where validation chose it (:meth:`fixed_first`).
        With ``interval`` (that head's, :meth:`interval`), each entry is ``(method, score, low, high)``.
        """
        labels = self.method_names(methods, source)
        head = self.recommend_head(len(labels))
        scored = self.score(images, methods, source, names=names, agreement=head is not self.model,
                            ranking=head is self.ranking_model, tiles=tiles, interval=interval)  # fmt: skip
        scores, low, high = scored if interval is not None else (scored, None, None)
        fixed = self.fixed_first(labels) if policy else None
        fixed_name = None if fixed is None else labels[fixed]
        ranked = [apply_policy(rank_methods(dict(zip(labels, row.tolist(), strict=True))), fixed_name) for row in scores]
        if interval is None:
            return ranked
        where = {m: j for j, m in enumerate(labels)}
        return [[(m, s, float(low[i, where[m]]), float(high[i, where[m]])) for m, s in r] for i, r in enumerate(ranked)]

    def fixed_first(self, labels: Sequence[str]) -> int | None:
        """Index in ``labels`` of the method :meth:`recommend` puts first whatever the scores, or ``None``
        (rank by the scores): the scorer's ``recommend_policy`` is ``fixed`` where its recommending model did
        not choose better than always running the best fixed method on the validation split
        (:func:`rssqa.recommend.choose_policy`), and that method is among ``labels``."""
        policy = self.config.get("recommend_policy") or {}
        if policy.get("policy") == POLICY_FIXED and policy.get("method") in labels:
            return list(labels).index(policy["method"])
        return None
