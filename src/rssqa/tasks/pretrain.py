"""CLIP-RS pretraining: an open_clip model trained contrastively, evaluated on remote-sensing tasks.

The LightningModule wraps an open_clip model chosen by name (:mod:`rssqa.models.clip`), trains it with
open_clip's :class:`~open_clip.ClipLoss` gathering features across ranks (with gradients, so the DDP
step equals the single-process step on the same global batch), AdamW with linear warmup and cosine
decay, and validates with zero-shot scene classification and image-text retrieval on held-out sets.
Mixed precision, devices and nodes are the Trainer's business (``bf16-mixed`` on GPUs).

A non-finite loss or gradient stops training with a one-line error naming the last good checkpoint,
which is kept under its own name before a resumed run can overwrite ``last.ckpt``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from rssqa.errors import RSSQAError
from rssqa.evaluate.retrieval import retrieval_recall
from rssqa.evaluate.zeroshot import TEMPLATES, build_classifier, zeroshot_accuracy
from rssqa.models.clip import InputSpec, create_clip, export_clip, input_spec
from rssqa.runs import is_done, read_summary, write_summary

LAST_GOOD = "last-good.ckpt"


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio``.

    Args:
        step: optimiser step (0-based).
        warmup_steps: steps of linear warmup (the first step uses ``1 / warmup_steps``).
        total_steps: steps of the whole run.
        min_ratio: multiplier reached at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's rule: no decay for gains, biases, norms and the temperature."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


class PretrainTask(LightningModule):
    """Contrastive image-text pretraining of an open_clip model.

    Args:
        model_name: a registered CLIP config (``rs-tiny``, ``rs-small``, ``ViT-B-32``, ``ViT-L-14``, ...).
        checkpoint: optional local open_clip checkpoint to start from (RemoteCLIP, GeoRSCLIP, ...).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not on gains, biases, norms, temperature).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_checkpointing: recompute activations in backward (memory for time).
        local_loss: each rank computes the loss of its own rows against all columns (cheaper at scale;
            the step then differs from the single-process step).
        gather_with_grad: gather features across ranks with gradients (exact DDP equivalence).
        templates: zero-shot prompt templates (``{}`` = class name); ``None`` = generic RS prompts.
    """

    def __init__(
        self,
        model_name: str = "rs-tiny",
        checkpoint: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        grad_checkpointing: bool = False,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        templates: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model, _, _, self.tokenizer = create_clip(model_name, checkpoint)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.templates = list(templates or TEMPLATES)
        self.loss_fn: open_clip.ClipLoss | None = None
        self._features: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.eval_metrics: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_checkpoint_step = -1
        self.n_bad = 0
        self._timer = {"start": 0.0, "val": 0.0, "val_start": 0.0, "start_step": 0}

    @property
    def input_spec(self) -> InputSpec:
        """Image size, normalisation and tokenizer of the model (read by the DataModule)."""
        return input_spec(self.model, self.tokenizer)

    # ---------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        self.loss_fn = open_clip.ClipLoss(
            local_loss=self.hparams.local_loss,
            gather_with_grad=self.hparams.gather_with_grad,
            cache_labels=True,
            rank=self.global_rank,
            world_size=self.trainer.world_size if self._trainer is not None else 1,
        )

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image features ``B×D``, text features ``B×D`` and the logit scale (exp of the temperature)."""
        out = self.model(image=image, text=text)
        return out[0], out[1], out[2]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.loss_fn is not None
        image_features, text_features, scale = self(batch["image"], batch["text"])
        loss = self.loss_fn(image_features, text_features, scale)
        self._check_finite(loss, "loss")
        n = batch["image"].shape[0]
        self.n_bad += int(batch.get("n_bad", 0))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", scale, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._check_finite(norm, "gradient norm")
        self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip's clamp: the temperature may not exceed 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, exempt = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (exempt if no_weight_decay(name, param) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": exempt, "weight_decay": 0.0}, {"params": decay, "weight_decay": hp.weight_decay}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, max(1, total // 2))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = torch.tensor(float(not torch.isfinite(value).all()), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank stops together
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item() > 0:
            kept = keep_last_good(self.trainer)
            where = f"last good checkpoint kept as {kept}" if kept else "no checkpoint was saved before it"
            raise RSSQAError(
                f"step {self.global_step}: training {what} is not finite ({value.item()}); {where}"
            )

    # ---------------------------------------------------------------------------------------- timing
    def on_train_start(self) -> None:
        self._timer.update(start=time.perf_counter(), val=0.0, start_step=self.global_step)

    def on_validation_start(self) -> None:
        self._timer["val_start"] = time.perf_counter()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:  # validation inside fit is not training time
            self._timer["val"] += time.perf_counter() - self._timer["val_start"]

    def throughput(self, batch_size: int) -> dict[str, float]:
        """Global samples and samples per second trained in this process's run, validation time excluded."""
        steps = self.global_step - self._timer["start_step"]
        samples = steps * self.trainer.accumulate_grad_batches * batch_size * self.trainer.world_size
        seconds = time.perf_counter() - self._timer["start"] - self._timer["val"]
        return {
            "run_samples": samples,
            "train_seconds": seconds,
            "samples_per_s": samples / max(seconds, 1e-9),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_checkpoint_step = self.global_step

    # ---------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._features = defaultdict(lambda: defaultdict(list))

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        name = self.trainer.datamodule.val_names[dataloader_idx]
        store = self._features[name]
        store["image"].append(F.normalize(self.model.encode_image(batch["image"]).float(), dim=-1))
        if "text" in batch:
            store["text"].append(F.normalize(self.model.encode_text(batch["text"]).float(), dim=-1))
        if "label" in batch:
            store["label"].append(batch["label"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.evaluate_features(
            {k: {f: torch.cat(v) for f, v in s.items()} for k, s in self._features.items()}
        )
        self._features = {}
        # every rank evaluated the whole set, so the values agree: log them once, without a reduction
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, rank_zero_only=True)
        self.eval_metrics, self.last_eval_step = metrics, self.global_step

    def evaluate_features(self, features: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics from gathered evaluation features (names as in the DataModule's ``eval_sets``)."""
        sets, metrics = self.trainer.datamodule.eval_sets, {}
        for name, feats in features.items():
            if len(feats["image"]) != len(sets[name]):
                raise RSSQAError(
                    f"validation set {name!r}: {len(feats['image'])} of {len(sets[name])} images seen on this "
                    "rank; run with trainer.use_distributed_sampler=false"
                )
            if "label" in feats:
                classifier = build_classifier(
                    self.model, self.tokenizer, sets[name].class_names, self.templates
                )
                acc = zeroshot_accuracy(feats["image"], classifier, feats["label"], ks=(1, 3))
                prefix = "zeroshot" if name == "scenes" else f"{name}_zeroshot"
                metrics.update({f"{prefix}_{k}": v for k, v in acc.items()})
            if "text" in feats:
                rec = retrieval_recall(feats["image"], feats["text"])
                metrics.update({f"retrieval_{k}": v for k, v in rec.items()})
        return metrics


def keep_last_good(trainer: Trainer) -> str | None:
    """Copy the newest ``last.ckpt`` to ``last-good.ckpt`` beside it (so a later run cannot overwrite it)."""
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") if callback is not None else ""
    if not last or not os.path.isfile(last):
        return None
    kept = Path(last).with_name(LAST_GOOD)
    if trainer.is_global_zero:
        shutil.copyfile(last, kept)
    return str(kept)


def compare_runs(ours: dict[str, Any], other_dir: str | os.PathLike) -> dict[str, Any]:
    """Zero-shot top-1 and retrieval mean recall of this run against another pretrain run's summary.

    Returns:
        ``{"other": dir, "<metric>": {"ours", "other", "delta"}, "ours_better_on_both": bool}``, or
        ``{"other": dir, "missing": True}`` when that run has not finished.
    """
    other_dir = Path(other_dir)
    if not is_done(other_dir):
        return {"other": str(other_dir), "missing": True}
    other = read_summary(other_dir)
    out: dict[str, Any] = {"other": str(other_dir)}
    for key in ("zeroshot_top1", "retrieval_mean_recall"):
        a, b = ours.get(key), other.get(key)
        out[key] = {"ours": a, "other": b, "delta": None if a is None or b is None else a - b}
    out["ours_better_on_both"] = all(
        (out[k]["delta"] or 0) > 0 for k in ("zeroshot_top1", "retrieval_mean_recall")
    )
    return out


def finish(
    trainer: Trainer,
    task: PretrainTask,
    out_dir: str | os.PathLike,
    export_name: str = "clip_rs",
    compare_with: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """After ``fit``: evaluate the final weights (unless just done), export, and write the summary last.

    Call on every rank (validation is collective); rank 0 writes. ``compare_with`` names another
    pretrain run folder (the raw-corpus ablation) whose figures are set beside ours under ``compare``.
    Returns the summary.
    """
    if trainer.state.status.value == "interrupted":
        raise RSSQAError(f"{out_dir}: training was interrupted; run again to resume from the last checkpoint")
    # throughput first: the final evaluation must not count as training time
    dm = trainer.datamodule
    speed = task.throughput(dm.hparams.batch_size)
    if dm.eval_sets and task.last_eval_step != task.global_step:
        trainer.validate(task, datamodule=dm, verbose=False)
    out_dir = Path(out_dir)
    samples_seen = (
        task.global_step * trainer.accumulate_grad_batches * dm.hparams.batch_size * trainer.world_size
    )
    n_bad = int(trainer.strategy.reduce(torch.tensor(float(task.n_bad), device=task.device), reduce_op="sum"))
    summary = {
        "world_size": trainer.world_size,
        "samples_seen": samples_seen,
        "samples_per_s": speed["samples_per_s"],
        "samples_per_s_per_device": speed["samples_per_s"] / trainer.world_size,
        "train_seconds": speed["train_seconds"],
        "zeroshot_top1": task.eval_metrics.get("zeroshot_top1"),
        "retrieval_mean_recall": task.eval_metrics.get("retrieval_mean_recall"),
        "eval": task.eval_metrics,
        "global_step": task.global_step,
        "epochs": trainer.current_epoch,
        "global_batch_size": dm.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches,
        "model_name": task.hparams.model_name,
        "init_checkpoint": task.hparams.checkpoint,
        "shards": dm.hparams.shards,
        "n_bad_skipped": n_bad,
        "precision": str(trainer.precision),
        "export": str(out_dir / export_name),
    }
    if compare_with is not None:
        summary["compare"] = compare_runs(summary, compare_with)
    if trainer.is_global_zero:
        export_clip(task.model, task.hparams.model_name, out_dir / export_name)
        write_summary(out_dir, summary)
    trainer.strategy.barrier("pretrain-finish")
    return summary
