"""The pixel-level error head: where a method's segmentation is wrong, trained and tested on RS-SQED.

The per-pixel inputs and targets of (image, method) rows come from :mod:`rssqa.tasks.sqa.pixel_rows`.
:func:`fit_pixel_head` trains :class:`~rssqa.models.pixel_error.PixelErrorHead` with binary cross
entropy on a configurable number of images per source (input standardisation from their labelled
pixels) and keeps the epoch of best pixel AUROC on other images: train and val split, or, with
quality-weighted agreement (whose scores are out of sample on val only), two disjoint parts of val.
:func:`evaluate_pixel_head` scores every (image, method) row of the test split with the head and the
label-free per-pixel baselines (:data:`rssqa.models.pixel_error.BASELINES`) on the same fixed, seeded
subsample of labelled pixels per row, pools the pixels, and compares the head with the best baseline
by a paired bootstrap over test images (:func:`rssqa.pixel_auroc.auroc_bootstrap`, the
verdict words of :func:`rssqa.metrics.verdict`). :func:`run_pixel` does both and returns the summary's ``pixel_error``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from rssqa.agreement import MIN_METHODS
from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import BASELINES, PixelErrorHead, image_quality
from rssqa.pixel_auroc import auroc_bootstrap
from rssqa.progress import line
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.pixel_rows import (
    IGNORE,
    LABEL,
    MIN_VAL_IMAGES,
    Progress,
    Rows,
    Scores,
    choose_images,
    collect_rows,
    methods_of,
    partition_val,
    pixel_device,
    seam_blocks,
)  # fmt: skip

HEAD = "head"
STANDARDISE_PIXELS = 4096  # labelled pixels per training row the input standardisation is fitted on


@dataclass(frozen=True)
class PixelConfig:
    """The ``pixel:`` block of the sqa config.

    Args:
        enabled: train, test and export the pixel error head.
        train_images: train-split images per source (seeded choice; 0: all of them).
        val_images: val-split images per source for epoch selection (0: all of them).
        top: train on and select by each image's ``top`` most accurate methods only (0: every method).
            The error map is made of the recommended method's rows, which are meant to be among an
            image's best. Measured on the demo: on val, each image's best method was judged better by
            a head trained on the top 3 than by one trained on all eight (pixel AUROC 0.78 against
            0.76), but not on the test split's recommended rows (0.758 against 0.760) nor on the world
            scenes (margins over the best baseline +0.001 to +0.048 against +0.004 to +0.050): off.
        epochs: passes over the training rows; the epoch of best val AUROC is kept.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch: (image, method) rows per optimisation step.
        pixels_per_row: labelled pixels drawn (seeded, without replacement) per (image, method) row for
            the val and test metrics; 0: every labelled pixel.
        hidden: channels of the head's 3×3 convolutions.
        token_channels: channels the CLIP-RS patch tokens are projected to.
        tokens: read the CLIP-RS patch tokens (the data module's cached features).
        block: images per pass through the seam (rounded up to whole segmenter chunks); bounds memory.
        n_boot: bootstrap draws of the head-versus-best-baseline comparison.
        quality_power: > 0: the head also reads the agreement with the other methods weighted by
            their predicted quality ``** quality_power`` (:func:`rssqa.agreement.quality_agreement_maps`;
            the scores of the model that recommends methods, as the scorer has them). Those scores
            are out of sample on the val and test splits only, so the head then trains on
            ``train_images`` val-split images per source and chooses its epoch on ``val_images``
            other val-split images (disjoint, seeded). Measured on the demo's val split (half of it
            to train, a sixth to choose the epoch, a third to test; three seeded splits): AUROC on
            each image's recommended method 0.767 / 0.761 / 0.774 without, 0.792 / 0.788 / 0.803
            with power 8 (power 1: 0.780 on the first split; the true OA as weights, a bound: 0.819).
            0: off (the head trains on the train split and chooses its epoch on the val split).
        quality_folds: >= 2 (with ``quality_power``): the recommending model is also trained this many
            times, each time without one fold of the train split's groups, so that the train split has
            out-of-sample scores too (:func:`~rssqa.tasks.sqa.folds.crossfit_splits`); the head then
            trains on ``train_images`` train-split images per source as well as the val images above.
            Measured on the demo (3 folds, 32 train-split images per source besides the 32 val ones;
            the same images to choose the epoch): val AUROC 0.8779 against 0.8764 with the val images
            alone, 0.8792 with 64 train-split images (pixel stage 95 s, 65 s, 121 s). 0: off.
        group_folds: with the stage's ``group_folds``, also train a head per fold (on that fold's val
            images, weighted by that fold's recommender) so that the error map's OA (``error_map``) is
            scored out of fold beside the other scores.
        cache_gb: with the heads of the group folds, the methods' per-pixel outputs of every pool image
            are computed once and kept on disk in the run's ``cache/`` for all the heads
            (:mod:`~rssqa.tasks.sqa.pixel_cache`; the same numbers) unless they would take more than this
            many GB (the Dubai profile: 1.5 GB); 0: every head runs the methods on its images itself.
    """

    enabled: bool = True
    train_images: int = 32
    val_images: int = 16
    top: int = 0
    epochs: int = 4
    lr: float = 3.0e-3
    weight_decay: float = 1.0e-4
    batch: int = 16
    pixels_per_row: int = 512
    hidden: int = 16
    token_channels: int = 8
    tokens: bool = True
    block: int = 32
    n_boot: int = 1000
    quality_power: float = 8.0
    quality_folds: int = 0
    group_folds: bool = True
    cache_gb: float = 4.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch", "hidden", "block", "n_boot"):
            if getattr(self, key) < 1:
                raise RSSQAError(f"pixel.{key}: must be positive, got {getattr(self, key)}")
        for key in ("train_images", "val_images", "top", "pixels_per_row", "token_channels"):
            if getattr(self, key) < 0:
                raise RSSQAError(f"pixel.{key}: must not be negative, got {getattr(self, key)}")
        if self.lr <= 0:
            raise RSSQAError(f"pixel.lr: must be positive, got {self.lr}")
        if self.quality_folds < 0 or self.quality_folds == 1:
            raise RSSQAError(f"pixel.quality_folds: 0 (off) or at least 2, got {self.quality_folds}")
        if self.quality_power < 0:
            raise RSSQAError(f"pixel.quality_power: must not be negative, got {self.quality_power}")
        if self.cache_gb < 0:
            raise RSSQAError(f"pixel.cache_gb: must not be negative, got {self.cache_gb}")

    @classmethod
    def of(cls, value: PixelConfig | Mapping[str, Any] | None) -> PixelConfig:
        """A config from a mapping (unknown keys are a one-line error), ``None`` (the defaults) or itself."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = set(cls.__dataclass_fields__)
        bad = set(value) - known
        if bad:
            raise RSSQAError(f"pixel: unknown keys {sorted(bad)}; known: {sorted(known)}")
        return cls(**dict(value))


# -------------------------------------------------------------------------------------- sampling
def sample_pixels(target: torch.Tensor, n: int, seed: int, image: int, method: int) -> torch.Tensor:
    """Flat indices of ``n`` labelled pixels of one row (all when ``n`` is 0 or above the labelled
    count), drawn without replacement by a generator seeded with the row's image and method, sorted."""
    labelled = torch.nonzero(target.reshape(-1) != IGNORE).squeeze(1).numpy()
    if n and n < len(labelled):
        labelled = np.sort(np.random.default_rng([seed, image, method]).choice(labelled, n, replace=False))
    return torch.from_numpy(labelled)


@dataclass
class _Sample:
    """Scores of the sampled pixels, pooled: ``scores`` {name: N}, ``target`` N bool, ``image`` N, ``source`` N;
    ``quality``: (image index, method index) -> the OA the head's whole error map predicts (:func:`image_quality`)."""

    scores: dict[str, list[torch.Tensor]]
    target: list[torch.Tensor]
    image: list[np.ndarray]
    source: list[np.ndarray]
    quality: dict[tuple[int, int], float] = field(default_factory=dict)

    def pooled(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray, np.ndarray]:
        return (
            {k: torch.cat(v) for k, v in self.scores.items()},
            torch.cat(self.target),
            np.concatenate(self.image),
            np.concatenate(self.source),
        )


def _score_rows(
    head: PixelErrorHead | None,
    x: torch.Tensor,
    target: torch.Tensor,
    tokens: torch.Tensor | None,
    images: Sequence[int],
    methods: Sequence[int],
    sources: Sequence[str],
    names: Sequence[str],
    cfg: PixelConfig,
    seed: int,
    sample: _Sample,
) -> None:
    """Score ``B`` rows (``x`` ``B×6×H×W``) by the head and the baselines ``names``; keep the sampled pixels."""
    x = x.float()
    scores = {}
    if head is not None:
        at = next(head.parameters()).device
        scores[HEAD] = head.probability(x.to(at), None if tokens is None else tokens.to(at)).cpu()
        sample.quality.update(zip(zip(images, methods, strict=True), image_quality(scores[HEAD]).tolist(), strict=True))
    for name in names:
        scores[name] = BASELINES[name](x)
    for b in range(len(x)):
        idx = sample_pixels(target[b], cfg.pixels_per_row, seed, images[b], methods[b])
        for k, v in scores.items():
            sample.scores.setdefault(k, []).append(v[b].reshape(-1)[idx])
        sample.target.append(target[b].reshape(-1)[idx] == 1)
        sample.image.append(np.full(len(idx), images[b]))
        sample.source.append(np.full(len(idx), sources[b], dtype=object))


def _tokens(tokens: torch.Tensor | None, images: Sequence[int]) -> torch.Tensor | None:
    return None if tokens is None else tokens[torch.as_tensor(list(images), dtype=torch.long)]


# -------------------------------------------------------------------------------------- training
def _standardisation_pixels(rows: Rows, seed: int) -> torch.Tensor:
    """``P×8``: up to :data:`STANDARDISE_PIXELS` seeded labelled pixels of every training row."""
    out = []
    for x, t, img, m in zip(rows.x, rows.target, rows.image, rows.method, strict=True):
        idx = sample_pixels(t, STANDARDISE_PIXELS, seed, img, m)
        out.append(x.reshape(x.shape[0], -1)[:, idx].T.float())
    return torch.cat(out)


def fit_pixel_head(
    train: Rows, val: Rows, tokens: torch.Tensor | None, agreement: bool, cfg: PixelConfig, seed: int, quality: bool = False
) -> tuple[PixelErrorHead, dict[str, Any]]:
    """Train the head on ``train`` rows (BCE on labelled pixels), keep the epoch of best val AUROC.

    Args:
        train: training rows (:func:`collect_rows`).
        val: validation rows.
        tokens: the data module's CLIP-RS patch tokens ``I×T×h×w`` (``None``: the head reads none).
        agreement: the head reads the agreement channels.
        cfg: the ``pixel:`` config.
        seed: seeds the initial weights, the order of the rows and the pixels standardisation reads.
        quality: the head also reads the quality-weighted agreement (``cfg.quality_power``).

    Returns:
        ``(head in eval mode on the CPU, {val_auroc, val_auroc_per_epoch, best_epoch, val_baselines,
        train_images, train_rows, train_pixels, val_rows, fit_seconds})``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    head = PixelErrorHead(
        agreement=agreement, token_dim=int(tokens.shape[1]) if tokens is not None else 0,
        token_channels=cfg.token_channels, hidden=cfg.hidden, quality_power=cfg.quality_power if quality else 0.0,
    )  # fmt: skip
    head.fit_standardisation(_standardisation_pixels(train, seed))
    device = pixel_device()
    head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(seed)
    names = _baseline_names(agreement)
    best, best_epoch, best_state, history, val_baselines = -math.inf, 0, None, [], {}
    steps = -(-len(train.x) // cfg.batch)
    progress = Progress("fit", cfg.epochs * steps, "steps")
    for epoch in range(cfg.epochs):
        head.train()
        total = 0.0
        for step, rows in enumerate(torch.randperm(len(train.x), generator=order).split(cfg.batch)):
            pick = rows.tolist()
            x = torch.stack([train.x[i] for i in pick]).to(device).float()
            y = torch.stack([train.target[i] for i in pick]).to(device)
            keep = y != IGNORE
            if not keep.any():
                continue
            t = _tokens(tokens, [train.image[i] for i in pick])
            logits = head(x, None if t is None else t.to(device))
            loss = F.binary_cross_entropy_with_logits(logits[keep], y[keep].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            progress(epoch * steps + step + 1, f", epoch {epoch + 1}/{cfg.epochs}, loss {total / (step + 1):.4f}")
        head.eval()
        scores, target, _, _ = score_split(head, val, tokens, names if epoch == 0 else (), cfg, seed).pooled()
        auroc = _auroc(scores[HEAD], target)
        history.append(auroc)
        if epoch == 0:
            val_baselines = {k: _auroc(scores[k], target) for k in names}
        if np.nan_to_num(auroc, nan=-1.0) > np.nan_to_num(best, nan=-1.0):  # undefined val AUROC: the first epoch
            best, best_epoch = auroc, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        line(LABEL, f"epoch {epoch + 1}: val AUROC {auroc:.4f} (best {best:.4f}, epoch {best_epoch})")
    head.cpu()
    if best_state is not None:
        head.load_state_dict(best_state)
    info = {
        "val_auroc": best, "val_auroc_per_epoch": history, "best_epoch": best_epoch, "val_baselines": val_baselines,
        "train_images": len(set(train.image)), "train_rows": len(train.x),
        "train_pixels": int(sum(int((t != IGNORE).sum()) for t in train.target)), "val_rows": len(val.x),
        "fit_seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    return head.eval(), info


def _baseline_names(agreement: bool) -> list[str]:
    # disagreement reads the agreement channels: only where every source has at least three methods
    return [k for k in BASELINES if agreement or k != "disagreement"]


@torch.no_grad()
def score_split(
    head: PixelErrorHead | None, rows: Rows, tokens: torch.Tensor | None, names: Sequence[str], cfg: PixelConfig, seed: int
) -> _Sample:
    """The head's and the baselines' scores on the sampled labelled pixels of stored ``rows``."""
    sample = _Sample({}, [], [], [])
    for start in range(0, len(rows.x), cfg.batch):
        sl = slice(start, start + cfg.batch)
        _score_rows(
            head, torch.stack(rows.x[sl]), torch.stack(rows.target[sl]), _tokens(tokens, rows.image[sl]),
            rows.image[sl], rows.method[sl], rows.source[sl], names, cfg, seed, sample,
        )  # fmt: skip
    return sample


# ------------------------------------------------------------------------------------ evaluation
def _auroc(score: torch.Tensor, target: torch.Tensor) -> float:
    if target.all() or not target.any():
        return math.nan
    return float(binary_auroc(score.double(), target.long(), thresholds=None))


def _ap(score: torch.Tensor, target: torch.Tensor) -> float:
    if not target.any():
        return math.nan
    return float(binary_average_precision(score.double(), target.long(), thresholds=None))


def _figures(sample: _Sample, names: Sequence[str], cfg: PixelConfig, seed: int) -> dict[str, Any]:
    """AUROC and AP of the head and of each baseline on pooled pixels; the head against the best
    baseline by a paired bootstrap over images."""
    scores, target, image, _ = sample.pooled()
    out: dict[str, Any] = {"auroc": _auroc(scores[HEAD], target), "ap": _ap(scores[HEAD], target)}
    out["baselines"] = {k: ({"auroc": _auroc(scores[k], target), "ap": _ap(scores[k], target)} if k in scores else None)
                        for k in BASELINES}  # fmt: skip
    ranked = [k for k in names if math.isfinite(out["baselines"][k]["auroc"])]
    best = max(ranked, key=lambda k: out["baselines"][k]["auroc"]) if ranked else None
    out["best_baseline"] = best
    out["vs_best_baseline"] = (
        auroc_bootstrap(scores[HEAD].numpy(), scores[best].numpy(), target.numpy(), image, cfg.n_boot, seed) if best else None
    )
    out["n_pixels"] = len(target)
    return out


def evaluate_pixel_head(
    data: SQADataModule,
    head: PixelErrorHead,
    tokens: torch.Tensor | None,
    agreement: bool,
    cfg: PixelConfig,
    seed: int,
    chosen: Mapping[int, int] | None = None,
    quality: Scores | None = None,
) -> dict[str, Any]:
    """AUROC and AP of the head and of each baseline on every (image, method) row of the test split,
    and (``recommended``) on each image's recommended row alone when ``chosen`` maps the data module's
    image index to the index of the method recommended there: the rows an error map is made of.

    Rows are streamed through the seam block by block (nothing but the sampled pixels is kept).
    """
    names = _baseline_names(agreement)
    sample, picked = _Sample({}, [], [], []), _Sample({}, [], [], [])
    methods = methods_of(data)
    plan = {s: choose_images(data, s, "test", 0, seed) for s in methods}
    total = sum(len(c) * len(methods[s]) for s, c in plan.items())
    progress, done = Progress("test", total), 0
    head = head.to(pixel_device())
    with torch.no_grad():
        for source, of_source in methods.items():
            blocks = seam_blocks(data, source, of_source, plan[source], agreement, cfg.block, quality, head.quality_power)
            for image_idx, per_method in blocks:
                n = len(image_idx)
                for m, (x, t) in zip(of_source, per_method, strict=True):
                    mi = data.methods.index(m)
                    _score_rows(head, x, t, _tokens(tokens, image_idx), image_idx, [mi] * n, [source] * n, names, cfg, seed, sample)
                    mine = [b for b, img in enumerate(image_idx) if chosen is not None and chosen.get(img) == mi]
                    if mine:
                        imgs = [image_idx[b] for b in mine]
                        _score_rows(head, x[mine], t[mine], _tokens(tokens, imgs), imgs, [mi] * len(mine), [source] * len(mine),
                                    names, cfg, seed, picked)  # fmt: skip
                done += n * len(of_source)
                progress(done)
    head.cpu()
    out = _figures(sample, names, cfg, seed)
    scores, target, image, source = sample.pooled()
    out["per_source"] = {
        s: {k: _auroc(v[torch.from_numpy(source == s)], target[torch.from_numpy(source == s)]) for k, v in scores.items()}
        for s in methods
    }
    out["recommended"] = {**_figures(picked, names, cfg, seed), "n_images": len(picked.target)} if picked.target else None
    out["error_rate"] = float(target.double().mean())
    out["n_test_images"] = len(np.unique(image))
    out["n_test_rows"] = total
    out["image_quality"] = sample.quality
    return out


# ------------------------------------------------------------------------------------------- run
def training_plans(
    data: SQADataModule, methods: Mapping[str, Sequence[str]], cfg: PixelConfig, seed: int, weighted: bool,
    crossfit: bool = False,
) -> tuple[bool, dict[str, dict[str, list[tuple[int, int]]]]]:
    """Whether the head reads the quality weights, and the images per source it trains on (``train``)
    and chooses its epoch on (``val``): with the weights, two disjoint parts of the val split (the
    scores are out of sample there), and with ``crossfit`` (out-of-fold scores on the train split)
    ``train_images`` train-split images besides; without them, or where a source has fewer than
    :data:`~rssqa.tasks.sqa.pixel_rows.MIN_VAL_IMAGES` val images (said in one line), the train and val splits."""
    if weighted:
        short = [s for s in methods if len(choose_images(data, s, "val", 0, seed)) < MIN_VAL_IMAGES]
        if not short:
            parts = {s: partition_val(data, s, cfg.train_images, cfg.val_images, seed) for s in methods}
            plans = {k: {s: p[i] for s, p in parts.items()} for i, k in enumerate(("train", "val"))}
            if crossfit:  # the train split has out-of-fold scores too
                plans["train"] = {s: choose_images(data, s, "train", cfg.train_images, seed) + p for s, p in plans["train"].items()}
            return True, plans
        line(LABEL, f"fewer than {MIN_VAL_IMAGES} val-split images in {', '.join(short)}: the head trains without quality weights")
    pairs = (("train", cfg.train_images), ("val", cfg.val_images))
    return False, {k: {s: choose_images(data, s, k, n, seed) for s in methods} for k, n in pairs}


def run_pixel(
    data: SQADataModule, cfg: PixelConfig | Mapping[str, Any] | None, seed: int = 0, chosen: Mapping[int, int] | None = None,
    quality: Mapping[str, Scores] | None = None,
) -> tuple[PixelErrorHead, dict[str, Any], dict[tuple[int, int], float]]:
    """Train, select and test the pixel error head on the data module's RS-SQED.

    Args:
        data: the prepared :class:`SQADataModule` (its RS-SQED folder, methods, CLIP-RS tokens).
        cfg: the ``pixel:`` config.
        seed: seeds the image choice, the weights, the order of the rows and the pixel subsample.
        chosen: test image index -> index of the method the scorer recommends there (the summary's
            ``recommended``: the figures on the rows an error map is made of).
        quality: per split (``val``, ``test``, and ``train`` when out of fold: ``cfg.quality_folds``),
            the recommending model's predicted OA of each (image index, method): the weights of the
            quality-weighted agreement (``cfg.quality_power``).

    Returns:
        ``(the trained head, the summary's pixel_error, the OA its error map predicts per test (image
        index, method index))``: :func:`~rssqa.models.pixel_error.image_quality` of every test row.
    """
    t0 = time.perf_counter()
    cfg = PixelConfig.of(cfg)
    methods = methods_of(data)
    agreement = all(len(m) >= MIN_METHODS for m in methods.values())
    tokens = data.sem["clip_rs"]["tokens"] if cfg.tokens else None
    for source in methods:
        data.sqed.masks(source)  # a one-line error naming the file before any work
    use = agreement and cfg.quality_power > 0 and quality is not None
    crossfit = use and "train" in quality
    weighted, plans = training_plans(data, methods, cfg, seed, use, crossfit)
    q_val = {**quality["val"], **quality.get("train", {})} if weighted else None  # train: with crossfit only
    train = collect_rows(data, plans["train"], "train", agreement, cfg.block, cfg.top, q_val, cfg.quality_power)
    val = collect_rows(data, plans["val"], "val", agreement, cfg.block, cfg.top, q_val, cfg.quality_power)
    head, info = fit_pixel_head(train, val, tokens, agreement, cfg, seed, weighted)
    del train, val
    test = evaluate_pixel_head(data, head, tokens, agreement, cfg, seed, chosen, quality["test"] if weighted else None)
    summary = {
        **{k: test[k] for k in ("auroc", "ap", "baselines", "best_baseline", "vs_best_baseline", "recommended")},
        "per_source": test["per_source"],
        "val_auroc": info["val_auroc"],
        "val_auroc_per_epoch": info["val_auroc_per_epoch"],
        "val_baselines": info["val_baselines"],
        "best_epoch": info["best_epoch"],
        "error_rate": test["error_rate"],
        "n_test_images": test["n_test_images"],
        "n_test_rows": test["n_test_rows"],
        "n_pixels": test["n_pixels"],
        "pixels_per_row": cfg.pixels_per_row,
        "train_images": info["train_images"],
        "train_rows": info["train_rows"],
        "train_pixels": info["train_pixels"],
        "val_rows": info["val_rows"],
        "agreement": agreement,
        "quality_weighted": weighted,
        "train_split": ("train+val" if crossfit else "val") if weighted else "train",
        "model": head.kwargs,
        "config": asdict(cfg),
        "fit_seconds": info["fit_seconds"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    line(LABEL, f"test AUROC {summary['auroc']:.4f}, best baseline {summary['best_baseline']}; {summary['seconds']} s")
    return head, summary, test["image_quality"]
