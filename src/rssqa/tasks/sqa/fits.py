"""The sqa stage's fits, in this process or spread over worker processes.

A stage run trains up to fifteen small heads: RS-SQA, its ablations, the agreement models, and two of
them again leaving each source out. Each fit is seeded on its own and reads the same in-memory inputs,
so they are independent jobs (:class:`FitJob`). :class:`Fits` runs them in this process when a result
is asked for (``workers=1``), or hands them, in the order submitted, to ``workers`` worker
processes. A worker forked from the calling process (:func:`rssqa.processes.worker_context`: one-thread
workers, Linux) starts with its data module as it is; a spawned one builds the data module once (the
CLIP features come from the run folder's cache, written by the calling process before the workers
start). Each trains one head at a time with a Trainer from the same :class:`TrainerRecipe`; the calling
process meanwhile does what needs no fit (the pixel error head).

A head this small keeps a core only partly busy with more than one thread: two one-thread processes
on two cores finish the fits in about half the time of one process. With the same thread count a fit
gives the same numbers wherever it runs (a test checks it), so ``workers`` changes the stage's wall
time, not its results.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rssqa.errors import RSSQAError
from rssqa.processes import forked, worker_context
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.task import SQATask

# Trainer options a worker cannot rebuild from plain values (objects built by the config parser)
_OBJECTS = ("logger", "callbacks", "plugins", "profiler")


@dataclass(frozen=True)
class TrainerRecipe:
    """A fresh Trainer per run, from plain values (so that a worker process builds the same one).

    Args:
        out: the stage's run folder: CSV (and W&B) logs, ``checkpoints/<run>/best.ckpt``.
        trainer: keyword arguments of :class:`lightning.pytorch.Trainer` (plain values only).
        wandb: log each run to Weights & Biases too (offline unless ``WANDB_MODE`` says otherwise).
    """

    out: str
    trainer: dict[str, Any] = field(default_factory=dict)
    wandb: bool = True

    def __post_init__(self) -> None:
        given = [k for k in _OBJECTS if self.trainer.get(k) not in (None, False)]
        if given:
            raise RSSQAError(f"trainer.{given[0]}: the sqa stage sets its own loggers and callbacks; leave it unset")

    def __call__(self, run: str) -> L.Trainer:
        """A Trainer for ``run``: CSV (+ W&B) logs, a checkpoint of the best validation SRCC, progress lines."""
        from rssqa.progress import ProgressLog
        from rssqa.tracking import make_loggers

        out = Path(self.out)
        loggers = make_loggers(out, "sqa", name=f"sqa/{run}", wandb=self.wandb, csv_version=run)
        ckpt = ModelCheckpoint(
            dirpath=out / "checkpoints" / run, filename="best", monitor="val_srcc", mode="max", save_top_k=1,
            enable_version_counter=False,
        )  # fmt: skip
        progress = [] if self.trainer.get("enable_progress_bar") else [ProgressLog(f"sqa/{run}", every_s=30)]
        kwargs = {k: v for k, v in self.trainer.items() if k not in _OBJECTS}
        return L.Trainer(**kwargs, logger=loggers, callbacks=[ckpt, *progress])


@dataclass(frozen=True)
class FitJob:
    """One head to train.

    Args:
        run: the run name (logs, checkpoint folder, W&B run).
        hparams: :class:`SQATask` arguments.
        semantic: which CLIP's features the head reads (``clip_rs`` or ``generic_clip``).
        split_of: a split per table row other than RS-SQED's own (leave one source out), or ``None``.
        seed: seeded right before the fit.
        data_seed: the training batches' shuffling seed, when not the data module's own (a rerun
            under another seed, :mod:`rssqa.tasks.sqa.seeds`).
    """

    run: str
    hparams: dict[str, Any]
    semantic: str = "clip_rs"
    split_of: np.ndarray | None = None
    seed: int = 0
    data_seed: int | None = None


def fit_one(
    task: SQATask, data: SQADataModule, trainer: L.Trainer, semantic: str = "clip_rs"
) -> tuple[SQATask, dict[str, np.ndarray], float]:
    """Fit ``task``, restore its best validation-SRCC weights, predict every split.

    Returns:
        ``(task, {split: predictions in table row order of the split}, best val SRCC)``.
    """
    data.semantic = semantic
    try:
        if task.model is None:
            task.build_for(data)
        trainer.fit(task, datamodule=data)
        ckpt = trainer.checkpoint_callback
        best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else float("nan")
        if ckpt is not None and ckpt.best_model_path:
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
            task.load_state_dict(state)
        task.eval()
        preds = {}
        with torch.no_grad():
            for split in ("train", "val", "test"):
                out = [task(b) for b in data.split_dataloader(split)]
                preds[split] = torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
    finally:
        data.semantic = "clip_rs"
    return task, preds, best


def run_job(job: FitJob, data: SQADataModule, recipe: TrainerRecipe) -> tuple[SQATask, dict[str, np.ndarray], float]:
    """Train ``job`` on ``data`` (its split and shuffling seed restored afterwards) with a Trainer from ``recipe``."""
    from rssqa.tracking import finish_runs

    original, shuffle = data.split_of, data.hparams.seed
    if job.split_of is not None:
        data.split_of = job.split_of
    if job.data_seed is not None:
        data.hparams.seed = job.data_seed
    trainer = None
    try:
        L.seed_everything(job.seed, workers=True, verbose=False)
        trainer = recipe(job.run)
        return fit_one(SQATask(**job.hparams), data, trainer, job.semantic)
    finally:
        data.split_of, data.hparams.seed = original, shuffle
        if trainer is not None:
            finish_runs(trainer.loggers)  # one W&B run at a time per process


# ------------------------------------------------------------------------------------------ workers
_WORKER: dict[str, Any] = {}


def _start_worker(data: dict[str, Any] | SQADataModule, recipe: TrainerRecipe, threads: int) -> None:
    """A worker's data module: its parent's, as it was when forked, or built again from the parent's
    arguments (a spawned worker)."""
    from rssqa.tracking import quiet_lightning

    quiet_lightning()
    if threads:
        torch.set_num_threads(threads)
    if isinstance(data, dict):
        data = SQADataModule(**data)
        data.setup("fit")
    _WORKER.update(data=data, recipe=recipe)


def _work(job: FitJob) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, np.ndarray], float]:
    task, preds, best = run_job(job, _WORKER["data"], _WORKER["recipe"])
    return dict(task.hparams), task.state_dict(), preds, best


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(_WORKER["data"], *args)


def _rebuild(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> SQATask:
    task = SQATask(**hparams)
    task.load_state_dict(state)
    return task.eval()


class Fits:
    """Fit jobs by run name: run here when asked for (``workers=1``) or by ``workers`` processes.

    Args:
        data: the prepared data module (the in-process fits use it; the workers build their own).
        recipe: the Trainer of each run.
        workers: processes that train (1: this process, lazily, in the order results are asked for).
        threads: torch threads of each worker (0: torch's default).
    """

    def __init__(self, data: SQADataModule, recipe: TrainerRecipe, workers: int = 1, threads: int = 0):
        if workers < 1:
            raise RSSQAError(f"fit_workers: must be at least 1, got {workers}")
        self.data, self.recipe, self.workers, self.threads = data, recipe, workers, threads
        self.jobs: dict[str, FitJob] = {}
        self.done: dict[str, tuple[SQATask, dict[str, np.ndarray], float]] = {}
        self.futures: dict[str, Future] = {}
        self.calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.called: dict[str, Any] = {}
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            context = worker_context(one_thread=self.threads == 1)
            if forked(context):  # the workers start with this process's data module (no imports, no setup)
                data: dict[str, Any] | SQADataModule = self.data
            else:
                own = inspect.signature(SQADataModule.__init__).parameters
                data = {k: v for k, v in self.data.hparams.items() if k in own and k != "self"}
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker, initargs=(data, self.recipe, self.threads)
            )
        return self.pool

    def submit(self, job: FitJob) -> None:
        """Queue ``job`` (a worker starts it as soon as one is free)."""
        if job.run in self.jobs or job.run in self.calls:
            raise RSSQAError(f"sqa: two fits named {job.run!r}")
        self.jobs[job.run] = job
        if self.workers > 1:
            self.futures[job.run] = self._pool().submit(_work, job)

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Queue other work that needs no fit of this process: ``fn(data, *args)``, run by a worker on its own
        data module (here, on :attr:`data`, when its result is asked for, with ``workers=1``).

        ``fn`` must be a module-level function (it is pickled) and leave ``data`` as it found it; with the
        same thread count it gives the same result wherever it runs, as a fit does (the pixel error heads
        of the group folds: :mod:`rssqa.tasks.sqa.run`).
        """
        if name in self.jobs or name in self.calls:
            raise RSSQAError(f"sqa: two fits named {name!r}")
        self.calls[name] = (fn, args)
        if self.workers > 1:
            self.futures[name] = self._pool().submit(_call, fn, args)

    def call_result(self, name: str) -> Any:
        """What the work queued as ``name`` by :meth:`call` returned (waits for it)."""
        if name not in self.called:
            if name not in self.calls:
                raise RSSQAError(f"sqa: no work named {name!r} was queued")
            if name in self.futures:
                self.called[name] = self._wait(name, "running")
            else:
                fn, args = self.calls[name]
                self.called[name] = fn(self.data, *args)
        return self.called[name]

    def result(self, run: str) -> tuple[SQATask, dict[str, np.ndarray], float]:
        """``(task, {split: predictions}, best val SRCC)`` of the job named ``run`` (waits for it)."""
        if run not in self.done:
            if run not in self.jobs:
                raise RSSQAError(f"sqa: no fit named {run!r} was submitted")
            if run in self.futures:
                hparams, state, preds, best = self._wait(run, "training")
                self.done[run] = (_rebuild(hparams, state), preds, best)
            else:
                self.done[run] = run_job(self.jobs[run], self.data, self.recipe)
        return self.done[run]

    def _wait(self, name: str, doing: str) -> Any:
        """The worker's result for ``name`` (a fit or a call); a worker that died is a one-line error."""
        try:
            return self.futures[name].result()
        except BrokenProcessPool as e:
            raise RSSQAError(f"sqa: a fit worker died while {doing} {name!r} ({e})") from None

    def close(self) -> None:
        """Stop the workers (jobs not started are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Fits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

