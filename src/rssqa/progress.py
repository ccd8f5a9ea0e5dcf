"""Progress that reads well in a log: one line every few seconds instead of a redrawn bar.

Lightning's progress bars redraw one terminal line; in a SLURM log, a CI log or beside another stage
of ``make demo`` (two stages share the two cores) they turn into garbage. :class:`ProgressLog` prints
``[stage] fit 32/64 steps (50%), epoch 1/2, train/loss 4.41, 2.1 it/s, eta 0:00:15`` at most every
``every_s`` seconds, on rank 0 only, for fitting and prediction passes; loops of a stage's own print
with :func:`line` and :func:`eta`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def eta(done: int, total: int | None, elapsed: float) -> str:
    """``", eta 0:01:05"`` after ``done`` of ``total`` items in ``elapsed`` seconds (empty without a total)."""
    if not total or done <= 0:
        return ""
    left = elapsed / done * max(total - done, 0)
    return f", eta {timedelta(seconds=round(left))}"


def line(label: str, text: str) -> None:
    """Print ``[label] text`` to stderr at once."""
    print(f"[{label}] {text}", file=sys.stderr, flush=True)


class ProgressLog(Callback):
    """Prints fit and predict progress as plain lines.

    Args:
        label: what is running, e.g. ``pretrain`` or ``purify/filter``.
        every_s: seconds between two lines (the first and the last line are always printed).
        metrics: logged metrics to show beside the step count (those that exist).
    """

    def __init__(self, label: str, every_s: float = 15.0, metrics: Iterable[str] = ("train/loss", "train_loss", "loss")):
        self.label, self.every_s, self.metrics = label, every_s, tuple(metrics)
        self._t0 = self._last = 0.0

    def _start(self) -> None:
        self._t0 = self._last = time.perf_counter()

    def _maybe(self, trainer: L.Trainer, what: str, done: int, total: int | None, unit: str, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not trainer.is_global_zero or (not force and now - self._last < self.every_s):
            return
        self._last = now
        elapsed = now - self._t0
        of = f"/{total}" if total else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        rate = f", {done / elapsed:.1f} {unit}/s" if elapsed > 0 and done else ""
        line(self.label, f"{what} {done}{of} {unit}{pct}{extra}{rate}{eta(done, total, elapsed)}")

    # ----------------------------------------------------------------------------------- fit
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()
        self._first = trainer.global_step

    def _fit_total(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        first = trainer.global_step - self._first == 1
        if not first and time.perf_counter() - self._last < self.every_s:
            return  # the common case: nothing to print, nothing assembled (this runs after every step)
        metrics = trainer.callback_metrics
        shown = [f"{k} {float(metrics[k]):.4g}" for k in self.metrics if k in metrics]
        epoch = f", epoch {trainer.current_epoch + 1}" + (f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else "")
        extra = epoch + "".join(f", {s}" for s in shown)
        self._maybe(trainer, "fit", trainer.global_step, self._fit_total(trainer), "steps", extra, force=first)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe(trainer, "fit done:", trainer.global_step, None, "steps", force=True)

    # ----------------------------------------------------------------------------------- predict
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()
        self._batches = 0

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batches += 1
        self._maybe(trainer, "predict", self._batches, None, "batches", force=self._batches == 1)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe(trainer, "predict done:", self._batches, None, "batches", force=True)
