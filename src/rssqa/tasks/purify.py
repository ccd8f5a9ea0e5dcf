"""Stage purify: a captioner-filter loop over WebDataset shards (in the manner of BLIP's CapFilt).

For every image-text pair of the coarse tier:

1. cheap rules (:mod:`rssqa.data.caption_rules`) reject captions no model needs to read;
2. a filter CLIP, fitted on the trusted tier (or loaded from a local checkpoint), scores the pair;
3. a pair that breaks a rule or scores below the threshold is handed to a CoCa captioner (fitted on
   the trusted tier, or loaded); its caption is kept when it passes the rules and the filter scores it
   at or above the threshold (``rewritten``), otherwise the sample is ``dropped``.

The threshold is a fixed score, or set from the scores of all input captions by a first prediction
pass (score pass, global threshold, write pass): a target keep fraction, or Otsu's cut between the
low-scoring and the high-scoring group. Rounds repeat the loop; between rounds the filter and the
captioner may be refitted on the trusted tier plus the pairs the round kept (bootstrapping).

Scoring and captioning run as Lightning prediction: each DDP rank owns the input shards ``i`` with
``i % world_size == rank`` and writes, per input shard, an output shard and then a done-marker (both
atomically). A run killed at any point and started again skips the shards that have a marker and
ends with exactly the output of an uninterrupted run: batches never span shards (so every score sees
the same batch), decoding is greedy, and every model fit reseeds and is exported before use.

Run-folder layout (``out_dir``)::

    shards/shard-000000.tar ... + sizes.json     purified pairs of the last round (one per input shard)
    done/shard-000000.json ...                   per input shard: counts + one record per sample
    rounds/<r>/{filter,captioner}/               models of round r (open_clip local-dir format)
    rounds/<r>/scores/, threshold.json           score pass (keep-fraction or Otsu threshold)
    rounds/<r>/shards, rounds/<r>/done           outputs of earlier rounds (bootstrapping)
    examples.csv, logs/, wandb/, summary.json    (summary last)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rssqa.data.caption_rules import RuleConfig, RuleCounter, check_caption, normalize_caption
from rssqa.data.shards import (
    IMAGE_EXTS,
    decode_sample,
    list_shards,
    shard_pipeline,
    tar_samples,
    write_shard,
    write_sizes,
)
from rssqa.errors import BadSample, RSSQAError
from rssqa.models.captioner import (
    CaptionVocab,
    GenerationConfig,
    create_captioner,
    export_captioner,
    generate_captions,
    is_captioner,
    load_captioner,
    vocab_size,
)
from rssqa.models.clip import CONFIG_FILE, create_clip, export_clip, load_clip
from rssqa.progress import ProgressLog
from rssqa.runs import atomic_write_bytes, atomic_write_json, is_done, write_summary
from rssqa.tracking import make_loggers, publish

log = logging.getLogger(__name__)

DECISIONS = ("kept", "rewritten", "dropped")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ============================================================================================ configuration
@dataclass
class FitConfig:
    """Fitting a filter CLIP or a CoCa captioner on image-text pairs.

    Attributes:
        steps: optimizer steps (per process; each process draws its own batches).
        batch_size: pairs per step and process.
        lr: peak learning rate (AdamW), reached after ``warmup`` of the steps, then cosine decay.
        weight_decay: AdamW weight decay (not on gains, biases and the logit scale).
        warmup: share of the steps spent warming up.
        shuffle: sample shuffle buffer.
        num_workers: DataLoader workers decoding shards.
        augment: random 90-degree rotations and flips (overhead images have no "up").
        phrase_dropout: share of captions replaced by a random subset of their phrases (see
            :func:`sub_caption`), so that the model must tie each phrase, not just the easiest one, to the
            image, and scores partial captions (a scene alone, objects alone) as scraped corpora have them.
        caption_loss_weight, clip_loss_weight: CoCa loss weights (the filter uses the contrastive loss only).
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    shuffle: int = 1000
    num_workers: int = 1
    augment: bool = True
    phrase_dropout: float = 0.5
    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0


@dataclass
class ModelSpec:
    """A filter or captioner: a registered open_clip name, and optionally local weights.

    Attributes:
        name: registered config (``rs-tiny``, ``ViT-L-14``, ``rs-coca-tiny``, ``coca_ViT-L-14``, ...).
        checkpoint: open_clip local dir or state-dict file; None means fit on the trusted tier.
        fit: how to fit it when there is no checkpoint (and when bootstrapping).
    """

    name: str
    checkpoint: str | None = None
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class PurifyConfig:
    """Everything that decides the output of the purify stage.

    Attributes:
        input: the shards to purify (dir, glob, brace pattern, or a list).
        trusted: the trusted tier (dir, glob, brace pattern, or a list); fits the models, and its first
            ``reference_size`` images are the reference of the ``zscore`` score.
        out_dir: the run folder.
        filter: the filter CLIP.
        captioner: the CoCa captioner.
        threshold: a fixed score threshold, or ``"otsu"``: a score pass, then the threshold that best
            splits all scores of rule-passing captions into two groups (Otsu's method: no target share
            needed; noisy captions form the low group). Exclusive with ``keep_fraction``.
        keep_fraction: target share of rule-passing input captions kept as they are; a score pass turns
            it into a global threshold.
        rewrite_quantile: None, or the bar a rewritten caption must clear: this quantile of the scores of
            the captions kept as they are (0.5: a rewrite must fit its image at least as well as the
            median kept caption). A weak captioner writes fluent captions of the wrong kind of place, and
            such a caption clears the keep threshold easily; the bar keeps those out (they are dropped).
            Needs a score pass (``threshold: otsu`` or ``keep_fraction``).
        score: ``"cosine"`` (image-text cosine similarity) or ``"zscore"`` (the cosine standardised
            against the caption's cosines with a fixed bank of trusted reference images: how much
            better the caption fits its image than images in general, free of caption-style bias).
        reference_size: images in the reference bank.
        rounds: captioner-filter rounds; more than one needs ``bootstrap``.
        bootstrap: refit filter and captioner between rounds on trusted + kept pairs (from the
            previous round's weights, ``bootstrap_steps`` steps each).
        bootstrap_steps: steps of each bootstrap refit.
        rules: the caption rules.
        generation: decoding of the captioner.
        batch_size: pairs per prediction batch (batches never span shards).
        num_workers: DataLoader workers decoding shards during prediction.
        examples: rows of the examples table (before, after, score) per decision.
        wandb: log to Weights & Biases (offline unless WANDB_MODE says otherwise); CSV is always written.
        threads: torch threads per process (None: leave torch's default). On a shared CPU, 1 thread per
            process avoids the thread oversubscription that slows every process down many times over.
        seed: seeds every fit.
    """

    input: str | list[str]
    trusted: str | list[str]
    out_dir: str
    filter: ModelSpec = field(default_factory=lambda: ModelSpec("rs-tiny"))
    captioner: ModelSpec = field(default_factory=lambda: ModelSpec("rs-coca-tiny"))
    threshold: float | str | None = None
    keep_fraction: float | None = None
    rewrite_quantile: float | None = None
    score: str = "cosine"
    reference_size: int = 256
    rounds: int = 1
    bootstrap: bool = False
    bootstrap_steps: int = 100
    rules: RuleConfig = field(default_factory=RuleConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 64
    num_workers: int = 1
    examples: int = 8
    wandb: bool = True
    threads: int | None = None
    seed: int = 0


def validate(cfg: PurifyConfig) -> tuple[list[str], list[str]]:
    """Check the configuration and inputs before any work; return (input shards, trusted shards).

    Raises:
        RSSQAError: no trusted tier, an empty input shard list, a checkpoint that does not exist or
            does not match its config, inconsistent threshold or round settings.
    """
    if (cfg.threshold is None) == (cfg.keep_fraction is None):
        raise RSSQAError("purify: set exactly one of threshold (a fixed score or 'otsu') and keep_fraction")
    if isinstance(cfg.threshold, str) and cfg.threshold != "otsu":
        try:
            cfg.threshold = float(cfg.threshold)
        except ValueError:
            raise RSSQAError(f"purify.threshold: {cfg.threshold!r}; give a number or 'otsu'") from None
    if cfg.keep_fraction is not None and not 0 < cfg.keep_fraction <= 1:
        raise RSSQAError(f"purify.keep_fraction: must be in (0, 1], got {cfg.keep_fraction}")
    if cfg.rewrite_quantile is not None:
        if not 0 <= cfg.rewrite_quantile <= 1:
            raise RSSQAError(f"purify.rewrite_quantile: must be in [0, 1], got {cfg.rewrite_quantile}")
        if cfg.threshold != "otsu" and cfg.keep_fraction is None:
            raise RSSQAError("purify.rewrite_quantile: needs a score pass; set threshold: otsu or keep_fraction")
    if cfg.score not in ("cosine", "zscore"):
        raise RSSQAError(f"purify.score: {cfg.score!r}; choose cosine or zscore")
    if cfg.rounds < 1 or (cfg.rounds > 1 and not cfg.bootstrap):
        raise RSSQAError(f"purify.rounds: {cfg.rounds}; more than one round needs bootstrap: true (else rounds repeat)")
    if cfg.batch_size < 1:
        raise RSSQAError(f"purify.batch_size: must be >= 1, got {cfg.batch_size}")
    try:
        trusted = list_shards(cfg.trusted)
    except RSSQAError:
        raise RSSQAError(f"purify.trusted: {cfg.trusted}: no trusted tier found (no shards)") from None
    try:
        inputs = list_shards(cfg.input)
    except RSSQAError:
        raise RSSQAError(f"purify.input: {cfg.input}: empty shard list") from None
    missing = [u for u in inputs + trusted if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise RSSQAError(f"{missing[0]}: shard not found ({len(missing)} missing)")
    # building the models reads every checkpoint: a missing or mismatching one fails here, not later
    build_filter(cfg.filter.name, cfg.filter.checkpoint)
    build_captioner(cfg.captioner.name, cfg.captioner.checkpoint)
    return inputs, trusted


def build_filter(name: str, checkpoint: str | None = None) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """The filter CLIP by name (a local open_clip dir is accepted as checkpoint or as name)."""
    if checkpoint is None and (Path(name) / CONFIG_FILE).is_file():
        return load_clip(name)
    return create_clip(name, checkpoint)


def build_captioner(name: str, checkpoint: str | None = None) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """The CoCa captioner by name (a local open_clip dir is accepted as checkpoint or as name)."""
    if checkpoint is None and (Path(name) / CONFIG_FILE).is_file():
        return load_captioner(name)
    return create_captioner(name, checkpoint)


# ============================================================================================ fitting
class PairFit(L.LightningModule):
    """Fit an open_clip CLIP (contrastive loss) or CoCa (contrastive + captioning loss) on pairs.

    Batches are ``(images B×3×S×S float32, tokens B×T int64)``. The contrastive loss gathers the
    features of all DDP ranks (open_clip's ``ClipLoss`` with ``local_loss``), as open_clip trains.
    """

    def __init__(self, model: torch.nn.Module, cfg: FitConfig, name: str = "filter"):
        super().__init__()
        self.model, self.cfg, self.name = model, cfg, name
        self.loss: torch.nn.Module | None = None

    def setup(self, stage: str) -> None:
        kw = {"local_loss": True, "gather_with_grad": True, "rank": self.global_rank, "world_size": self.trainer.world_size}
        if is_captioner(self.model):
            self.loss = open_clip.CoCaLoss(self.cfg.caption_loss_weight, self.cfg.clip_loss_weight, **kw)
        else:
            self.loss = open_clip.ClipLoss(**kw)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        out = self.model(images, tokens)
        if is_captioner(self.model):
            clip_loss, caption_loss = self.loss(
                out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
            )
            loss = clip_loss + caption_loss
            self.log(f"{self.name}/caption_loss", caption_loss, prog_bar=True)
        else:
            feats = out if isinstance(out, dict) else dict(zip(("image_features", "text_features", "logit_scale"), out, strict=False))
            loss = self.loss(feats["image_features"], feats["text_features"], feats["logit_scale"])
        self.log(f"{self.name}/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # as open_clip: the temperature may not exceed 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "logit_scale" in n or "embedding" in n else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        warm = max(1, int(self.cfg.warmup * self.cfg.steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.cfg.steps - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


_PHRASE_BREAK = re.compile(r",\s*|\s+(?:with|and|showing|including)\s+|;\s*")


def sub_caption(text: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of the phrases of ``text``, in their order, joined by commas.

    Phrases are what commas, semicolons and "with" / "and" / "showing" / "including" separate:
    ``"An aerial image of a town with 12 houses and some trees."`` may become ``"12 houses"`` or
    ``"An aerial image of a town, some trees"``. A caption of one phrase comes back unchanged.
    """
    phrases = [p.strip(" .") for p in _PHRASE_BREAK.split(text.strip()) if p.strip(" .")]
    if len(phrases) < 2:
        return text
    keep = rng.random(len(phrases)) < 0.5
    if not keep.any():
        keep[rng.integers(len(phrases))] = True
    return ", ".join(p for p, k in zip(phrases, keep, strict=True) if k)


class _TrainMap:
    """Worker-side map of a decoded sample to ``(image tensor, tokens)``: random dihedral symmetry of the
    image, phrase dropout of the caption."""

    def __init__(self, preprocess: Callable, tokenizer: Callable, augment: bool, phrase_dropout: float):
        self.preprocess, self.tokenizer, self.augment, self.phrase_dropout = preprocess, tokenizer, augment, phrase_dropout
        self.rng: np.random.Generator | None = None

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rng is None:  # one stream per worker, seeded from the DataLoader's (seeded) base seed
            info = get_worker_info()
            self.rng = np.random.default_rng(info.seed if info is not None else torch.initial_seed())
        image, text = sample["image"], normalize_caption(sample["txt"])
        if self.augment:
            k = int(self.rng.integers(8))
            image = np.ascontiguousarray(np.rot90(image, k % 4)[:, ::-1] if k >= 4 else np.rot90(image, k % 4))
        if self.phrase_dropout and self.rng.random() < self.phrase_dropout:
            text = sub_caption(text, self.rng)
        return self.preprocess(Image.fromarray(image)), self.tokenizer([text])[0]


def pair_loader(urls: Sequence[str], preprocess: Callable, tokenizer: Callable, cfg: FitConfig, seed: int,
                phrase_dropout: float | None = None) -> DataLoader:  # fmt: skip
    """An endless, reproducible stream of training batches drawn from ``urls`` (resampled shards).

    ``phrase_dropout`` overrides the config's (the captioner learns from whole captions only).
    """
    drop = cfg.phrase_dropout if phrase_dropout is None else phrase_dropout
    pipeline = shard_pipeline(
        list(urls), resampled=True, shuffle=cfg.shuffle, seed=seed, map_fn=_TrainMap(preprocess, tokenizer, cfg.augment, drop)
    )
    return DataLoader(pipeline, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True)


# ============================================================================================ prediction data
@dataclass
class SamplePrep:
    """Worker-side preparation of one raw sample for the filter (and the captioner).

    Attributes:
        filter_transform: the filter's evaluation preprocessing (PIL -> ``3×S×S``).
        captioner_transform: the captioner's, or None when it equals the filter's.
        tokenizer: the filter's tokenizer.
        rules: the caption rules.
    """

    filter_transform: Callable
    captioner_transform: Callable | None
    tokenizer: Callable
    rules: RuleConfig

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw tar members -> a prepared sample; raises :class:`BadSample`."""
        sample = decode_sample(raw, decode_images=True)
        ext = next(e for e in IMAGE_EXTS if e in raw)
        pil = Image.fromarray(sample["image"])
        clean = normalize_caption(sample["txt"])
        return {
            "key": sample["__key__"],
            "ext": ext,
            "image": raw[ext],
            "caption": sample["txt"],
            "clean": clean,
            "rule": check_caption(clean, self.rules),
            "meta": sample["json"],
            "pixels": self.filter_transform(pil),
            "cap_pixels": None if self.captioner_transform is None else self.captioner_transform(pil),
        }


class ShardBatches(IterableDataset):
    """Shard-aligned batches of the shards given to this rank, split over DataLoader workers.

    Every batch holds samples of one shard only, in shard order, so a sample meets the same batch
    however many shards were done before (resume) and whichever worker reads it. Bad samples travel
    with the batch they occurred in (``bad``: list of (key, reason)). The last batch of a shard has
    ``last=True`` (a shard with no good sample still yields one, empty, batch).

    Args:
        shards: ``(input index, url)`` pairs this rank must process.
        prep: the worker-side preparation.
        batch_size: good samples per batch.
    """

    def __init__(self, shards: Sequence[tuple[int, str]], prep: SamplePrep, batch_size: int):
        super().__init__()
        self.shards, self.prep, self.batch_size = list(shards), prep, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for index, url in mine:
            yield from self._shard(index, url)

    def _shard(self, index: int, url: str) -> Iterator[dict[str, Any]]:
        good: list[dict[str, Any]] = []
        bad: list[tuple[str, str]] = []
        for raw in tar_samples([url]):
            try:
                good.append(self.prep(raw))
            except BadSample as e:
                log.warning("skipped sample %r in %s: %s", e.key, e.source, e.reason)
                bad.append((e.key, _ADDRESS.sub("", e.reason)))  # markers must not depend on memory layout
            if len(good) == self.batch_size:
                yield self._collate(index, url, good, bad, last=False)
                good, bad = [], []
        yield self._collate(index, url, good, bad, last=True)

    def _collate(self, index: int, url: str, good: list[dict], bad: list[tuple[str, str]], last: bool) -> dict[str, Any]:
        batch: dict[str, Any] = {"shard": index, "url": url, "last": last, "bad": bad}
        for k in ("key", "ext", "image", "caption", "clean", "rule", "meta"):
            batch[k] = [s[k] for s in good]
        batch["pixels"] = torch.stack([s["pixels"] for s in good]) if good else torch.zeros(0)
        batch["cap_pixels"] = (
            torch.stack([s["cap_pixels"] for s in good]) if good and good[0]["cap_pixels"] is not None else None
        )
        return batch


class PendingShards(L.LightningDataModule):
    """Prediction data of one pass: this rank's input shards that have no marker in ``folder`` yet.

    Input shard ``i`` belongs to rank ``i % world_size`` (a fixed owner, so ranks never race on a
    shard); the list is made when the pass starts, after the processes are launched.
    """

    def __init__(self, inputs: Sequence[str], folder: Path, prep: SamplePrep, batch_size: int, num_workers: int):
        super().__init__()
        self.inputs, self.folder, self.prep = list(inputs), folder, prep
        self.batch_size, self.num_workers = batch_size, num_workers

    def pending(self, rank: int, world_size: int) -> list[tuple[int, str]]:
        """``(index, url)`` of the shards of ``rank`` without a marker."""
        return [
            (i, u) for i, u in enumerate(self.inputs)
            if i % world_size == rank and not (self.folder / f"{shard_name(i)}.json").is_file()
        ]  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        todo = self.pending(self.trainer.global_rank, self.trainer.world_size)
        workers = min(self.num_workers, len(todo))
        return DataLoader(ShardBatches(todo, self.prep, self.batch_size), batch_size=None, num_workers=workers)


# ============================================================================================ prediction
class PurifyTask(L.LightningModule):
    """The purify stage's LightningModule: scores pairs with the filter, captions the rejected ones.

    Its arguments are the stage configuration (see :class:`PurifyConfig` for each one); the stage's
    LightningCLI builds it from ``conf/<profile>/purify.yaml`` and :class:`Purify` runs the loop,
    handing it each round's models with :meth:`use`. Construction validates the configuration and the
    inputs, so a bad one fails before any work.

    ``predict_step`` returns, per batch: ``score`` (the original caption's score, one float per good
    sample) and, when a threshold is set, ``decision``, ``generated`` (caption or None), ``gen_score``,
    ``gen_rule``; plus ``compute_s``, the seconds spent in model compute.
    """

    def __init__(
        self,
        input: str | list[str],
        trusted: str | list[str],
        out_dir: str,
        filter: ModelSpec | None = None,
        captioner: ModelSpec | None = None,
        threshold: float | str | None = None,
        keep_fraction: float | None = None,
        rewrite_quantile: float | None = None,
        score: str = "cosine",
        reference_size: int = 256,
        rounds: int = 1,
        bootstrap: bool = False,
        bootstrap_steps: int = 100,
        rules: RuleConfig | None = None,
        generation: GenerationConfig | None = None,
        batch_size: int = 64,
        num_workers: int = 1,
        examples: int = 8,
        wandb: bool = True,
        threads: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        kw = {k: v for k, v in locals().items() if k not in ("self", "__class__") and v is not None}
        self.cfg = PurifyConfig(**kw)
        self.inputs, self.trusted = validate(self.cfg)
        self.filter: torch.nn.Module | None = None
        self.captioner: torch.nn.Module | None = None
        self.tokenizer: Callable | None = None
        self.captioner_tokenizer: Callable | None = None
        self.threshold: float | None = None
        self.rewrite_threshold: float | None = None
        self.known_scores: Path | None = None  # the score pass's folder: the write pass reuses its scores
        self._score_cache: dict[int, dict[str, float]] = {}
        self.register_buffer("reference", torch.zeros(0), persistent=False)

    def use(
        self,
        filter_model: torch.nn.Module,
        tokenizer: Callable,
        captioner: torch.nn.Module,
        captioner_tokenizer: Callable | None,
        reference: torch.Tensor | None,
        threshold: float | None,
        known_scores: Path | None = None,
        rewrite_threshold: float | None = None,
    ) -> PurifyTask:
        """Set the models of a pass; ``threshold`` None makes it a score pass (no captioning).

        ``known_scores``: the folder of this round's score pass; the write pass then reads each original
        caption's score from it and runs the filter only on the pairs it rejects (their rewrites need
        scoring), instead of scoring every pair a second time.
        """
        self.filter, self.captioner = filter_model.eval(), captioner.eval()
        self.tokenizer, self.captioner_tokenizer, self.threshold = tokenizer, captioner_tokenizer, threshold
        self.reference = reference if reference is not None else torch.zeros(0)
        self.known_scores, self._score_cache = known_scores, {}
        self.rewrite_threshold = threshold if rewrite_threshold is None or threshold is None else max(threshold, rewrite_threshold)
        return self

    def _scores_of(self, shard: int, keys: Sequence[str]) -> list[float] | None:
        """The score pass's scores of ``keys`` of input shard ``shard``, or None without a score pass."""
        if self.known_scores is None:
            return None
        if shard not in self._score_cache:
            data = json.loads((self.known_scores / f"{shard_name(shard)}.json").read_text())
            self._score_cache = {shard: dict(zip(data["keys"], data["scores"], strict=True))}
        table = self._score_cache[shard]
        return [table[k] for k in keys]

    def scores(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Score ``B`` pairs from L2-normalised ``B×D`` image and text features."""
        cos = (image_feats * text_feats).sum(-1)
        if self.cfg.score == "cosine":
            return cos
        ref = text_feats @ self.reference.T  # B×R: each caption against the reference images
        return (cos - ref.mean(-1)) / ref.std(-1).clamp_min(1e-6)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised ``B×D`` filter features of captions."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.filter.encode_text(tokens).float(), dim=-1)

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        # only the pixel tensors go to the device; Lightning's generic transfer would walk every byte of
        # the encoded images (bytes are sequences), which cost more than the models on a CPU
        out = dict(batch)
        for k in ("pixels", "cap_pixels"):
            if isinstance(out[k], torch.Tensor):
                out[k] = out[k].to(device, non_blocking=True)
        return out

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """Score a shard-aligned batch; caption and decide when a threshold is set (see the class doc)."""
        t0 = time.perf_counter()
        n = len(batch["key"])
        out: dict[str, Any] = {"score": [], "decision": [], "generated": [], "gen_score": [], "gen_rule": []}
        known = self._scores_of(batch["shard"], batch["key"]) if n and self.threshold is not None else None
        if known is not None:
            out["score"] = known
            out.update(self._decide(batch, None, known))
        elif n:
            img = F.normalize(self.filter.encode_image(batch["pixels"]).float(), dim=-1)
            score = self.scores(img, self.encode_texts(batch["clean"]))
            out["score"] = score.tolist()
            if self.threshold is not None:
                out.update(self._decide(batch, img, out["score"]))
        out["compute_s"] = time.perf_counter() - t0
        return out

    def _decide(self, batch: dict[str, Any], img: torch.Tensor | None, score: list[float]) -> dict[str, list]:
        """Keep, rewrite or drop each pair; ``img`` holds the filter's image features, or None to compute
        them for the rejected pairs only."""
        n = len(batch["key"])
        reject = [batch["rule"][i] is not None or score[i] < self.threshold for i in range(n)]
        idx = [i for i in range(n) if reject[i]]
        generated: list[str | None] = [None] * n
        gen_score: list[float | None] = [None] * n
        gen_rule: list[str | None] = [None] * n
        decision = ["kept"] * n
        if idx:
            pixels = batch["cap_pixels"] if batch["cap_pixels"] is not None else batch["pixels"]
            texts = [normalize_caption(t) for t in generate_captions(self.captioner, pixels[idx], self.cfg.generation, self.captioner_tokenizer)]
            feats = img[idx] if img is not None else F.normalize(self.filter.encode_image(batch["pixels"][idx]).float(), dim=-1)
            g_score = self.scores(feats, self.encode_texts(texts))
            for j, i in enumerate(idx):
                generated[i], gen_score[i] = texts[j], float(g_score[j])
                gen_rule[i] = check_caption(texts[j], self.cfg.rules)
                ok = gen_rule[i] is None and gen_score[i] >= self.rewrite_threshold
                decision[i] = "rewritten" if ok else "dropped"
        return {"decision": decision, "generated": generated, "gen_score": gen_score, "gen_rule": gen_rule}


# ============================================================================================ writers
def shard_name(index: int) -> str:
    """Output name of input shard ``index``."""
    return f"shard-{index:06d}"


class _ShardBuffer(BasePredictionWriter):
    """Collects a shard's batches (possibly interleaved with other shards' from other workers)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.buffers: dict[int, list[tuple[dict, dict]]] = {}
        self.samples = 0
        self.compute_s = 0.0
        self.wall_s = 0.0
        self.rank = 0
        self._t0 = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        # timed from here: a pass's wall time leaves out process launch and setup, not data loading
        self._t0 = time.perf_counter()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.wall_s = time.perf_counter() - self._t0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.rank = trainer.global_rank
        self.buffers.setdefault(batch["shard"], []).append((batch, prediction))
        self.samples += len(batch["key"]) + len(batch["bad"])
        self.compute_s += prediction["compute_s"]
        if batch["last"]:
            self.finish(batch["shard"], batch["url"], self.buffers.pop(batch["shard"]))

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        raise NotImplementedError


class ScoreWriter(_ShardBuffer):
    """Score pass: writes ``scores/shard-<i>.json`` (keys, rule flags, scores) per input shard."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        keys, rules, scores = [], [], []
        for batch, pred in parts:
            keys += batch["key"]
            rules += batch["rule"]
            scores += pred["score"]
        atomic_write_json(self.folder / f"{shard_name(index)}.json", {"url": url, "keys": keys, "rules": rules, "scores": scores})


class PurifyWriter(_ShardBuffer):
    """Write pass: the purified output shard, then the done-marker with counts and per-sample records.

    Output samples keep the image bytes as they were, ``txt`` = the chosen caption (so that pretraining
    reads purified shards like raw ones) and ``json`` = the source meta plus ``purify``: original
    caption, chosen caption, scores, decision, rule, round.
    """

    def __init__(self, shard_dir: Path, done_dir: Path, round_index: int, threshold: float):
        super().__init__()
        self.shard_dir, self.done_dir, self.round, self.threshold = shard_dir, done_dir, round_index, threshold

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        samples, records, bad = [], [], []
        rules, gen_rules = RuleCounter(), RuleCounter()
        counts: Counter[str] = Counter()
        compute_s = 0.0
        for batch, pred in parts:
            compute_s += pred["compute_s"]
            bad += [{"key": k, "reason": r} for k, r in batch["bad"]]
            for i, key in enumerate(batch["key"]):
                decision = pred["decision"][i]
                counts[decision] += 1
                rules.add(batch["rule"][i])
                if pred["generated"][i] is not None:
                    gen_rules.add(pred["gen_rule"][i])
                chosen = {"kept": batch["clean"][i], "rewritten": pred["generated"][i]}.get(decision)
                info = {
                    "decision": decision,
                    "original_caption": batch["caption"][i],
                    "caption": chosen,
                    "rule": batch["rule"][i],
                    "score": pred["score"][i],
                    "generated": pred["generated"][i],
                    "gen_score": pred["gen_score"][i],
                    "gen_rule": pred["gen_rule"][i],
                    "round": self.round,
                    "threshold": self.threshold,
                }
                records.append({"key": key, **info, "meta": batch["meta"][i]})
                if chosen is not None:
                    meta = {**batch["meta"][i], "purify": info}
                    samples.append({"__key__": key, batch["ext"][i]: batch["image"][i], "txt": chosen, "json": meta})
        name = f"{shard_name(index)}.tar"
        write_shard(self.shard_dir / name, samples)
        n_in = len(records) + len(bad)
        marker = {
            "url": url,
            "index": index,
            "output": name,
            "rank": self.rank,
            "n_in": n_in,
            "n_kept": counts["kept"],
            "n_rewritten": counts["rewritten"],
            "n_dropped": counts["dropped"],
            "n_bad": len(bad),
            "rules": rules.as_dict(),
            "generated_rules": gen_rules.as_dict(),
            "compute_s": compute_s,
            "bad": bad,
            "records": records,
        }
        atomic_write_json(self.done_dir / f"{shard_name(index)}.json", marker)


# ============================================================================================ the loop
@dataclass
class RoundDirs:
    """Folders of one round."""

    root: Path
    shards: Path
    done: Path

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def filter(self) -> Path:
        return self.root / "filter"

    @property
    def captioner(self) -> Path:
        return self.root / "captioner"


def round_dirs(out_dir: Path, r: int, rounds: int) -> RoundDirs:
    """Round ``r``'s folders: the last round writes the stage's ``shards/`` and ``done/``."""
    root = out_dir / "rounds" / str(r)
    if r == rounds - 1:
        return RoundDirs(root, out_dir / "shards", out_dir / "done")
    return RoundDirs(root, root / "shards", root / "done")


def read_markers(done_dir: Path, n_shards: int) -> list[dict[str, Any]]:
    """The done-markers of all ``n_shards`` input shards, in input order (fails when one is missing)."""
    markers = []
    for i in range(n_shards):
        path = done_dir / f"{shard_name(i)}.json"
        if not path.is_file():
            raise RSSQAError(f"{path}: missing done-marker after the write pass (a rank failed?)")
        markers.append(json.loads(path.read_text()))
    return markers


def account(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of done-markers and check ``n_in = n_kept + n_rewritten + n_dropped + n_bad``.

    Raises:
        RSSQAError: when the identity does not hold for a shard or in total.
    """
    keys = ("n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad")
    total = dict.fromkeys(keys, 0)
    rules, gen_rules = RuleCounter(), RuleCounter()
    for m in markers:
        if m["n_in"] != m["n_kept"] + m["n_rewritten"] + m["n_dropped"] + m["n_bad"] or m["n_in"] != len(m["records"]) + len(m["bad"]):
            raise RSSQAError(f"{m['url']}: accounting mismatch in its done-marker ({ {k: m[k] for k in keys} })")
        for k in keys:
            total[k] += m[k]
        rules.update(m["rules"])
        gen_rules.update(m["generated_rules"])
    if total["n_in"] != total["n_kept"] + total["n_rewritten"] + total["n_dropped"] + total["n_bad"]:
        raise RSSQAError(f"purify: accounting mismatch: {total}")
    return {**total, "rules": rules.as_dict(), "generated_rules": gen_rules.as_dict()}


def read_scores(score_dir: Path, n_shards: int) -> np.ndarray:
    """The scores of all rule-passing input captions (float64); captions a rule rejected do not take part
    (they go to the captioner whatever their score)."""
    scores = []
    for i in range(n_shards):
        data = json.loads((score_dir / f"{shard_name(i)}.json").read_text())
        scores += [s for s, r in zip(data["scores"], data["rules"], strict=True) if r is None]
    if not scores:
        raise RSSQAError(f"{score_dir}: no caption passed the rules; cannot set a global threshold")
    return np.asarray(scores, np.float64)


def keep_fraction_threshold(scores: np.ndarray, keep_fraction: float) -> float:
    """The threshold at which ``keep_fraction`` of ``scores`` score at or above."""
    return float(np.quantile(scores, 1.0 - keep_fraction, method="lower"))


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a ``bins``-bin histogram of ``scores`` that maximises the variance
    between the two groups it makes (scores at or above it form the upper group)."""
    hist, edges = np.histogram(scores, bins)
    centres, w = (edges[:-1] + edges[1:]) / 2, hist / hist.sum()
    w0, m0 = np.cumsum(w), np.cumsum(w * centres)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(edges[1:][int(np.argmax(between))])


class Purify:
    """Runs the purify stage: fits, score and write passes of every round, accounting, summary.

    Args:
        task: the configured (and validated) task; it does the predicting.
        trainer: the prediction Trainer (accelerator, devices, nodes, strategy as the user set them).
        trainer_kwargs: the settings the fit Trainers share with it (accelerator, devices, num_nodes,
            strategy, precision).
    """

    def __init__(self, task: PurifyTask, trainer: L.Trainer, trainer_kwargs: dict[str, Any] | None = None):
        self.task, self.cfg, self.trainer = task, task.cfg, trainer
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.out = Path(self.cfg.out_dir)
        self.inputs, self.trusted = task.inputs, task.trusted
        self.loggers: list[Logger] = []
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def rank(self) -> int:
        return self.trainer.global_rank

    def barrier(self, name: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.trainer.strategy.barrier(name)

    def _loggers(self) -> list[Logger]:
        if not self.loggers:
            self.loggers = make_loggers(self.out, "purify", wandb=self.cfg.wandb)
        return self.loggers

    def _fit_trainer(self, steps: int, label: str) -> L.Trainer:
        return L.Trainer(
            **self.trainer_kwargs,
            max_steps=steps,
            logger=self._loggers(),
            callbacks=[ProgressLog(f"purify/{label}")],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            log_every_n_steps=max(1, min(50, steps // 10)),
            use_distributed_sampler=False,
        )

    # ------------------------------------------------------------------------------------------ models
    def models(self, r: int, dirs: RoundDirs, prev: RoundDirs | None) -> None:
        """Make round ``r``'s filter and captioner exist in ``dirs`` (fit, bootstrap-refit, or copy)."""
        for role in ("filter", "captioner"):
            target = getattr(dirs, role)
            if (target / CONFIG_FILE).is_file():
                continue
            spec: ModelSpec = getattr(self.cfg, role)
            build = build_filter if role == "filter" else build_captioner
            L.seed_everything(self.cfg.seed * 1000 + 10 * r + (role == "captioner"), workers=True, verbose=False)
            if prev is None:
                model, pre_train, _, tok = build(spec.name, spec.checkpoint)
                fit_urls = None if spec.checkpoint is not None else self.trusted
                steps = spec.fit.steps
                if tok is None:  # a fresh compact-vocabulary captioner: its vocabulary comes from the trusted tier
                    tok = CaptionVocab.build(self.trusted_captions(), vocab_size(model), model.context_length)
            else:  # bootstrapping: refit last round's model on trusted + kept pairs
                model, pre_train, _, tok = build(str(getattr(prev, role)))
                fit_urls = self.trusted + list_shards(prev.shards)
                steps = self.cfg.bootstrap_steps
            t0 = time.perf_counter()
            if fit_urls is not None:
                fit = PairFit(model, replace(spec.fit, steps=steps), name=f"round{r}/{role}")  # schedule over `steps`
                # the captioner learns to write whole captions: no phrase dropout for it
                drop = None if role == "filter" else 0.0
                loader = pair_loader(fit_urls, pre_train, tok, spec.fit, seed=self.cfg.seed + 7919 * r, phrase_dropout=drop)
                self._fit_trainer(steps, f"{role} fit").fit(fit, train_dataloaders=loader)
            if self.rank == 0:
                export = export_clip if role == "filter" else export_captioner
                export(model, spec.name if prev is None else _model_name(getattr(prev, role)), target, tok)
            self.barrier(f"export-{role}-{r}")
            self.timing[f"round{r}/{role}_fit_s"] = round(time.perf_counter() - t0, 2)

    def trusted_captions(self) -> Iterator[str]:
        """The normalised captions of the trusted tier, in shard order."""
        for url in self.trusted:
            for raw in tar_samples([url]):
                if "txt" in raw:
                    try:
                        yield normalize_caption(raw["txt"].decode("utf-8"))
                    except UnicodeDecodeError:
                        continue

    def predictor(self, dirs: RoundDirs, threshold: float | None, known_scores: Path | None = None,
                  rewrite_threshold: float | None = None) -> tuple[PurifyTask, SamplePrep]:  # fmt: skip
        """The task set up with the round's models (loaded from its folders) and the worker-side preparation."""
        fmodel, _, f_val, tok = load_clip(dirs.filter)
        cmodel, _, c_val, cap_tok = load_captioner(dirs.captioner)
        same = _preprocess_key(fmodel) == _preprocess_key(cmodel)
        reference = self.reference_bank(fmodel, f_val) if self.cfg.score == "zscore" else None
        task = self.task.use(fmodel, tok, cmodel, cap_tok, reference, threshold, known_scores, rewrite_threshold)
        return task, SamplePrep(f_val, None if same else c_val, tok, self.cfg.rules)

    @torch.no_grad()
    def reference_bank(self, model: torch.nn.Module, preprocess: Callable) -> torch.Tensor:
        """L2-normalised features of the first ``reference_size`` trusted images (same on every rank)."""
        images = []
        for sample in shard_pipeline(self.trusted, split_by_node=False, split_by_worker=False):
            images.append(preprocess(Image.fromarray(sample["image"])))
            if len(images) == self.cfg.reference_size:
                break
        model.eval()
        feats = [F.normalize(model.encode_image(torch.stack(images[i : i + 64])).float(), dim=-1) for i in range(0, len(images), 64)]
        return torch.cat(feats)

    # ------------------------------------------------------------------------------------------ passes
    def predict_pass(self, predictor: PurifyTask, prep: SamplePrep, writer: _ShardBuffer, folder: Path) -> dict[str, float]:
        """Run one prediction pass over this rank's pending shards; return samples, wall and compute seconds.

        Every rank runs the pass, also one with nothing left to do, so that collective steps match.
        """
        folder.mkdir(parents=True, exist_ok=True)
        data = PendingShards(self.inputs, folder, prep, self.cfg.batch_size, self.cfg.num_workers)
        label = "purify/score pass" if isinstance(writer, ScoreWriter) else "purify/write pass"
        keep = [c for c in self.trainer.callbacks if not isinstance(c, _ShardBuffer | ProgressLog)]
        self.trainer.callbacks = [*keep, writer, ProgressLog(label)]
        self.trainer.predict(predictor, datamodule=data, return_predictions=False)
        self.barrier(f"pass-{folder}")
        return {"samples": writer.samples, "wall_s": writer.wall_s, "compute_s": writer.compute_s}

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Run all rounds, write outputs, sizes, examples and (last) the summary; return the summary.

        Rank 0 reads the score files and done-markers and broadcasts what the others need (the
        threshold, the round statistics), so that many ranks do not all read every marker.
        """
        cfg, t_start = self.cfg, time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        rounds, prev, speed = [], None, {"samples": 0.0, "wall_s": 0.0, "compute_s": 0.0}
        markers: list[dict[str, Any]] = []
        for r in range(cfg.rounds):
            dirs = round_dirs(self.out, r, cfg.rounds)
            self.models(r, dirs, prev)
            threshold, known, rewrite = cfg.threshold, None, None
            if cfg.keep_fraction is not None or threshold == "otsu":
                pred, prep = self.predictor(dirs, None)
                scored = self.predict_pass(pred, prep, ScoreWriter(dirs.scores), dirs.scores)
                self._add(speed, {**scored, "samples": 0.0})  # samples count once, in the write pass
                if self.rank == 0:
                    scores = read_scores(dirs.scores, len(self.inputs))
                    if cfg.keep_fraction is not None:
                        threshold = keep_fraction_threshold(scores, cfg.keep_fraction)
                    else:
                        threshold = otsu_threshold(scores)
                    if cfg.rewrite_quantile is not None:
                        rewrite = float(np.quantile(scores[scores >= threshold], cfg.rewrite_quantile, method="lower"))
                    record = {"threshold": threshold, "method": "otsu" if cfg.keep_fraction is None else "keep_fraction",
                              "keep_fraction": cfg.keep_fraction, "kept_share": float(np.mean(scores >= threshold)),
                              "rewrite_quantile": cfg.rewrite_quantile, "rewrite_threshold": rewrite}  # fmt: skip
                    atomic_write_json(dirs.root / "threshold.json", record)
                threshold, rewrite = self.trainer.strategy.broadcast((threshold, rewrite), src=0)
                known = dirs.scores
            pred, prep = self.predictor(dirs, threshold, known, rewrite)
            writer = PurifyWriter(dirs.shards, dirs.done, r, threshold)
            self._add(speed, self.predict_pass(pred, prep, writer, dirs.done))
            stats = None
            if self.rank == 0:
                markers = read_markers(dirs.done, len(self.inputs))
                stats = {"round": r, "threshold": threshold, "rewrite_threshold": pred.rewrite_threshold, **account(markers)}
                write_sizes(dirs.shards, {m["output"]: m["n_kept"] + m["n_rewritten"] for m in markers})
                self._log_round(stats)
            rounds.append(self.trainer.strategy.broadcast(stats, src=0))
            self.barrier(f"round-{r}")  # the next round's fits read this round's shards
            prev = dirs
        return self._finish(rounds, markers, speed, time.perf_counter() - t_start)

    @staticmethod
    def _add(total: dict[str, float], part: dict[str, float]) -> None:
        for k in total:
            total[k] += part[k]

    def _log_round(self, stats: dict[str, Any]) -> None:
        flat = {f"purify/{k}": v for k, v in stats.items() if isinstance(v, int | float) and k != "round"}
        flat.update({f"purify/rule_{k}": v for k, v in stats["rules"]["counts"].items()})
        for lg in self._loggers():
            lg.log_metrics(flat, step=stats["round"])

    def _finish(self, rounds: list[dict], markers: list[dict], speed: dict[str, float], wall: float) -> dict[str, Any]:
        """Rank 0 writes examples, logs and the summary (last); every rank returns the summary."""
        from rssqa.purify_eval import noise_metrics  # evaluation reads meta["truth"]; the method never does

        samples, wall_s, share = self._gather_speed(speed)  # a collective: every rank takes part
        summary = None
        if self.rank == 0:
            final = rounds[-1]
            summary = {k: final[k] for k in ("n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad")}
            # speed of this invocation's prediction passes, from loop start to end on each rank (not process
            # launch, model loading or fits); a resumed run counts what it processed
            summary["samples_per_s"] = round(samples / wall_s, 2) if wall_s > 0 else None
            summary["model_compute_share"] = share
            summary["per_rank"] = self.per_rank  # prediction passes of this invocation
            summary.update({k: final[k] for k in ("threshold", "rewrite_threshold", "rules", "generated_rules")})
            summary["rounds"] = rounds
            summary["world_size"] = self.trainer.world_size
            summary["seconds"] = round(wall, 2)
            summary["timing"] = self.timing
            summary["config"] = _jsonable_config(self.cfg)
            summary.update(noise_metrics(markers))
            rows = example_rows(markers, self.cfg.examples)
            write_examples_csv(self.out / "examples.csv", rows)
            for lg in self._loggers():
                lg.log_metrics({f"purify/{k}": v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
                lg.finalize("success")
            examples = (EXAMPLE_COLUMNS, [[r[c] for c in EXAMPLE_COLUMNS] for r in rows])
            publish(self._loggers(), "purify", {k: v for k, v in summary.items() if k != "config"}, tables={"examples": examples})
            write_summary(self.out, summary)
        return self.trainer.strategy.broadcast(summary, src=0)

    def _gather_speed(self, speed: dict[str, float]) -> tuple[float, float, float | None]:
        """Samples of all ranks, the slowest rank's wall seconds, and the mean share of wall time in model compute."""
        t = torch.tensor([speed["samples"], speed["wall_s"], speed["compute_s"]], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = self.trainer.strategy.all_gather(t).reshape(-1, 3)
        t = t.reshape(-1, 3)
        share = (t[:, 2] / t[:, 1].clamp_min(1e-9)).mean() if float(t[:, 1].min()) > 0 else None
        self.per_rank = [{"samples": int(r[0]), "wall_s": round(float(r[1]), 2), "compute_s": round(float(r[2]), 2)} for r in t]
        return float(t[:, 0].sum()), float(t[:, 1].max()), None if share is None else round(float(share), 4)


def _model_name(folder: Path) -> str:
    return json.loads((folder / CONFIG_FILE).read_text()).get("model_name", folder.name)


def _preprocess_key(model: torch.nn.Module) -> tuple:
    v = model.visual
    return (tuple(np.atleast_1d(v.image_size)), tuple(v.image_mean or ()), tuple(v.image_std or ()))


def _jsonable_config(cfg: PurifyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# ============================================================================================ examples
EXAMPLE_COLUMNS = ["key", "decision", "rule", "before", "after", "score", "after_score"]


def example_rows(markers: list[dict[str, Any]], per_decision: int) -> list[dict[str, Any]]:
    """Up to ``per_decision`` examples of each decision, in input order (before, after, scores)."""
    rows, seen = [], Counter()
    for m in markers:
        for rec in m["records"]:
            d = rec["decision"]
            if seen[d] >= per_decision:
                continue
            seen[d] += 1
            after = rec["caption"] if d != "dropped" else rec["generated"]
            after_score = rec["score"] if d == "kept" else rec["gen_score"]
            rows.append({"key": rec["key"], "decision": d, "rule": rec["rule"] or "", "before": rec["original_caption"],
                         "after": after or "", "score": round(rec["score"], 4),
                         "after_score": None if after_score is None else round(after_score, 4)})  # fmt: skip
    return sorted(rows, key=lambda r: (DECISIONS.index(r["decision"]), r["key"]))


def write_examples_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the examples table as CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXAMPLE_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def already_done(out_dir: str | os.PathLike) -> bool:
    """True when the stage finished in ``out_dir`` (its summary exists)."""
    return is_done(out_dir)
