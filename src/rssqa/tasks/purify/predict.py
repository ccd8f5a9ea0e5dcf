"""The purify stage's LightningModule, :class:`PurifyTask`: the prediction step of both passes.

It scores each pair with the filter CLIP (cosine, or z-scored against a reference bank of trusted
images) and, once a threshold is set, captions the pairs it rejects with the CoCa captioner and
decides for each pair: kept, rewritten or dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from rssqa.data.caption_rules import RuleConfig, check_caption, normalize_caption
from rssqa.models.captioner import GenerationConfig, generate_captions
from rssqa.tasks.purify.config import ModelSpec, PurifyConfig, validate
from rssqa.tasks.purify.writers import shard_name


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
