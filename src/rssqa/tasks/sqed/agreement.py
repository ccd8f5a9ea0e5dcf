"""Agreement between a source's methods, once every method of the source is labelled.

For every pool image, each method's per-pixel agreement with the other methods of the same source
(:mod:`rssqa.agreement`), pooled to the label grid: one file per source,
``features/<source>/agreement.safetensors`` with ``<method>/agree_maps`` (``N×3×g×g``) and
``<method>/agree_global`` (``N×3``) in pool row order. The methods run again over the pool from their
checkpoints, in the labelling's fixed chunks, so the probabilities are those labelling saw and those
the scorer computes live. The file's fingerprint covers every method's label fingerprint: a method
added, retrained or relabelled later makes the next run recompute it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from rssqa.agreement import AGREEMENT_NAMES, MIN_METHODS
from rssqa.data.sqed import AGREEMENT, read_label_shard, shard_matches, write_label_shard
from rssqa.errors import RSSQAError
from rssqa.models.quality_inputs import agreement_inputs, method_statistics
from rssqa.models.segmenters import load_segmenter
from rssqa.tasks.sqed.config import SQEDConfig
from rssqa.tasks.sqed.sources import PreparedSource, _fingerprint


def agreement_path(out: Path, source: str) -> Path:
    return out / "features" / source / AGREEMENT


def _device(accelerator: str) -> torch.device:
    wants_gpu = accelerator in ("gpu", "cuda", "auto")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def agree_source(
    prep: PreparedSource, methods: Sequence[str], label_fps: Sequence[str], cfg: SQEDConfig, out: Path
) -> tuple[Path | None, bool]:
    """Write (or reuse) the agreement file of one source.

    Args:
        prep: the prepared source (its pool).
        methods: the source's methods, in table order.
        label_fps: each method's label-shard fingerprint, same order.
        cfg: the stage configuration (label grid, chunk and batch size, accelerator).
        out: the sqed run folder.

    Returns:
        The file (``None`` with fewer than :data:`~rssqa.agreement.MIN_METHODS` methods) and whether
        it was computed now.
    """
    if len(methods) < MIN_METHODS:
        return None, False
    path = agreement_path(out, prep.name)
    fp = _fingerprint({"labels": dict(zip(methods, label_fps, strict=True)), "grid": cfg.label.grid, "chunk": cfg.label.chunk})
    if shard_matches(path, fp):
        return path, False
    t0 = time.perf_counter()
    device = _device(cfg.train.accelerator)
    segs = [load_segmenter(out / "methods" / prep.name / m / "final.ckpt", map_location=device) for m in methods]
    parts: dict[str, list[torch.Tensor]] = {f"{m}/{k}": [] for m in methods for k in ("agree_maps", "agree_global")}
    loader = DataLoader(prep.pool_arrays, batch_size=cfg.label.batch_size, shuffle=False)
    for batch in loader:
        x = batch["image"].to(device)
        # the scorer's own computation (rssqa.models.quality_inputs), so the cached values are the live ones
        stats = [method_statistics(s, x, cfg.label.chunk, keep_probs=True) for s in segs]
        for m, agree in zip(methods, agreement_inputs(stats, cfg.label.grid), strict=True):
            for k, v in agree.items():
                parts[f"{m}/{k}"].append(v)
    arrays = {k: torch.cat(v).numpy() for k, v in parts.items()}
    meta = {
        "source": prep.name,
        "methods": list(methods),
        "image_ids": prep.pool_ids,
        "fingerprint": fp,
        "grid": cfg.label.grid,
        "chunk": cfg.label.chunk,
        "names": list(AGREEMENT_NAMES),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_label_shard(path, arrays, meta)
    return path, True


def agreement_columns(path: Path, prep: PreparedSource, method: str) -> dict[str, np.ndarray]:
    """The table's ``agreement`` and ``consensus`` of ``method`` for every pool image of ``prep``."""
    arrays, meta = read_label_shard(path)
    if meta["image_ids"] != prep.pool_ids:
        raise RSSQAError(f"{path}: its images do not match the pool of {prep.name}")
    glob = arrays[f"{method}/agree_global"]
    return {"agreement": glob[:, AGREEMENT_NAMES.index("share")], "consensus": glob[:, AGREEMENT_NAMES.index("majority")]}
