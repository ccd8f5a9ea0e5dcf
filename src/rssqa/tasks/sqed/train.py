"""Training one unit: a method on a source's ``seg`` images, or reuse of its matching checkpoint.

:func:`train_method` seeds the unit from its own name, fits a :class:`SegmentationTask` with a
Lightning ``Trainer`` on the rank's device and writes ``final.ckpt`` and ``train.json`` in the
unit's folder. An interrupted training resumes from the furthest matching ``last.ckpt`` or HPC
checkpoint; a finished unit drops them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from rssqa.data.segsets import SegArrays, SegDataModule, SegSubset
from rssqa.runs import atomic_write_json
from rssqa.tasks.sqed.config import SQEDConfig
from rssqa.tasks.sqed.ranks import Ranks, _devices
from rssqa.tasks.sqed.sources import PreparedSource, _train_fingerprint, training_data
from rssqa.tasks.sqed.task import SegmentationTask, load_task

log = logging.getLogger(__name__)


def _unit_folder(out: Path, source: str, method: str) -> Path:
    return out / "methods" / source / method


def _resume_point(folder: Path, fp: str) -> str | None:
    """The furthest checkpoint in a unit's folder that resumes its training (``None``: start afresh).

    Candidates: ``last.ckpt`` (``train.save_last``) and the ``hpc_ckpt_<n>.ckpt`` Lightning saves when
    SLURM signals a requeue. Lightning resumes an HPC checkpoint by itself when given no path, so one
    that is torn or of another configuration is deleted here.
    """
    best, best_step = None, -1
    for path in [folder / "last.ckpt", *sorted(folder.glob("hpc_ckpt_*.ckpt"))]:
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            step = ckpt["global_step"] if ckpt["hyper_parameters"]["fingerprint"] == fp else None
        except Exception:  # noqa: BLE001 - a torn checkpoint is simply not resumed
            step = None
        if step is None:
            if path.name != "last.ckpt":
                path.unlink(missing_ok=True)
        elif step > best_step:
            best, best_step = str(path), step
    return best


def _drop_resume_points(folder: Path) -> None:
    """Remove what only an unfinished training needs (a finished unit's HPC checkpoint would be
    restored by Lightning into the labelling run on SLURM)."""
    for path in [folder / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]:
        path.unlink(missing_ok=True)


def train_method(
    prep: PreparedSource,
    method: str,
    cfg: SQEDConfig,
    out: Path,
    loggers: Sequence[Logger] = (),
    data: Callable[[], SegArrays | SegSubset] | None = None,
    ranks: Ranks = Ranks(),  # noqa: B008 - a frozen dataclass, immutable
) -> tuple[SegmentationTask, bool]:
    """Train ``method`` on ``prep``'s ``seg`` images, or reuse its matching checkpoint.

    Args:
        prep: the source.
        method: a registered method.
        cfg: the stage configuration.
        out: the run folder.
        loggers: loggers shared by all fits (W&B); a CSV logger per fit is added.
        data: gives the training samples when training is needed (default :func:`training_data`;
            a cached callable shares one copy between the methods of a source).
        ranks: this process's rank (recorded in ``train.json``) and device.

    Returns:
        The task and whether it was trained now (``False``: reused).
    """
    spec, epochs, seed, fp = _train_fingerprint(prep, method, cfg)
    folder = _unit_folder(out, prep.name, method)
    final = folder / "final.ckpt"
    if final.is_file():
        task = load_task(final)
        if task.hparams.fingerprint == fp:
            _drop_resume_points(folder)
            return task, False
        log.warning("%s: trained under another configuration; training again", final)
    data = training_data(prep, cfg) if data is None else data()
    L.seed_everything(seed, workers=True, verbose=False)
    task = SegmentationTask(
        spec.as_dict(),
        prep.source.num_classes,
        list(prep.source.classes),
        grid=cfg.label.grid,
        hist_bins=cfg.label.hist_bins,
        augment=cfg.train.augment,
        log_prefix=f"{prep.name}/{method}/",
        fingerprint=fp,
    )
    dm = SegDataModule(
        train=data, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers, seed=seed
    )
    resume = _resume_point(folder, fp)
    steps = max(1, len(data) // cfg.train.batch_size)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.train.accelerator,
        devices=_devices(cfg.train.accelerator, ranks.local_rank),
        deterministic="warn",  # on a GPU some losses have no deterministic kernel: warn, do not fail
        logger=[CSVLogger(out / "logs", name=prep.name, version=method), *loggers],
        callbacks=[ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False)]
        if cfg.train.save_last
        else [],
        enable_checkpointing=cfg.train.save_last,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=min(steps, 10),
        # the unit's own folder: an HPC checkpoint saved on SLURM's requeue signal belongs to this unit
        default_root_dir=folder,
    )
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm, ckpt_path=resume)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "train.json",
        {"seconds": round(time.perf_counter() - t0, 3), "epochs": epochs, "images": len(data),
         "steps": trainer.global_step, "resumed": resume is not None, "fingerprint": fp,
         "rank": ranks.rank, "world_size": ranks.world_size},
    )  # fmt: skip
    tmp = folder / ".final.ckpt.tmp"
    trainer.save_checkpoint(tmp, weights_only=True)
    os.replace(tmp, final)
    _drop_resume_points(folder)
    return task.eval(), True
