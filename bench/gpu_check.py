"""One-GPU check of the paper-profile models: throughput, FLOPs utilisation and memory, in minutes.

Four parts, each through the project's own code, each in its own ``try`` (a failure is recorded in the
JSON and the next part runs):

a. ``pretrain``: CLIP-RS training (``rssqa.tasks.pretrain.PretrainTask`` + ``CorpusDataModule`` under a
   Lightning Trainer) with the paper's model, batch, precision and gradient checkpointing
   (``conf/paper/pretrain.yaml``), random init, on a few hundred synthetic pairs written as WebDataset
   shards and read again and again. Samples/s from the median step interval after warm-up; model FLOPs
   utilisation = samples/s x training FLOPs per sample (``bench.pretrain.train_flops_per_sample``, with
   the config's checkpointing, so the recomputed forward counts) / the GPU's dense bf16 peak.
b. ``purify``: the filter's score pass and the captioner's pass (``rssqa.tasks.purify.PurifyTask``
   predicting over shard-aligned batches, as the stage does) with the paper's filter, CoCa, batch,
   precision and generation settings (``conf/paper/purify.yaml``). In the caption pass every pair is
   rejected (threshold above any cosine), so every pair is captioned and its caption scored.
c. ``sqed``: each method of ``conf/paper/sqed.yaml`` at its size, trained (``SegmentationTask`` under a
   Trainer set as ``train_method`` sets it, on synthetic patches of the paper's size) and labelling
   (``predict_step``: ``Segmenter.describe`` + per-image OA, as ``label_method`` runs it). The stage's
   Trainers are deterministic; where the GPU refuses that, the error is recorded and the numbers are
   measured without it.
d. ``determinism``: the smoke profile's deterministic steps on this device (a pretrain fit, a sqed fit
   and labelling, the RS-SQA loss), each ok or its error, and per sqed method the ops that have no
   deterministic implementation here: what ``accelerator: auto`` meets on a GPU.

Each part stops at its time budget (``--seconds``, model building included); the JSON is rewritten
after every part, so a run cut short keeps what it measured.

``--tiny`` runs the same code with the smoke profile's models and sizes and a few steps (a CPU check).

Usage: ``python -m bench.gpu_check --out runs/bench/gpu_check.json [--device cuda|cpu] [--tiny] [--seconds 70]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import write_report

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets; the first pattern
# found in torch.cuda.get_device_name() wins, so the more specific names come first.
GPU_PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (HBM3)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)
PART_NAMES = ("pretrain", "purify", "sqed", "determinism")
START = time.perf_counter()


def say(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def shm_gib() -> float | None:
    """Size of /dev/shm in GiB (None where there is none)."""
    try:
        return round(shutil.disk_usage("/dev/shm").total / 2**30, 2)
    except OSError:
        return None


def gpu_peak_tflops(name: str) -> float | None:
    for pattern, peak in GPU_PEAK_TFLOPS:
        if pattern.lower() in name.lower():
            return peak
    return None


# ------------------------------------------------------------------------------------------ settings
def _conf(profile: str, stage: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "conf" / profile / f"{stage}.yaml").read_text())


def settings(tiny: bool) -> dict[str, dict[str, Any]]:
    """What each part runs: the paper profile, or (tiny) the smoke profile's models and sizes with the
    paper's code-path settings (precision, checkpointing, decoding), small batches and few steps."""
    pre, pur, sq = _conf("paper", "pretrain"), _conf("paper", "purify"), _conf("paper", "sqed")["sqed"]
    m, d = pre["model"], pre["data"]
    pretrain = {
        "model_name": m["model_name"],
        "task": {k: m[k] for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio",
                                   "grad_checkpointing", "local_loss", "gather_with_grad") if k in m},  # fmt: skip
        "batch_size": d["batch_size"],
        "shuffle": d["shuffle"],
        "num_workers": d["num_workers"],
        "precision": pre["trainer"]["precision"],
        "gradient_clip_val": pre["trainer"].get("gradient_clip_val"),
        "warmup": 5,
        "max_steps": 100_000,
    }
    u = pur["model"]
    purify = {
        "filter": u["filter"]["name"],
        "captioner": u["captioner"]["name"],
        "generation": dict(u["generation"]),
        "batch_size": u["batch_size"],
        "num_workers": u["num_workers"],
        "precision": pur["trainer"].get("precision", "32-true"),
        "score": u.get("score", "cosine"),
        "warmup": 1,
        "max_batches": 10_000,
    }
    patch = sq["sources"][0].get("options", {}).get("patch_size", 512)
    sqed = {
        "methods": list(sq["methods"]),
        "size": sq["size"],
        "patch_size": patch,
        "num_classes": 6,  # Potsdam / Vaihingen
        "train_batch": sq["train"]["batch_size"],
        "label_batch": sq["label"]["batch_size"],
        "grid": sq["label"]["grid"],
        "hist_bins": sq["label"]["hist_bins"],
        # the sqed Trainers set no precision: what the paper config asks for is fp32
        "precision": sq["train"].get("precision", "32-true"),
        "warmup": 2,
        "max_steps": 10_000,
    }
    if tiny:
        sp, su, ss = _conf("smoke", "pretrain"), _conf("smoke", "purify"), _conf("smoke", "sqed")["sqed"]
        pretrain.update(model_name=sp["model"]["model_name"], batch_size=16, shuffle=64, num_workers=0,
                        warmup=1, max_steps=4)  # fmt: skip
        gen = {**purify["generation"], "max_tokens": su["model"]["generation"]["max_tokens"], "batch_size": 16}
        purify.update(filter=su["model"]["filter"]["name"], captioner=su["model"]["captioner"]["name"],
                      generation=gen, batch_size=16, num_workers=1, max_batches=3)  # fmt: skip
        size = _conf("smoke", "world")["world"]["sources"]["image_size"]
        sqed.update(size=ss["size"], patch_size=size, train_batch=4, label_batch=8, warmup=1, max_steps=3)
    return {"pretrain": pretrain, "purify": purify, "sqed": sqed}


# ------------------------------------------------------------------------------------------ timing
class BudgetSpent(Exception):
    """Raised by :class:`Clock` to end a prediction pass at its deadline."""


def _clock_class():
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        """Per-batch wall times (device synchronised): ``intervals`` from one batch's end to the next
        (data wait included), ``compute`` from a batch's start to its end, ``items`` per batch (``unit``,
        or the length of a purify batch's keys). A batch without items (the closing batch of a purify
        shard) adds its time to the batch before it. Ends a fit (``should_stop``) or a prediction pass
        (:class:`BudgetSpent`) once the deadline has passed and ``min_batches`` are done, or at
        ``max_batches``."""

        def __init__(self, label: str, deadline: float, min_batches: int, max_batches: int, sync: bool, unit: int):
            self.label, self.deadline, self.sync, self.unit = label, deadline, sync, unit
            self.min_batches, self.max_batches = min_batches, max_batches
            self.intervals: list[float] = []
            self.compute: list[float] = []
            self.items: list[int] = []
            self._last = self._t0 = self._said = 0.0

        def _now(self) -> float:
            if self.sync:
                torch.cuda.synchronize()
            return time.perf_counter()

        def _start(self) -> None:
            self._last = self._said = self._now()

        def _batch_start(self) -> None:
            self._t0 = self._now()

        def _batch_end(self, batch: Any) -> bool:
            now = self._now()
            keys = batch.get("key") if isinstance(batch, dict) else None
            n_items = len(keys) if isinstance(keys, list) else self.unit
            if n_items or not self.items:
                self.compute.append(now - self._t0)
                self.intervals.append(now - self._last)
                self.items.append(n_items)
            else:
                self.compute[-1] += now - self._t0
                self.intervals[-1] += now - self._last
            self._last = now
            n = len(self.intervals)
            if now - self._said > 10:
                self._said = now
                rate = sum(self.items[-10:]) / sum(self.intervals[-10:])
                say(f"  {self.label}: {n} batches, {rate:.1f} items/s (last 10)")
            return n >= self.max_batches or (n >= self.min_batches and time.perf_counter() > self.deadline)

        def on_train_start(self, trainer, pl_module) -> None:
            self._start()

        def on_predict_start(self, trainer, pl_module) -> None:
            self._start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._batch_start()

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self._batch_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._batch_end(batch):
                trainer.should_stop = True

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            if self._batch_end(batch):
                raise BudgetSpent

        def rates(self, warmup: int) -> dict[str, Any]:
            """Items per second after the first ``warmup`` batches (all of them when there are too few):
            ``per_s`` = median items / median interval, ``per_s_mean`` = all items / all time,
            ``per_s_compute`` = median items / median compute time (no data wait)."""
            w = warmup if len(self.intervals) > warmup else 0
            iv, cp, it = self.intervals[w:], self.compute[w:], self.items[w:]
            if not iv:
                return {"batches": 0}
            return {
                "batches": len(self.intervals),
                "measured_batches": len(iv),
                "measured_items": sum(it),
                "per_s": round(statistics.median(it) / statistics.median(iv), 3),
                "per_s_mean": round(sum(it) / sum(iv), 3),
                "per_s_compute": round(statistics.median(it) / statistics.median(cp), 3),
                "batch_s_median": round(statistics.median(iv), 5),
                "first_batch_s": round(self.intervals[0], 3),
            }

    return Clock


def run_predict(trainer, *args, **kw) -> None:
    """``trainer.predict`` that treats :class:`BudgetSpent` as the normal end of a pass."""
    with contextlib.suppress(BudgetSpent):
        trainer.predict(*args, **kw)


def _trainer(ctx: dict[str, Any], callbacks: list, **kw):
    import lightning as L

    return L.Trainer(
        accelerator=ctx["accelerator"],
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **kw,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _is_determinism_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "deterministic" in str(e)


# ------------------------------------------------------------------------------------------ data
def make_shards(folder: Path, n: int, size: int, per_shard: int) -> Path:
    """``n`` synthetic pairs of the embedded world at ``size`` px in shards of ``per_shard`` (as bench/pretrain.py)."""
    from rssqa.data.shards import ShardWriter
    from rssqa.world import sample_pairs

    with ShardWriter(folder, maxcount=per_shard) as writer:
        for i, pair in enumerate(sample_pairs(n, size, seed=11)):
            writer.write({"__key__": f"g{i:06d}", "jpg": pair["image"], "txt": pair["txt"], "json": pair["json"]})
    return folder


# ------------------------------------------------------------------------------------------ a. pretrain
def part_pretrain(cfg: dict[str, Any], ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    import lightning as L

    from bench.pretrain import train_flops_per_sample
    from rssqa.data.corpus import CorpusDataModule
    from rssqa.tasks.pretrain import PretrainTask

    name, b, ckpt = cfg["model_name"], cfg["batch_size"], bool(cfg["task"].get("grad_checkpointing", False))
    flops = train_flops_per_sample(name, grad_checkpointing=ckpt)
    flops_model = flops if not ckpt else train_flops_per_sample(name, grad_checkpointing=False)
    say(f"pretrain: {name}, batch {b}, {cfg['precision']}, grad checkpointing {ckpt}, "
        f"{flops / 1e9:.1f} GFLOP per training sample")  # fmt: skip
    t0 = time.perf_counter()
    L.seed_everything(0, verbose=False)
    task = PretrainTask(model_name=name, checkpoint=None, **cfg["task"])  # random init: nothing to download
    build_s = time.perf_counter() - t0
    dm = CorpusDataModule(
        shards=str(ctx["shards"]),
        batch_size=b,
        samples_per_epoch=b * cfg["max_steps"],  # one long epoch over the resampled shards
        resampled=True,
        shuffle=cfg["shuffle"],
        num_workers=min(cfg["num_workers"], ctx["max_workers"]),
        eval_scenes=0,
        eval_pairs=0,
    )
    clock = _clock_class()("pretrain", deadline, cfg["warmup"] + 3, cfg["max_steps"], ctx["sync"], b)
    trainer = _trainer(
        ctx, [clock], precision=cfg["precision"], max_steps=cfg["max_steps"], num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=False, gradient_clip_val=cfg["gradient_clip_val"], log_every_n_steps=50,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    r = clock.rates(cfg["warmup"])
    loss = trainer.callback_metrics.get("train/loss")
    out: dict[str, Any] = {
        "model": name,
        "init": "random",
        "batch_size": b,
        "precision": str(trainer.precision),
        "grad_checkpointing": ckpt,
        "num_workers": dm.hparams.num_workers,
        "pairs_in_shards": ctx["n_pairs"],
        "image_size": ctx["image_size"],
        "build_s": round(build_s, 2),
        "steps": trainer.global_step,
        "warmup_steps": cfg["warmup"],
        "samples_per_s": r.get("per_s"),
        "samples_per_s_mean": r.get("per_s_mean"),
        "samples_per_s_compute_only": r.get("per_s_compute"),
        "step_s_median": r.get("batch_s_median"),
        "first_step_s": r.get("first_batch_s"),
        "stage_samples_per_s": round(task.throughput(b)["samples_per_s"], 3),  # the stage's own measure (warm-up included)
        "last_loss": None if loss is None else round(float(loss), 4),
        "train_gflops_per_sample": round(flops / 1e9, 2),
        "train_gflops_per_sample_without_recompute": round(flops_model / 1e9, 2),
    }
    rate = r.get("per_s")
    if rate:
        out["achieved_tflops"] = round(rate * flops / 1e12, 2)
        peak = ctx["peak_tflops"]
        out["mfu"] = round(rate * flops / (peak * 1e12), 4) if peak else "unknown"
        out["mfu_without_recompute"] = round(rate * flops_model / (peak * 1e12), 4) if peak else "unknown"
    return out


# ------------------------------------------------------------------------------------------ b. purify
def part_purify(cfg: dict[str, Any], ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    from rssqa.data.caption_rules import RuleConfig
    from rssqa.data.shards import iter_shard, list_shards
    from rssqa.models.captioner import CaptionVocab, GenerationConfig, vocab_size
    from rssqa.models.clip import input_spec
    from rssqa.tasks.purify import (
        ModelSpec,
        PendingShards,
        PurifyTask,
        PurifyWriter,
        SamplePrep,
        ScoreWriter,
        build_captioner,
        build_filter,
    )

    work = ctx["work"] / "purify"
    urls = list_shards(str(ctx["shards"]))
    gen = GenerationConfig(**cfg["generation"])
    b, workers = cfg["batch_size"], min(cfg["num_workers"], ctx["max_workers"])
    say(f"purify: filter {cfg['filter']}, captioner {cfg['captioner']} ({gen.method}, {gen.num_beams} beams, "
        f"<= {gen.max_tokens} tokens), batch {b}, {cfg['precision']}, {workers} workers")  # fmt: skip
    # configured as the stage configures it (the task checks its settings and builds the named models
    # once to check them); the passes use the models handed to it by use(), as the stage's loop does
    t0 = time.perf_counter()
    task = PurifyTask(
        input=urls, trusted=urls, out_dir=str(work), filter=ModelSpec(cfg["filter"]), captioner=ModelSpec(cfg["captioner"]),
        keep_fraction=0.7, score=cfg["score"], generation=gen, batch_size=b, num_workers=workers, wandb=False,
    )  # fmt: skip
    task_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(0)
    fmodel, _, f_val, tok = build_filter(cfg["filter"])
    cmodel, _, c_val, cap_tok = build_captioner(cfg["captioner"])
    if cap_tok is None:  # a fresh compact-vocabulary captioner: its vocabulary from the captions, as the stage does
        captions = [s["txt"] for u in urls for s in iter_shard(u, decode=False)]
        cap_tok = CaptionVocab.build(captions, vocab_size(cmodel), cmodel.context_length)
    build_s = time.perf_counter() - t0
    fs, cs = input_spec(fmodel, tok), input_spec(cmodel, cap_tok)
    same = (fs.image_size, fs.mean, fs.std) == (cs.image_size, cs.mean, cs.std)
    prep = SamplePrep(f_val, None if same else c_val, tok, RuleConfig())
    # shard-aligned batches: the same few shards, listed many times, make as many batches as the budget takes
    repeats = max(1, -(-cfg["max_batches"] * b // ctx["n_pairs"])) if ctx["tiny"] else 64
    inputs = urls * repeats
    Clock = _clock_class()
    out: dict[str, Any] = {
        "filter": cfg["filter"],
        "captioner": cfg["captioner"],
        "init": "random",
        "generation": {k: getattr(gen, k) for k in ("method", "num_beams", "max_tokens", "min_tokens", "batch_size")},
        "batch_size": b,
        "num_workers": workers,
        "image_size": fs.image_size,
        "task_init_s": round(task_s, 2),
        "build_s": round(build_s, 2),
    }
    half = time.perf_counter() + (deadline - time.perf_counter()) * 0.4  # the caption pass is the slow one

    def one_pass(label: str, threshold: float | None, until: float) -> dict[str, Any]:
        task.use(fmodel, tok, cmodel, cap_tok, None, threshold)
        folder = work / label
        folder.mkdir(parents=True, exist_ok=True)
        writer = ScoreWriter(folder) if threshold is None else PurifyWriter(work / "shards", folder, 0, threshold)
        clock = Clock(f"purify {label}", until, cfg["warmup"] + 2, cfg["max_batches"], ctx["sync"], b)
        trainer = _trainer(ctx, [writer, clock], precision=cfg["precision"])
        data = PendingShards(inputs, folder, prep, b, workers)
        run_predict(trainer, task, datamodule=data, return_predictions=False)
        r = clock.rates(cfg["warmup"])
        res = {
            "pairs_per_s": r.get("per_s"),
            "pairs_per_s_mean": r.get("per_s_mean"),
            "pairs_per_s_compute_only": r.get("per_s_compute"),
            "batch_s_median": r.get("batch_s_median"),
            "first_batch_s": r.get("first_batch_s"),
            "batches": r.get("batches"),
            "pairs": writer.samples,
            "model_compute_share": round(writer.compute_s / max(sum(clock.intervals), 1e-9), 3),
        }
        markers = sorted(folder.glob("*.json")) if threshold is not None else []
        if markers:  # the first caption written (random weights: words, not sense)
            res["example_caption"] = json.loads(markers[0].read_text())["records"][0]["generated"]
        return res

    out["score_pass"] = one_pass("score", None, half)
    say(f"purify: score pass {out['score_pass']['pairs_per_s']} pairs/s")
    out["caption_pass"] = one_pass("caption", 2.0, deadline)  # cosine <= 1: every pair captioned
    say(f"purify: caption pass {out['caption_pass']['pairs_per_s']} pairs/s")
    out["score_pairs_per_s"] = out["score_pass"]["pairs_per_s"]
    out["caption_pairs_per_s"] = out["caption_pass"]["pairs_per_s"]
    return out


# ------------------------------------------------------------------------------------------ c. sqed
def _patches(n: int, size: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.rand(n, 3, size, size, generator=g),
        "mask": torch.randint(0, classes, (n, size, size), generator=g),
    }
    if torch.cuda.is_available():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _repeat_loader(batch: dict[str, torch.Tensor], times: int):
    from torch.utils.data import DataLoader, IterableDataset

    class Repeat(IterableDataset):
        def __len__(self) -> int:
            return times

        def __iter__(self):
            for _ in range(times):
                yield batch

    return DataLoader(Repeat(), batch_size=None)


def _sqed_task(method: str, cfg: dict[str, Any]):
    from rssqa.models.segmenters import resolve_method
    from rssqa.tasks.sqed import SegmentationTask

    torch.manual_seed(0)
    spec = resolve_method(method, cfg["size"])
    task = SegmentationTask(
        spec.as_dict(), cfg["num_classes"], [f"c{i}" for i in range(cfg["num_classes"])], grid=cfg["grid"],
        hist_bins=cfg["hist_bins"], log_prefix=f"gpu_check/{method}/",
    )  # fmt: skip
    return spec, task


def sqed_method(method: str, cfg: dict[str, Any], ctx: dict[str, Any], deadline: float,
                train_batch: dict, label_batch: dict) -> dict[str, Any]:  # fmt: skip
    Clock = _clock_class()
    out: dict[str, Any] = {}
    if ctx["cuda"]:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    spec, task = _sqed_task(method, cfg)
    out["encoder"] = spec.encoder_name
    out["params_m"] = round(sum(p.numel() for p in task.parameters()) / 1e6, 2)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    train_until = time.perf_counter() + (deadline - time.perf_counter()) * 0.65
    # training, with the flags train_method gives its Trainer (deterministic=True) first
    for deterministic in ("warn", False):
        clock = Clock(f"sqed {method} train", train_until, cfg["warmup"] + 2, cfg["max_steps"], ctx["sync"], cfg["train_batch"])
        trainer = _trainer(ctx, [clock], max_steps=cfg["max_steps"], max_epochs=1, deterministic=deterministic,
                           precision=cfg["precision"], log_every_n_steps=10, num_sanity_val_steps=0)  # fmt: skip
        try:
            trainer.fit(task, train_dataloaders=_repeat_loader(train_batch, cfg["max_steps"]))
        except RuntimeError as e:
            if not (deterministic and _is_determinism_error(e)):
                raise
            out["train_deterministic_error"] = _first_line(e)
            say(f"  sqed {method}: training with deterministic=True (as the stage) fails: {_first_line(e)}")
            spec, task = _sqed_task(method, cfg)
            continue
        out["train_deterministic"] = deterministic
        r = clock.rates(cfg["warmup"])
        out.update(train_images_per_s=r.get("per_s"), train_images_per_s_compute_only=r.get("per_s_compute"),
                   train_step_s_median=r.get("batch_s_median"), train_steps=trainer.global_step)  # fmt: skip
        break
    task.eval()
    for deterministic in (True, False):  # labelling: label_method's Trainer is deterministic too
        clock = Clock(f"sqed {method} label", deadline, cfg["warmup"] + 2, cfg["max_steps"], ctx["sync"], cfg["label_batch"])
        trainer = _trainer(ctx, [clock], deterministic=deterministic, precision=cfg["precision"])
        try:
            run_predict(trainer, task, dataloaders=_repeat_loader(label_batch, cfg["max_steps"]), return_predictions=False)
        except RuntimeError as e:
            if not (deterministic and _is_determinism_error(e)):
                raise
            out["label_deterministic_error"] = _first_line(e)
            continue
        out["label_deterministic"] = deterministic
        r = clock.rates(cfg["warmup"])
        out.update(label_images_per_s=r.get("per_s"), label_batch_s_median=r.get("batch_s_median"),
                   label_batches=r.get("batches"))  # fmt: skip
        break
    if ctx["cuda"]:
        out["gpu_mem_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def part_sqed(cfg: dict[str, Any], ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    size, classes = cfg["patch_size"], cfg["num_classes"]
    say(f"sqed: {len(cfg['methods'])} methods at size {cfg['size']}, {size} px patches, train batch "
        f"{cfg['train_batch']}, label batch {cfg['label_batch']}, {cfg['precision']}")  # fmt: skip
    train_batch = _patches(cfg["train_batch"], size, classes, 0)
    label_batch = _patches(cfg["label_batch"], size, classes, 1)
    out: dict[str, Any] = {
        "size": cfg["size"], "patch_size": size, "num_classes": classes, "train_batch": cfg["train_batch"],
        "label_batch": cfg["label_batch"], "precision": cfg["precision"], "init": "random", "methods": {},
    }  # fmt: skip
    methods = cfg["methods"]
    for i, method in enumerate(methods):
        left = len(methods) - i
        until = time.perf_counter() + max(1.0, (deadline - time.perf_counter()) / left)
        try:
            res = sqed_method(method, cfg, ctx, until, train_batch, label_batch)
        except Exception as e:  # one method's failure must not lose the others
            res = {"error": _first_line(e), "traceback": traceback.format_exc()[-3000:]}
        out["methods"][method] = res
        say(f"  sqed {method}: train {res.get('train_images_per_s')} img/s, label {res.get('label_images_per_s')} img/s"
            + (f", {res['error']}" if "error" in res else ""))  # fmt: skip
        _free(ctx)
    ok = [r for r in out["methods"].values() if r.get("train_images_per_s")]
    out["methods_ok"] = len(ok)
    refused = [m for m, r in out["methods"].items() if "train_deterministic_error" in r]
    out["deterministic_training_refused"] = refused
    peaks = [r["gpu_mem_peak_gib"] for r in out["methods"].values() if "gpu_mem_peak_gib" in r]
    if peaks:
        out["gpu_mem_peak_gib"] = max(peaks)
    return out


# ------------------------------------------------------------------------------------------ d. determinism
def part_determinism(cfg: dict[str, Any], ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    """The smoke profile's deterministic steps on this device: ok, or the error that stops them."""
    import lightning as L

    from rssqa.data.corpus import CorpusDataModule
    from rssqa.tasks.pretrain import PretrainTask

    smoke = _conf("smoke", "pretrain")
    out: dict[str, Any] = {"device": ctx["device_name"]}

    def probe(name: str, fn: Callable[[], None]) -> None:
        if time.perf_counter() > deadline:
            out[name] = {"ok": None, "skipped": "out of time"}
            return
        try:
            fn()
            out[name] = {"ok": True}
        except Exception as e:  # the answer is the error itself
            out[name] = {"ok": False, "error": _first_line(e)}
        finally:
            torch.use_deterministic_algorithms(False)
        say(f"determinism: {name}: {'ok' if out[name]['ok'] else out[name]['error']}")

    def pretrain() -> None:
        L.seed_everything(0, verbose=False)
        task = PretrainTask(model_name=smoke["model"]["model_name"])
        dm = CorpusDataModule(shards=str(ctx["shards"]), batch_size=8, samples_per_epoch=16, shuffle=16,
                              eval_scenes=0, eval_pairs=0)  # fmt: skip
        _trainer(ctx, [], max_steps=2, deterministic=True, precision=smoke["trainer"]["precision"],
                 limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1).fit(task, datamodule=dm)  # fmt: skip

    tiny = {**cfg, "size": "tiny", "patch_size": 64}

    def sqed_fit() -> None:
        _, task = _sqed_task("unet", tiny)
        trainer = _trainer(ctx, [], max_steps=2, max_epochs=1, deterministic=True, log_every_n_steps=1)
        trainer.fit(task, train_dataloaders=_repeat_loader(_patches(4, 64, cfg["num_classes"], 0), 2))

    def sqed_label() -> None:
        _, task = _sqed_task("unet", tiny)
        trainer = _trainer(ctx, [], deterministic=True)
        trainer.predict(task.eval(), dataloaders=_repeat_loader(_patches(4, 64, cfg["num_classes"], 1), 1))

    def sqa_loss() -> None:
        from rssqa.losses import SQALoss

        m = _conf("smoke", "sqa")["model"]
        import inspect

        known = inspect.signature(SQALoss).parameters
        loss_fn = SQALoss(**{k: v for k, v in m.items() if k in known})  # the smoke profile's loss weights
        dev = "cuda" if ctx["cuda"] else "cpu"
        g = torch.Generator().manual_seed(0)
        pred = torch.rand(64, generator=g).to(dev).requires_grad_()
        target, image = torch.rand(64, generator=g).to(dev), (torch.arange(64) // 8).to(dev)
        torch.use_deterministic_algorithms(True)
        loss_fn(pred, target, image)["loss"].backward()

    probe("pretrain_fit_smoke", pretrain)
    probe("sqed_fit_tiny_unet", sqed_fit)
    probe("sqed_label_tiny_unet", sqed_label)
    probe("sqa_loss_backward", sqa_loss)
    if time.perf_counter() < deadline:
        out["sqed_nondeterministic_ops"] = nondeterministic_ops(tiny, ctx, deadline)
    return out


def nondeterministic_ops(cfg: dict[str, Any], ctx: dict[str, Any], deadline: float) -> dict[str, list[str]]:
    """Per method (tiny size), the ops of a training step and a labelling batch that have no
    deterministic implementation on this device (what a deterministic Trainer refuses), from torch's
    warnings under ``deterministic="warn"``."""
    import warnings

    found: dict[str, list[str]] = {}
    # a CPU has deterministic kernels for all of them: there one method only checks the code path
    for method in cfg["methods"] if ctx["cuda"] else cfg["methods"][:1]:
        if time.perf_counter() > deadline:
            break
        ops: set[str] = set()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _, task = _sqed_task(method, cfg)
                _trainer(ctx, [], max_steps=1, max_epochs=1, deterministic="warn", log_every_n_steps=1).fit(
                    task, train_dataloaders=_repeat_loader(_patches(2, cfg["patch_size"], cfg["num_classes"], 0), 1)
                )
                _trainer(ctx, [], deterministic="warn").predict(
                    task.eval(), dataloaders=_repeat_loader(_patches(2, cfg["patch_size"], cfg["num_classes"], 1), 1)
                )
            except Exception as e:  # recorded beside the ops found so far
                ops.add(f"error: {_first_line(e)}")
            finally:
                torch.use_deterministic_algorithms(False)
        for w in caught:
            text = str(w.message)
            if "does not have a deterministic implementation" in text:
                ops.add(text.split()[0])
        found[method] = sorted(ops)
    say(f"determinism: ops without a deterministic implementation, per sqed method: {found}")
    return found


# ------------------------------------------------------------------------------------------ driver
def _free(ctx: dict[str, Any]) -> None:
    gc.collect()
    if ctx["cuda"]:
        torch.cuda.empty_cache()


def _versions() -> dict[str, str | None]:
    import importlib

    out: dict[str, str | None] = {}
    for mod in ("torch", "lightning", "open_clip", "segmentation_models_pytorch", "timm", "torchmetrics",
                "webdataset", "transformers", "jsonargparse", "numpy"):  # fmt: skip
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # a missing package is a finding, not a crash
            out[mod] = f"missing ({type(e).__name__})"
    return out


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info["device_name"] = platform.processor() or platform.machine()
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def table_rows(results: dict[str, Any]) -> list[tuple]:
    rows: list[tuple] = []
    p = results.get("pretrain", {})
    if "error" in p:
        rows.append(("pretrain", "FAILED", p["error"][:100]))
    elif p:
        rows.append(("pretrain samples/s", f"{p.get('samples_per_s')}", f"{p['model']}, batch {p['batch_size']}, {p['precision']}"))
        rows.append(("pretrain MFU", f"{p.get('mfu')}", f"{p['train_gflops_per_sample']} GFLOP/sample (grad ckpt {p['grad_checkpointing']}), "
                     f"peak {results['settings'].get('peak_tflops') or 'unknown'} TFLOP/s"))  # fmt: skip
        if p.get("gpu_mem_peak_gib") is not None:
            rows.append(("pretrain GPU memory", f"{p['gpu_mem_peak_gib']}", "GiB, peak allocated"))
    u = results.get("purify", {})
    if "error" in u:
        rows.append(("purify", "FAILED", u["error"][:100]))
    elif u:
        rows.append(("purify score pairs/s", f"{u.get('score_pairs_per_s')}", f"filter {u['filter']}, batch {u['batch_size']}"))
        g = u["generation"]
        rows.append(("purify caption pairs/s", f"{u.get('caption_pairs_per_s')}",
                     f"{u['captioner']}, {g['method']} x{g['num_beams']}, {g['max_tokens']} tokens"))  # fmt: skip
    s = results.get("sqed", {})
    if "error" in s:
        rows.append(("sqed", "FAILED", s["error"][:100]))
    for m, r in s.get("methods", {}).items():
        if "error" in r:
            rows.append((f"sqed {m}", "FAILED", r["error"][:100]))
            continue
        note = f"label {r.get('label_images_per_s')} img/s"
        if r.get("gpu_mem_peak_gib") is not None:
            note += f", {r['gpu_mem_peak_gib']} GiB"
        if "train_deterministic_error" in r:
            note += ", deterministic=True refused"
        rows.append((f"sqed {m} train img/s", f"{r.get('train_images_per_s')}", note))
    d = results.get("determinism", {})
    if "error" in d:
        rows.append(("determinism", "FAILED", d["error"][:100]))
    for k, v in d.items():
        if k == "sqed_nondeterministic_ops":
            hit = {m: ops for m, ops in v.items() if ops}
            rows.append(("sqed ops, no deterministic impl.", f"{len(hit)}/{len(v)}",
                         "; ".join(f"{m}: {', '.join(ops)}" for m, ops in hit.items())[:300] or "none"))  # fmt: skip
        elif isinstance(v, dict):
            rows.append((f"deterministic {k}", "ok" if v.get("ok") else ("skipped" if v.get("ok") is None else "ERROR"),
                         v.get("error", v.get("skipped", ""))[:100]))  # fmt: skip
    rows.append(("total", f"{results['total_s']} s", f"device {results['settings']['device_name']}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/gpu_check.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke-profile models and sizes, a few steps (a CPU check)")
    ap.add_argument("--seconds", type=float, default=None, help="budget per part, model building included (70; tiny 60)")
    ap.add_argument("--total_seconds", type=float, default=270.0, help="the whole run's budget; parts shrink to fit")
    ap.add_argument("--pairs", type=int, default=None, help="synthetic pairs written as shards (256; tiny 64)")
    ap.add_argument("--parts", nargs="*", default=list(PART_NAMES), choices=PART_NAMES)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --device cpu, as the smoke configs; else torch's)")  # fmt: skip
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seconds = args.seconds or (60.0 if args.tiny else 70.0)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads > 0:  # on a small shared CPU one thread avoids the oversubscription that slows all down
        torch.set_num_threads(threads)
    end = START + args.total_seconds
    cuda = args.device == "cuda"
    info = machine(args.device)
    peak = gpu_peak_tflops(info["device_name"]) if cuda else None
    results: dict[str, Any] = {
        "settings": {**info, "tiny": args.tiny, "seconds_per_part": seconds, "torch_threads": torch.get_num_threads(), "peak_tflops": peak or "unknown",
                     "peak_source": "dense bf16, NVIDIA data sheet" if peak else None, "versions": _versions()},  # fmt: skip
    }
    say(f"device {info['device_name']} ({args.device}), torch {torch.__version__}, peak bf16 {peak or 'unknown'} TFLOP/s, "
        f"{'tiny' if args.tiny else 'paper'} settings, {seconds:.0f} s per part")  # fmt: skip

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        results["total_s"] = round(time.perf_counter() - START, 1)
        payload = {"benchmark": "gpu_check", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                         "platform": platform.platform()}, **results}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str) + "\n")

    if cuda and not torch.cuda.is_available():
        results["error"] = "--device cuda, but torch sees no CUDA device"
        save()
        say(results["error"])
        return 2
    from rssqa.tracking import quiet_lightning

    quiet_lightning()
    cfgs = settings(args.tiny)
    # DataLoader workers hand batches over in /dev/shm: a small one (a container's default 64 MiB) kills
    # them with a bus error, so there the data is loaded in the main process (recorded)
    max_workers, shm = max(1, (os.cpu_count() or 2) - 1), shm_gib()
    results["settings"]["dev_shm_gib"] = shm
    if shm is not None and shm < 4:
        max_workers = 0
        results["settings"]["workers_note"] = f"/dev/shm is {shm:.2f} GiB: DataLoader workers off (data in the main process)"
        say(results["settings"]["workers_note"])
    size = 64 if args.tiny else 224
    if not args.tiny:
        from rssqa.models.clip import clip_config

        size = clip_config(cfgs["pretrain"]["model_name"])["vision_cfg"]["image_size"]
    n = args.pairs or (64 if args.tiny else 256)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        per_shard = min(n, cfgs["purify"]["batch_size"])  # shard-aligned purify batches of the full size
        shards = make_shards(work / "shards", n, size, per_shard)
        results["settings"]["data"] = {"pairs": n, "image_size": size, "pairs_per_shard": per_shard,
                                       "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        say(f"data: {n} pairs at {size} px in {time.perf_counter() - t0:.1f} s")
        ctx = {"accelerator": "gpu" if cuda else "cpu", "cuda": cuda, "sync": cuda, "shards": shards, "work": work,
               "n_pairs": n, "image_size": size, "tiny": args.tiny, "max_workers": max_workers,
               "peak_tflops": peak, "device_name": info["device_name"]}  # fmt: skip
        parts = {"pretrain": part_pretrain, "purify": part_purify, "sqed": part_sqed, "determinism": part_determinism}
        todo = [p for p in PART_NAMES if p in args.parts]
        for i, name in enumerate(todo):
            reserve = 20.0 * ("determinism" in todo[i + 1 :])
            heavy_left = sum(1 for p in todo[i:] if p != "determinism")
            if name == "determinism":
                budget = min(20.0, max(5.0, end - time.perf_counter()))
            else:
                budget = min(seconds, max(10.0, (end - time.perf_counter() - reserve) / max(1, heavy_left)))
            say(f"== {name} (budget {budget:.0f} s)")
            t0 = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                res = parts[name](cfgs["sqed"] if name == "determinism" else cfgs[name], ctx, t0 + budget)
            except Exception as e:  # recorded; the next part runs
                res = {"error": _first_line(e), "traceback": traceback.format_exc()[-4000:]}
                say(f"{name} FAILED: {_first_line(e)}")
            res["seconds"] = round(time.perf_counter() - t0, 1)
            if cuda and name != "sqed":  # sqed records its peak per method
                res["gpu_mem_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                res["gpu_mem_reserved_peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            results[name] = res
            _free(ctx)
            save()
    results["total_s"] = round(time.perf_counter() - START, 1)
    title = f"gpu_check ({'tiny, ' if args.tiny else ''}{info['device_name']}, torch {torch.__version__})"
    write_report(args.out, title, results, table_rows(results))
    failed = [p for p in PART_NAMES if isinstance(results.get(p), dict) and "error" in results[p]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
