"""Labelling one unit: a trained method segments a source's pool, one label shard per unit.

:func:`label_method` writes per-image OA and the cached statistics of every pool image as
``features/<source>/<method>.safetensors`` (or reuses a shard of matching fingerprint); ``_rows``
turns a shard back into RS-SQED table rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from rssqa.data.sqed import read_label_shard, shard_matches, write_label_shard
from rssqa.errors import RSSQAError
from rssqa.models.segmenters import MAP_NAMES
from rssqa.tasks.sqed.config import SQEDConfig
from rssqa.tasks.sqed.ranks import Ranks, _devices
from rssqa.tasks.sqed.sources import PreparedSource, _label_fingerprint
from rssqa.tasks.sqed.task import SegmentationTask
from rssqa.tasks.sqed.train import _unit_folder


def _shard_path(out: Path, source: str, method: str) -> Path:
    return out / "features" / source / f"{method}.safetensors"


def label_method(
    prep: PreparedSource,
    method: str,
    task: SegmentationTask,
    cfg: SQEDConfig,
    out: Path,
    ranks: Ranks = Ranks(),  # noqa: B008 - a frozen dataclass, immutable
) -> tuple[Path, bool]:
    """Label the pool of ``prep`` with ``method``: OA and cached statistics, one label shard.

    Returns:
        The shard's path and whether it was computed now (``False``: reused).
    """
    path = _shard_path(out, prep.name, method)
    fp = _label_fingerprint(task.hparams.fingerprint, prep, cfg.label.chunk)
    if shard_matches(path, fp):
        return path, False
    t0 = time.perf_counter()
    trainer = L.Trainer(
        accelerator=cfg.train.accelerator,
        devices=_devices(cfg.train.accelerator, ranks.local_rank),
        # explicit: else the flags are whatever this process's previous fit left (none if it reused all)
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=_unit_folder(out, prep.name, method),
    )
    loader = DataLoader(prep.pool_arrays, batch_size=cfg.label.batch_size, shuffle=False)
    task.describe_chunk = cfg.label.chunk
    batches = trainer.predict(task, dataloaders=loader)
    write_label(path, prep, method, task, cfg, batches, fp, time.perf_counter() - t0)
    return path, True


def write_label(
    path: Path, prep: PreparedSource, method: str, task: SegmentationTask, cfg: SQEDConfig,
    batches: list[dict[str, torch.Tensor]], fp: str, seconds: float,
) -> None:
    """Write the label shard of ``method`` on ``prep``'s pool from its batches of
    :func:`~rssqa.tasks.sqed.task.label_outputs`, ``seconds`` being the time they took."""
    arrays = {k: torch.cat([b[k] for b in batches]).numpy() for k in batches[0]}
    if np.isnan(arrays["oa"]).any():
        raise RSSQAError(f"{prep.name}: pool images without labelled pixels reached labelling")
    shapes = {k: list(v.shape[1:]) for k, v in arrays.items()}
    meta = {
        "source": prep.name,
        "method": method,
        "image_ids": prep.pool_ids,
        "fingerprint": fp,
        "classes": list(prep.source.classes),
        "grid": cfg.label.grid,
        "hist_bins": cfg.label.hist_bins,
        "chunk": cfg.label.chunk,
        "map_names": list(MAP_NAMES),
        "feature_shapes": shapes,
        "spec": task.hparams.spec,
        "seconds": round(seconds, 3),  # segment + statistics, before writing
    }
    write_label_shard(path, arrays, meta)


def _rows(prep: PreparedSource, method: str, path: Path, out: Path) -> list[dict[str, Any]]:
    arrays, meta = read_label_shard(path)
    if meta["image_ids"] != prep.pool_ids:
        raise RSSQAError(f"{path}: its images do not match the pool of {prep.name}")
    rel = path.relative_to(out).as_posix()
    return [
        {
            "key": f"{prep.name}/{image_id}",
            "image_id": image_id,
            "source": prep.name,
            "method": method,
            "oa": float(arrays["oa"][i]),
            "split": prep.pool_splits[i],
            "group": prep.pool_groups[i],
            "n_labelled": int(arrays["n_labelled"][i]),
            "msp": float(arrays["msp"][i]),
            "entropy": float(arrays["entropy"][i]),
            "margin": float(arrays["margin"][i]),
            "feature_file": rel,
            "feature_row": i,
            "image_file": f"pool/{prep.name}/images.npy",
            "image_row": i,
        }
        for i, image_id in enumerate(prep.pool_ids)
    ]
