"""The purify loop, :class:`Purify`: the model fits, score and write passes of every round, the summary.

Every round makes its filter and captioner exist (fitted, loaded or bootstrap-refitted), runs a score
pass when the threshold comes from the scores, then the write pass; rank 0 reads the round's results
and broadcasts what the other ranks need. Last, rank 0 writes the examples, the logs and the summary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from PIL import Image

from rssqa.data.caption_rules import normalize_caption
from rssqa.data.shards import list_shards, shard_pipeline, tar_samples, write_sizes
from rssqa.models.captioner import CaptionVocab, export_captioner, load_captioner, vocab_size
from rssqa.models.clip import CONFIG_FILE, export_clip, load_clip
from rssqa.progress import ProgressLog
from rssqa.runs import atomic_write_json, is_done, process_times, write_summary
from rssqa.tasks.purify.config import ModelSpec, _jsonable_config, build_captioner, build_filter
from rssqa.tasks.purify.data import PendingShards, SamplePrep
from rssqa.tasks.purify.examples import EXAMPLE_COLUMNS, example_rows, write_examples_csv
from rssqa.tasks.purify.fit import PairFit, pair_loader
from rssqa.tasks.purify.predict import PurifyTask
from rssqa.tasks.purify.rounds import (
    RoundDirs,
    account,
    keep_fraction_threshold,
    otsu_threshold,
    read_markers,
    read_scores,
    round_dirs,
)
from rssqa.tasks.purify.writers import PurifyWriter, ScoreWriter, _ShardBuffer
from rssqa.tracking import make_loggers, publish


# ============================================================================================ the loop
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
            # every rank's process CPU time (write_summary alone would count this one)
            summary["cpu_s"] = round(process_times()["cpu_s"] + self.cpu_others, 2)
            write_summary(self.out, summary)
        return self.trainer.strategy.broadcast(summary, src=0)

    def _gather_speed(self, speed: dict[str, float]) -> tuple[float, float, float | None]:
        """Samples of all ranks, the slowest rank's wall seconds, and the mean share of wall time in model compute."""
        # each rank's process CPU time too: the other ranks are still running when rank 0 writes the summary,
        # so its own resource usage cannot count them
        cpu = process_times()["cpu_s"]
        t = torch.tensor([speed["samples"], speed["wall_s"], speed["compute_s"], cpu], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = self.trainer.strategy.all_gather(t).reshape(-1, 4)
        t = t.reshape(-1, 4)
        share = (t[:, 2] / t[:, 1].clamp_min(1e-9)).mean() if float(t[:, 1].min()) > 0 else None
        self.per_rank = [
            {"samples": int(r[0]), "wall_s": round(float(r[1]), 2), "compute_s": round(float(r[2]), 2), "cpu_s": round(float(r[3]), 2)}
            for r in t
        ]
        self.cpu_others = float(t[1:, 3].sum())  # rank 0's own is taken when it writes the summary
        return float(t[:, 0].sum()), float(t[:, 1].max()), None if share is None else round(float(share), 4)


def _model_name(folder: Path) -> str:
    return json.loads((folder / CONFIG_FILE).read_text()).get("model_name", folder.name)


def _preprocess_key(model: torch.nn.Module) -> tuple:
    v = model.visual
    return (tuple(np.atleast_1d(v.image_size)), tuple(v.image_mean or ()), tuple(v.image_std or ()))



def already_done(out_dir: str | os.PathLike) -> bool:
    """True when the stage finished in ``out_dir`` (its summary exists)."""
    return is_done(out_dir)
