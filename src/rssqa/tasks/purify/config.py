"""Configuration of the purify stage and its checks, and building its two models by name.

:class:`PurifyConfig` (with :class:`ModelSpec` and :class:`FitConfig`) holds everything that decides the
stage's output; :func:`check_settings` checks the settings alone (no shard, no weights: the stage's dry
run runs it too) and :func:`validate` checks them and the inputs before any work; :func:`build_filter`
and :func:`build_captioner` build the filter CLIP and the CoCa captioner from a name or a local folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rssqa.data.caption_rules import RuleConfig
from rssqa.data.shards import list_shards
from rssqa.errors import RSSQAError
from rssqa.models.captioner import GenerationConfig, create_captioner, load_captioner
from rssqa.models.clip import CONFIG_FILE, clip_config, create_clip, load_clip


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


def check_settings(cfg: PurifyConfig) -> None:
    """Check the settings alone, reading no shard and no weights (the stage's dry run runs this too).

    The captioner's context length comes from its open_clip config (see :func:`captioner_context_length`).
    ``cfg`` may hold the parsed, not yet built, sections of the stage's arguments (same attribute names).

    Raises:
        RSSQAError: inconsistent threshold or round settings, a batch size below 1, ``generation``
            token limits out of order or longer than the captioner's context.
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
    gen = cfg.generation
    for key, value in (("filter.fit.batch_size", cfg.filter.fit.batch_size),
                       ("captioner.fit.batch_size", cfg.captioner.fit.batch_size),
                       ("generation.batch_size", gen.batch_size)):  # fmt: skip
        if value < 1:
            raise RSSQAError(f"purify.{key}: must be >= 1, got {value}")
    if not 2 <= gen.min_tokens < gen.max_tokens:
        raise RSSQAError(f"generation: need 2 <= min_tokens < max_tokens, got {gen.min_tokens}, {gen.max_tokens}")
    limit = captioner_context_length(cfg.captioner.name, cfg.captioner.checkpoint)
    if limit is not None and gen.max_tokens > limit:
        name = cfg.captioner.name
        raise RSSQAError(f"generation.max_tokens: {gen.max_tokens} is more than the captioner {name}'s context length {limit}")


def validate(cfg: PurifyConfig) -> tuple[list[str], list[str]]:
    """Check the configuration and inputs before any work; return (input shards, trusted shards).

    Raises:
        RSSQAError: what :func:`check_settings` raises; no trusted tier, an empty input shard list, a
            checkpoint that does not exist or does not match its config.
    """
    check_settings(cfg)
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


# open_clip's text context length where a model config leaves it out
_DEFAULT_CONTEXT_LENGTH = 77


def captioner_context_length(name: str, checkpoint: str | None = None) -> int | None:
    """The most tokens the captioner's text tower and decoder take, from its open_clip model config.

    The config is that of the local open_clip folder given as ``checkpoint`` (or as ``name``), else the
    one registered as ``name``. None when a local folder's config is unreadable (building the captioner
    reports that, in its own words).

    Raises:
        RSSQAError: ``name`` is no registered config and no local folder.
    """
    folder = next((Path(p) for p in (checkpoint, name) if p is not None and (Path(p) / CONFIG_FILE).is_file()), None)
    if folder is None:
        model_cfg = clip_config(name)
    else:
        try:
            model_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not isinstance(model_cfg, dict):
        return None
    towers = [model_cfg[k] for k in ("text_cfg", "multimodal_cfg") if isinstance(model_cfg.get(k), dict)]
    lengths = [c.get("context_length", _DEFAULT_CONTEXT_LENGTH) for c in towers] or [_DEFAULT_CONTEXT_LENGTH]
    return min(int(n) for n in lengths) if all(isinstance(n, int) for n in lengths) else None


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


def _jsonable_config(cfg: PurifyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))
