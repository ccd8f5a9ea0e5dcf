"""Agreement between a source's methods, once every method of the source is labelled.

For every pool image, each method's per-pixel agreement with the other methods of the same source
(:mod:`rssqa.agreement`), pooled to the label grid: one file per source,
``features/<source>/agreement.safetensors`` with ``<method>/agree_maps`` (``N×3×g×g``) and
``<method>/agree_global`` (``N×3``) in pool row order. The methods run again over the pool from their
checkpoints, in the labelling's fixed chunks, so the probabilities are those labelling saw and those
the scorer computes live. The file's fingerprint covers every method's label fingerprint: a method
added, retrained or relabelled later makes the next run recompute it.

With several ranks each one computes a contiguous share of the pool (:func:`pool_share`; an image's
numbers do not depend on which images share its pass) into a part file, and rank 0 joins the parts.
Where one rank builds every method of a source (one rank, or as many ranks as sources divide into),
it labels them and writes their agreement in one pass instead (:func:`label_and_agree`): each method
segments each pool image once, not once for its label shard and again here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from rssqa.agreement import AGREEMENT_NAMES, MIN_METHODS
from rssqa.data.sqed import AGREEMENT, read_label_shard, shard_matches, write_label_shard
from rssqa.errors import RSSQAError
from rssqa.models.quality_inputs import agreement_inputs, method_statistics
from rssqa.models.segmenters import load_segmenter
from rssqa.tasks.sqed.config import SQEDConfig
from rssqa.tasks.sqed.label import _shard_path, write_label
from rssqa.tasks.sqed.ranks import Ranks, _devices, _owner, await_others
from rssqa.tasks.sqed.sources import PreparedSource, _fingerprint, _label_fingerprint
from rssqa.tasks.sqed.task import SegmentationTask, label_outputs

POLL_S = 2.0  # how often rank 0 looks for the other ranks' parts


def agreement_path(out: Path, source: str) -> Path:
    return out / "features" / source / AGREEMENT


def _device(accelerator: str, local_rank: int = 0) -> torch.device:
    """This rank's device: its own GPU (as its fits use, :func:`~rssqa.tasks.sqed.ranks._devices`), or the CPU."""
    devices = _devices(accelerator, local_rank)
    return torch.device(f"cuda:{devices[0]}") if isinstance(devices, list) else torch.device("cpu")


def agreement_fingerprint(methods: Sequence[str], label_fps: Sequence[str], cfg: SQEDConfig) -> str:
    return _fingerprint({"labels": dict(zip(methods, label_fps, strict=True)), "grid": cfg.label.grid, "chunk": cfg.label.chunk})


def pool_share(n: int, ranks: Ranks) -> tuple[int, int]:
    """The pool rows ``[lo, hi)`` whose agreement ``ranks.rank`` computes: contiguous, sizes within one."""
    return n * ranks.rank // ranks.world_size, n * (ranks.rank + 1) // ranks.world_size


def _part_path(out: Path, source: str, rank: int, world_size: int) -> Path:
    return agreement_path(out, source).with_name(f"agreement.part{rank}of{world_size}.safetensors")


def agree_source(
    prep: PreparedSource, methods: Sequence[str], label_fps: Sequence[str], cfg: SQEDConfig, out: Path,
    ranks: Ranks | None = None, wait_s: float = 86400.0,
) -> tuple[Path | None, bool]:
    """Write (or reuse) the agreement file of one source; with several ranks, this rank's share of it.

    Args:
        prep: the prepared source (its pool).
        methods: the source's methods, in table order.
        label_fps: each method's label-shard fingerprint, same order.
        cfg: the stage configuration (label grid, chunk and batch size, accelerator).
        out: the sqed run folder.
        ranks: this process's rank (default: one process): it computes the rows of :func:`pool_share`; rank 0 then waits for
            the other ranks' parts and joins them.
        wait_s: rank 0 gives up (``RSSQAError`` naming the missing parts) after this many seconds.

    Returns:
        The file (``None`` with fewer than :data:`~rssqa.agreement.MIN_METHODS` methods, and on the
        ranks but 0) and whether it was computed now.
    """
    ranks = ranks or Ranks()
    if len(methods) < MIN_METHODS:
        return None, False
    path = agreement_path(out, prep.name)
    fp = agreement_fingerprint(methods, label_fps, cfg)
    if shard_matches(path, fp):
        return (path if ranks.rank == 0 else None), False
    t0 = time.perf_counter()
    lo, hi = pool_share(len(prep.pool_ids), ranks)
    if ranks.world_size == 1:
        arrays = _agreement_rows(prep, methods, cfg, out, lo, hi, ranks)
    else:
        mine = _part_path(out, prep.name, ranks.rank, ranks.world_size)
        if hi > lo and not shard_matches(mine, fp):
            write_label_shard(mine, _agreement_rows(prep, methods, cfg, out, lo, hi, ranks),
                              {"source": prep.name, "fingerprint": fp, "rows": [lo, hi]})  # fmt: skip
        if ranks.rank != 0:
            return None, True
        arrays = _join_parts(out, prep, fp, ranks.world_size, wait_s)
    _write_agreement(path, prep, methods, cfg, arrays, fp, time.perf_counter() - t0)
    if ranks.world_size > 1:
        for r in range(ranks.world_size):
            _part_path(out, prep.name, r, ranks.world_size).unlink(missing_ok=True)
    return path, True


def _write_agreement(
    path: Path, prep: PreparedSource, methods: Sequence[str], cfg: SQEDConfig, arrays: dict[str, np.ndarray], fp: str,
    seconds: float,
) -> None:
    meta = {
        "source": prep.name,
        "methods": list(methods),
        "image_ids": prep.pool_ids,
        "fingerprint": fp,
        "grid": cfg.label.grid,
        "chunk": cfg.label.chunk,
        "names": list(AGREEMENT_NAMES),
        "seconds": round(seconds, 3),
    }
    write_label_shard(path, arrays, meta)


def label_and_agree(
    prep: PreparedSource, tasks: Mapping[str, SegmentationTask], cfg: SQEDConfig, out: Path, ranks: Ranks | None = None
) -> tuple[dict[str, bool], Path, bool]:
    """Label every method of a source and write their agreement in one pass over its pool: each method
    segments each image once for both (a rank that builds all of a source's methods, :func:`source_owner`).

    The same numbers as :func:`~rssqa.tasks.sqed.label.label_method` per method then :func:`agree_source`:
    the same statistics of the same forwards, in the labelling's batches and chunks.

    Args:
        tasks: the source's trained methods, in table order (at least :data:`~rssqa.agreement.MIN_METHODS`).
        ranks: this process's rank (its GPU, where there are several).

    Returns:
        ``({method: whether its label shard was written now}, the agreement file, whether it was written now)``.
    """
    methods = list(tasks)
    label_fps = {m: _label_fingerprint(t.hparams.fingerprint, prep, cfg.label.chunk) for m, t in tasks.items()}
    fp = agreement_fingerprint(methods, [label_fps[m] for m in methods], cfg)
    path = agreement_path(out, prep.name)
    todo = [m for m in methods if not shard_matches(_shard_path(out, prep.name, m), label_fps[m])]
    agree = not shard_matches(path, fp)
    if not todo and not agree:
        return dict.fromkeys(methods, False), path, False
    t0 = time.perf_counter()
    device = _device(cfg.train.accelerator, (ranks or Ranks()).local_rank)
    run = methods if agree else todo  # a lost shard alone: only its method runs, the agreement stands
    segs = [tasks[m].segmenter.to(device).eval() for m in run]
    labels: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in run}
    parts = _AgreementRows(run)
    for batch in DataLoader(prep.pool_arrays, batch_size=cfg.label.batch_size, shuffle=False):
        stats = [method_statistics(s, batch["image"].to(device), cfg.label.chunk, keep_probs=agree) for s in segs]
        if agree:
            parts.add(stats, cfg.label.grid)  # pops probs and pred
        for m, st in zip(run, stats, strict=True):
            labels[m].append(label_outputs(st, batch["mask"].to(device), tasks[m].hparams.num_classes))
    seconds = time.perf_counter() - t0
    for m in todo:  # each shard records an equal share of the pass
        write_label(_shard_path(out, prep.name, m), prep, m, tasks[m], cfg, labels[m], label_fps[m], seconds / len(run))
    if agree:
        _write_agreement(path, prep, methods, cfg, parts.arrays(), fp, seconds)
    return {m: m in todo for m in methods}, path, agree


def source_owner(sources: Sequence[str], methods: Sequence[str], source: str, world_size: int) -> int | None:
    """The rank that builds every method of ``source`` (:func:`~rssqa.tasks.sqed.ranks.assign_units`), or
    ``None`` where they are spread over several ranks."""
    owners = {_owner(sources, methods, source, m, world_size) for m in methods}
    return owners.pop() if len(owners) == 1 else None


def await_agreement(
    prep: PreparedSource, methods: Sequence[str], label_fps: Sequence[str], cfg: SQEDConfig, out: Path, wait_s: float,
    since: float,
) -> tuple[Path, bool]:
    """The agreement file of a source that another rank labels and agrees in one pass, once it is on disk
    (``wait_s`` without it is an error), and whether it was written after ``since`` (this rank's start,
    wall-clock: written by this run, not found from an earlier one)."""
    path, fp = agreement_path(out, prep.name), agreement_fingerprint(methods, label_fps, cfg)
    await_others(lambda: [] if shard_matches(path, fp) else [prep.name], wait_s, POLL_S, lambda _: (
        f"{path}: the agreement of {prep.name} did not come in {wait_s:g} s (its methods' rank writes it)"
    ))  # fmt: skip
    return path, path.stat().st_mtime >= since


def _agreement_rows(
    prep: PreparedSource, methods: Sequence[str], cfg: SQEDConfig, out: Path, lo: int, hi: int, ranks: Ranks
) -> dict[str, np.ndarray]:
    """``<method>/agree_maps`` and ``<method>/agree_global`` of the pool rows ``[lo, hi)``."""
    device = _device(cfg.train.accelerator, ranks.local_rank)
    segs = [load_segmenter(out / "methods" / prep.name / m / "final.ckpt", map_location=device) for m in methods]
    parts = _AgreementRows(methods)
    loader = DataLoader(Subset(prep.pool_arrays, range(lo, hi)), batch_size=cfg.label.batch_size, shuffle=False)
    for batch in loader:
        x = batch["image"].to(device)
        # the scorer's own computation (rssqa.models.quality_inputs), so the cached values are the live ones
        parts.add([method_statistics(s, x, cfg.label.chunk, keep_probs=True) for s in segs], cfg.label.grid)
    return parts.arrays()


class _AgreementRows:
    """``<method>/agree_maps`` and ``<method>/agree_global`` of the batches of a pass, in pool order."""

    def __init__(self, methods: Sequence[str]):
        self.methods = list(methods)
        self.parts: dict[str, list[torch.Tensor]] = {f"{m}/{k}": [] for m in self.methods for k in ("agree_maps", "agree_global")}

    def add(self, stats: list[dict[str, torch.Tensor]], grid: int) -> None:
        """One batch: :func:`~rssqa.models.quality_inputs.agreement_inputs` of the methods' statistics (which
        pops their ``probs`` and ``pred``)."""
        for m, agreed in zip(self.methods, agreement_inputs(stats, grid), strict=True):
            for k, v in agreed.items():
                self.parts[f"{m}/{k}"].append(v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: torch.cat(v).numpy() for k, v in self.parts.items()}


def _join_parts(out: Path, prep: PreparedSource, fp: str, world_size: int, wait_s: float) -> dict[str, np.ndarray]:
    """The ranks' parts of the agreement of ``prep``, in pool order, once all are on disk
    (:func:`~rssqa.tasks.sqed.ranks.await_others`: ``wait_s`` without a new part is an error)."""
    n = len(prep.pool_ids)
    shares = [pool_share(n, Ranks(r, world_size)) for r in range(world_size)]
    wanted = [r for r, (lo, hi) in enumerate(shares) if hi > lo]
    if not wanted:
        raise RSSQAError(f"{agreement_path(out, prep.name)}: the pool of {prep.name} has no images")

    def missing() -> list[int]:
        return [r for r in wanted if not shard_matches(_part_path(out, prep.name, r, world_size), fp)]

    await_others(missing, wait_s, POLL_S, lambda late: (
        f"{agreement_path(out, prep.name)}: the agreement parts of ranks {list(late)} did not come in {wait_s:g} s "
        f"(are all WORLD_SIZE={world_size} ranks running?)"
    ))  # fmt: skip
    parts = [read_label_shard(_part_path(out, prep.name, r, world_size))[0] for r in wanted]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def agreement_columns(path: Path, prep: PreparedSource, method: str) -> dict[str, np.ndarray]:
    """The table's ``agreement`` and ``consensus`` of ``method`` for every pool image of ``prep``."""
    arrays, meta = read_label_shard(path)
    if meta["image_ids"] != prep.pool_ids:
        raise RSSQAError(f"{path}: its images do not match the pool of {prep.name}")
    glob = arrays[f"{method}/agree_global"]
    return {"agreement": glob[:, AGREEMENT_NAMES.index("share")], "consensus": glob[:, AGREEMENT_NAMES.index("majority")]}
