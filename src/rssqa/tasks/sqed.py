"""Stage sqed: train the segmentation methods on each source, label the pool, write RS-SQED.

For every source: decode and check its samples, split its images (``seg`` trains the methods; the
rest, the pool, is RS-SQED's ``train``/``val``/``test``). For every (source, method), a *unit*: train
with a Lightning ``Trainer`` (seeded per unit, so a resumed run gives the numbers of an uninterrupted
one), then label every pool image: per-image OA against the ground truth, and what
:meth:`~rssqa.models.segmenters.Segmenter.describe` gives, written as one label shard. Checkpoints
and shards carry a fingerprint of everything they depend on; a rerun reuses those that match.

Many ranks, one code path. The units are independent, so a cluster run starts the same command
``W`` times (``make sqed NODES=.. GPUS=..``: srun or torchrun) and each process reads its rank from
the launcher's environment (:meth:`Ranks.from_env`). Rank ``r`` builds the units
:func:`assign_units` gives it, each on its own device, then rank 0 polls until every other unit's
checkpoint and label shard is on disk and writes the table, plots and summary from the shards, as a
one-process run does (which is the case ``W = 1``). Every rank prepares the sources it needs the
same way (the splits are a pure function of the source, the config and the seed); rank 0 alone
writes the shared files (pools, ``splits.json``, the table, the summary) and logs to W&B, every
rank writes the files of its own units. The units do not depend on which rank builds them or in
what order: each is seeded from its own name, and its fits and labelling set their own flags.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

from rssqa import progress
from rssqa.data.segsets import (
    IGNORE_INDEX,
    SegArrays,
    SegDataModule,
    SegSource,
    SegSubset,
    build_source,
    list_layouts,
)
from rssqa.data.sqed import (
    SPLITS,
    TABLE,
    assign_splits,
    oa_summary,
    plot_oa,
    read_label_shard,
    read_shard_meta,
    write_label_shard,
    write_table,
)
from rssqa.errors import RSSQAError
from rssqa.models.segmenters import (
    MAP_NAMES,
    MethodSpec,
    Segmenter,
    add_method_config,
    check_buildable,
    list_methods,
    resolve_method,
)
from rssqa.runs import atomic_write_json, write_summary
from rssqa.tracking import finish_runs, make_loggers, publish

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- config
@dataclass
class SourceConfig:
    """One segmentation source.

    Attributes:
        name: the source's name in the table.
        root: its folder; relative paths are resolved against the stage's ``data_root``.
        layout: registered layout (``rssqa.data.segsets.list_layouts()``); default ``name``.
        options: the layout's options (``patch_size``, ``palette``, ``unknown``, ``max_images``, ...).
    """

    name: str
    root: str
    layout: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """How the methods are trained.

    Attributes:
        epochs: the profile's epoch budget; a method trains ``round(epochs * epochs_scale)`` epochs.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        augment: random flips and right-angle rotations.
        in_memory: hold the training images in memory (else read them from disk each epoch).
        save_last: keep a resumable checkpoint after every epoch (long runs; costs disk time).
        accelerator: Lightning accelerator.
    """

    epochs: int = 4
    batch_size: int = 16
    num_workers: int = 0
    augment: bool = True
    in_memory: bool = True
    save_last: bool = False
    accelerator: str = "cpu"


@dataclass
class LabelConfig:
    """What is cached per (image, method).

    Attributes:
        grid: side of the pooled feature and probability-map grid.
        hist_bins: bins of the confidence, certainty and margin histograms.
        batch_size: images per prediction batch.
    """

    grid: int = 4
    hist_bins: int = 20
    batch_size: int = 32


@dataclass
class SQEDConfig:
    """The sqed stage.

    Attributes:
        sources: the segmentation sources.
        methods: registered method names (default all eight).
        method_configs: extra method JSON files to register first.
        size: method size (``tiny``, ``base``).
        method_overrides: method -> overrides (``encoder_name``, ``lr``, ``epochs_scale``, smp arguments).
        splits: share of each source's images (by split group) per split; ``seg`` trains the methods,
            the rest is RS-SQED.
        seed: the seed of splits and training.
        on_bad: ``error`` (stop at the first bad file) or ``skip`` (skip and count).
        train: training settings.
        label: labelling settings.
        wandb: ``offline``, ``online`` or ``disabled``.
        threads: torch CPU threads (0: leave torch's default).
    """

    sources: list[SourceConfig]
    methods: list[str] = field(default_factory=list)
    method_configs: list[str] = field(default_factory=list)
    size: str = "tiny"
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, float] = field(
        default_factory=lambda: {"seg": 0.4, "train": 0.36, "val": 0.12, "test": 0.12}
    )
    seed: int = 0
    on_bad: str = "error"
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    wandb: str = "offline"
    threads: int = 0


# -------------------------------------------------------------------------------------------- task
def per_image_oa(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overall accuracy of each image, ignore index excluded.

    Args:
        pred: ``B×H×W`` predicted class indices.
        target: ``B×H×W`` true class indices, :data:`IGNORE_INDEX` where unlabelled.
        num_classes: number of classes.

    Returns:
        OA ``B`` in [0, 1] (``nan`` for an image without labelled pixels) and labelled pixels ``B``.
    """
    n = (target != IGNORE_INDEX).flatten(1).sum(1)
    oa = multiclass_accuracy(
        pred, target, num_classes, average="micro", multidim_average="samplewise", ignore_index=IGNORE_INDEX
    ).double()
    return torch.where(n > 0, oa, torch.full_like(oa, float("nan"))), n


def random_dihedral(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip and rotate each image with its mask by one of the 8 symmetries of a square (torch RNG).

    Args:
        images: ``B×3×H×W``.
        masks: ``B×H×W``.
    """
    square = images.shape[-1] == images.shape[-2]
    ks = torch.randint(0, 8, (images.shape[0],))
    xs, ys = [], []
    for x, y, k in zip(images, masks, ks.tolist(), strict=True):
        if k >= 4:
            x, y = x.flip(-1), y.flip(-1)
        turns = k % 4 if square else 2 * (k % 2)
        xs.append(torch.rot90(x, turns, (-2, -1)))
        ys.append(torch.rot90(y, turns, (-2, -1)))
    return torch.stack(xs), torch.stack(ys)


class SegmentationTask(L.LightningModule):
    """Train one method on one source; label images with OA and cached statistics.

    Args:
        spec: the resolved method (``MethodSpec.as_dict()``), stored so a checkpoint rebuilds alone.
        num_classes: classes of the source.
        class_names: their names.
        grid: pooled grid side of the cached features.
        hist_bins: histogram bins of the cached statistics.
        augment: random dihedral augmentation in training.
        log_prefix: prefix of logged metric names (``<source>/<method>/``).
        fingerprint: what the training depended on (checked before a checkpoint is reused).
        load_weights: load the spec's local encoder weights (not when restoring a checkpoint).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        num_classes: int,
        class_names: Sequence[str] = (),
        grid: int = 4,
        hist_bins: int = 20,
        augment: bool = True,
        log_prefix: str = "",
        fingerprint: str = "",
        load_weights: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["load_weights"])
        self.spec = MethodSpec(**spec)
        self.segmenter = Segmenter(self.spec, num_classes, grid, hist_bins, load_weights=load_weights)
        self.loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.train_oa = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        if self.hparams.augment:
            x, y = random_dihedral(x, y)
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_oa(logits.argmax(1), y)
        p = self.hparams.log_prefix
        self.log(f"{p}train_loss", loss, prog_bar=True, batch_size=len(x))
        self.log(f"{p}train_oa", self.train_oa, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.segmenter.describe(batch["image"])
        logits = out.pop("logits")
        oa, n = per_image_oa(logits.argmax(1), batch["mask"], self.hparams.num_classes)
        return {"oa": oa.cpu(), "n_labelled": n.cpu(), **{k: v.float().cpu() for k, v in out.items()}}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=self.spec.lr,
            total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            pct_start=0.2,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_segmenter(path: str | os.PathLike, map_location: str = "cpu") -> Segmenter:
    """The trained :class:`Segmenter` of a sqed checkpoint, in eval mode.

    Args:
        path: ``methods/<source>/<method>/final.ckpt``.
    """
    return load_task(path, map_location).segmenter.eval()


def load_task(path: str | os.PathLike, map_location: str = "cpu") -> SegmentationTask:
    """A :class:`SegmentationTask` from its checkpoint, with a one-line error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise RSSQAError(f"{path}: segmenter checkpoint not found")
    try:
        # the checkpoint holds every weight: the encoder's initial weights file is not needed any more
        return SegmentationTask.load_from_checkpoint(path, map_location=map_location, load_weights=False)
    except Exception as e:  # noqa: BLE001 - torch.load and Lightning raise many kinds; all mean "not ours"
        raise RSSQAError(f"{path}: not a sqed segmenter checkpoint ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------- building
def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed_for(seed: int, *names: str) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode())) % 2**31


# ------------------------------------------------------------------------------------------ ranks
# (rank, world size, local rank) as torchrun sets them, then as srun does
_RANK_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
POLL_S = 2.0  # how often rank 0 looks for the other ranks' units


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-rank build.

    Attributes:
        rank: this process, in ``[0, world_size)``; rank 0 writes the table and the summary.
        world_size: processes building the units.
        local_rank: this process's index on its node: its GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """The ranks the launcher set: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else srun's
        ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, else one process.

        A shell in an interactive SLURM allocation (job name ``bash`` or ``interactive``) is one process,
        as Lightning has it.
        """
        env = os.environ if env is None else env
        torchrun, slurm = _RANK_ENV
        if torchrun[0] in env or torchrun[1] in env:
            keys = torchrun
        elif all(k in env for k in slurm[:2]) and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            keys = slurm
        else:
            return cls()
        rank, size, local = (_env_int(env, k) for k in keys)
        if size < 1 or not 0 <= rank < size or local < 0:
            raise RSSQAError(
                f"{keys[0]}: {rank} is not a rank of {keys[1]}={size} processes (local rank {local})"
            )
        return cls(rank, size, local)


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "0" if key in ("LOCAL_RANK", "SLURM_LOCALID") else None)
    if value is None:
        raise RSSQAError(f"{key}: not set, but the other rank variables of its launcher are")
    try:
        return int(value)
    except ValueError:
        raise RSSQAError(f"{key}: {value!r} is not an integer") from None


def assign_units(sources: Sequence[str], methods: Sequence[str], ranks: Ranks) -> list[tuple[str, str]]:
    """The (source, method) units that ``ranks.rank`` builds, in the order it builds them.

    Units are numbered method-major in config order, ``i = method_index * len(sources) + source_index``,
    and rank ``r`` of ``W`` owns those with ``i % W == r``: every unit has one owner, and when ``W`` is
    a multiple of the number of sources each rank meets one source only (decoded and checked once).
    A rank builds its units source by source, methods in config order, so that a source's training
    images are read once and freed before the next source's. With ``W = 1`` this is every unit, source
    by source: the table's row order.
    """
    return [
        (s, m)
        for s in sources
        for m in methods
        if _owner(sources, methods, s, m, ranks.world_size) == ranks.rank
    ]


def _owner(sources: Sequence[str], methods: Sequence[str], source: str, method: str, world_size: int) -> int:
    """The rank that builds a unit (see :func:`assign_units`)."""
    return (methods.index(method) * len(sources) + sources.index(source)) % world_size


def _devices(accelerator: str, local_rank: int) -> int | list[int]:
    """Lightning's ``devices`` for one rank's fits: one CPU process, or the rank's own GPU.

    Ranks sharing a node see all its GPUs (srun with ``--gpus-per-node``, torchrun) and take GPU
    ``local_rank``; a process that sees a single GPU was bound to it by its launcher and takes that one.
    """
    if not (accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())):
        return 1
    n = torch.cuda.device_count()
    if n == 1:
        return [0]
    if n and local_rank >= n:
        raise RSSQAError(f"LOCAL_RANK: {local_rank}, but this process sees {n} GPUs (one rank per GPU)")
    return [local_rank]


@dataclass
class PreparedSource:
    """A source ready for training and labelling (see :func:`prepare_source`)."""

    name: str
    source: SegSource
    seg: list[int]  # source indices of the method-training images
    pool: list[int]  # source indices of the RS-SQED images, in pool row order
    pool_ids: list[str]
    pool_splits: list[str]
    pool_groups: list[str]
    pool_arrays: SegArrays
    seg_files: str = ""  # fingerprint of the training files (names, sizes, modification times)
    pool_files: str = ""  # the same for the pool


def prepare_source(
    sc: SourceConfig, cfg: SQEDConfig, out: Path, data_root: Path | None, write_pool: bool = True
) -> PreparedSource:
    """Open and check a source, split it, and write (or reuse) its pool under ``out/pool/<name>/``.

    With ``write_pool=False`` (the ranks other than 0) a pool not yet on disk is read into memory and
    not written: one writer, so that no rank's memory-mapped pool is replaced under it.
    """
    root = Path(sc.root)
    if not root.is_absolute() and data_root is not None:
        root = data_root / root
    options = {"on_bad": cfg.on_bad, **sc.options}
    source = build_source(sc.layout or sc.name, root, name=sc.name, **options)
    good = source.check()
    groups = [source.samples[i].group for i in good]
    split_of = assign_splits({sc.name: groups}, cfg.splits, cfg.seed)[sc.name]
    seg = [i for i, g in zip(good, groups, strict=True) if split_of[g] == "seg"]
    pool = [i for i, g in zip(good, groups, strict=True) if split_of[g] != "seg"]
    if not seg or not pool:
        raise RSSQAError(
            f"{sc.name}: {len(good)} usable images give {len(seg)} for training the methods and {len(pool)} "
            "for RS-SQED; both need at least one (add images or change splits)"
        )
    samples = [source.samples[i] for i in pool]
    pool_ids = [s.image_id for s in samples]
    pool_splits = [split_of[s.group] for s in samples]
    folder = out / "pool" / sc.name
    pool_files = _files_fingerprint(source, pool)
    listing = {
        "source": sc.name,
        "files": pool_files,
        "classes": list(source.classes),
        "samples": [
            {
                "image_id": s.image_id,
                "group": s.group,
                "split": sp,
                "file": str(s.pair.image),
                "window": s.window,
            }
            for s, sp in zip(samples, pool_splits, strict=True)
        ],
    }
    arrays = _pool_arrays(folder, listing, source, pool, write_pool)
    return PreparedSource(
        sc.name,
        source,
        seg,
        pool,
        pool_ids,
        pool_splits,
        [s.group for s in samples],
        arrays,
        seg_files=_files_fingerprint(source, seg),
        pool_files=pool_files,
    )


def _files_fingerprint(source: SegSource, indices: Sequence[int]) -> str:
    # Regenerated data keeps its file names: sizes and modification times tell a stale cache apart.
    files = sorted({f for i in indices for f in (source.samples[i].pair.image, source.samples[i].pair.mask)})
    return _fingerprint([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def _pool_arrays(
    folder: Path, listing: dict[str, Any], source: SegSource, pool: list[int], write: bool = True
) -> SegArrays:
    index = folder / "samples.json"
    complete = index.is_file() and (folder / "images.npy").is_file() and (folder / "masks.npy").is_file()
    if complete and json.loads(index.read_text()) == json.loads(json.dumps(listing)):
        return SegArrays(
            np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r")
        )
    arrays = SegArrays.from_source(source, pool)
    if not write:
        return arrays
    folder.mkdir(parents=True, exist_ok=True)
    index.unlink(missing_ok=True)  # a stale index must not vouch for the arrays written next
    for name, a in (("images", arrays.images), ("masks", arrays.masks)):
        tmp = folder / f".{name}.npy.tmp"
        with tmp.open("wb") as f:
            np.save(f, a)
        os.replace(tmp, folder / f"{name}.npy")
    atomic_write_json(index, listing)  # last: its presence means the arrays are complete
    return arrays


def training_data(prep: PreparedSource, cfg: SQEDConfig) -> SegArrays | SegSubset:
    """The ``seg`` images of a source: in memory, or read from disk on demand (``train.in_memory``)."""
    return (
        SegArrays.from_source(prep.source, prep.seg)
        if cfg.train.in_memory
        else SegSubset(prep.source, prep.seg)
    )


def _train_fingerprint(
    prep: PreparedSource, method: str, cfg: SQEDConfig
) -> tuple[MethodSpec, int, int, str]:
    """What training ``method`` on ``prep`` depends on: its spec, epochs, seed and their fingerprint."""
    spec = resolve_method(method, cfg.size, cfg.method_overrides.get(method))
    epochs = spec.epochs(cfg.train.epochs)
    seed = _seed_for(cfg.seed, prep.name, method)
    seg_ids = [prep.source.samples[i].image_id for i in prep.seg]
    fp = _fingerprint(
        {
            "spec": spec.as_dict(),
            "classes": prep.source.classes,
            "epochs": epochs,
            "batch_size": cfg.train.batch_size,
            "augment": cfg.train.augment,
            "seed": seed,
            "seg": seg_ids,
            "seg_files": prep.seg_files,
            # the grid and bins live in the checkpoint, so that `rssqa score` caches what sqed cached
            "label": {"grid": cfg.label.grid, "hist_bins": cfg.label.hist_bins},
        }
    )
    return spec, epochs, seed, fp


def _label_fingerprint(train_fp: str, prep: PreparedSource) -> str:
    return _fingerprint({"task": train_fp, "pool": prep.pool_ids, "files": prep.pool_files})


def _shard_path(out: Path, source: str, method: str) -> Path:
    return out / "features" / source / f"{method}.safetensors"


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
    ranks: Ranks = Ranks(),
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
        deterministic=True,
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


def label_method(
    prep: PreparedSource,
    method: str,
    task: SegmentationTask,
    cfg: SQEDConfig,
    out: Path,
    ranks: Ranks = Ranks(),
) -> tuple[Path, bool]:
    """Label the pool of ``prep`` with ``method``: OA and cached statistics, one label shard.

    Returns:
        The shard's path and whether it was computed now (``False``: reused).
    """
    path = _shard_path(out, prep.name, method)
    fp = _label_fingerprint(task.hparams.fingerprint, prep)
    if path.is_file():
        try:
            if read_shard_meta(path).get("fingerprint") == fp:
                return path, False
        except RSSQAError:
            pass  # a foreign or torn file: compute it again
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
    batches = trainer.predict(task, dataloaders=loader)
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
        "map_names": list(MAP_NAMES),
        "feature_shapes": shapes,
        "spec": task.hparams.spec,
        "seconds": round(time.perf_counter() - t0, 3),  # segment + statistics, before writing
    }
    write_label_shard(path, arrays, meta)
    return path, True


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


def _wandb(cfg: SQEDConfig, out: Path) -> list[Logger]:
    """The W&B logger the methods' fits share (their CSV logs are per source and method)."""
    if cfg.wandb not in ("offline", "online", "disabled"):
        raise RSSQAError(f"wandb: {cfg.wandb!r}; choose offline, online or disabled")
    return make_loggers(out, "sqed", wandb=cfg.wandb != "disabled", csv=False)


def plan_sqed(cfg: SQEDConfig, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a configuration without reading data or training (a dry run).

    Registers ``method_configs``, resolves every method at ``size`` and checks that smp knows its
    architecture and encoder; checks splits and source names; with ``data_root``, checks that the
    source folders exist.

    Returns:
        ``{"methods": {name: {arch, encoder, epochs}}, "sources": {name: {layout, root, exists}}}``.
    """
    for path in cfg.method_configs:
        add_method_config(path)
    methods = cfg.methods or list_methods()
    if len(set(methods)) != len(methods):
        raise RSSQAError(f"methods: {methods} lists a method twice")
    unknown = set(cfg.method_overrides) - set(methods)
    if unknown:
        raise RSSQAError(f"method_overrides: {sorted(unknown)} are not among the methods {methods}")
    plan: dict[str, Any] = {"methods": {}, "sources": {}}
    for m in methods:
        spec = resolve_method(m, cfg.size, cfg.method_overrides.get(m))
        check_buildable(spec)
        plan["methods"][m] = {
            "arch": spec.arch,
            "encoder": spec.encoder_name,
            "epochs": spec.epochs(cfg.train.epochs),
        }
    if set(cfg.splits) - set(SPLITS) or "seg" not in cfg.splits:
        raise RSSQAError(f"splits: keys must be among {SPLITS} and include seg; got {sorted(cfg.splits)}")
    assign_splits({}, cfg.splits)  # checks the fractions
    if cfg.on_bad not in ("error", "skip"):
        raise RSSQAError(f"on_bad: {cfg.on_bad!r}; choose error or skip")
    names = [s.name for s in cfg.sources]
    if not names or len(set(names)) != len(names):
        raise RSSQAError(f"sources: need one or more, with distinct names; got {names}")
    for sc in cfg.sources:
        layout = sc.layout or sc.name
        if layout not in list_layouts():
            raise RSSQAError(f"sources: {sc.name}: layout {layout!r} unknown; choose from {list_layouts()}")
        root = Path(sc.root)
        if not root.is_absolute() and data_root is not None:
            root = Path(data_root) / root
        plan["sources"][sc.name] = {"layout": layout, "root": str(root), "exists": root.is_dir()}
    return plan


def build_sqed(
    cfg: SQEDConfig,
    out: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    *,
    ranks: Ranks | None = None,
    wait_s: float = 86400.0,
) -> dict[str, Any]:
    """Build this rank's units of RS-SQED under ``out``; on rank 0, then the table and ``summary.json`` (last).

    Args:
        cfg: the stage configuration.
        out: the run folder (``runs/<profile>/sqed``).
        data_root: base of relative source roots (default: ``out``'s parent, i.e. ``runs/<profile>``).
        ranks: this process's rank (default :meth:`Ranks.from_env`; one process unless a launcher set
            ranks). Rank ``r`` builds the units of :func:`assign_units`.
        wait_s: rank 0 gives up (``RSSQAError`` naming the missing units) when none of the other
            ranks' units has finished for this many seconds.

    Returns:
        On rank 0 the summary: keys of shared/DESIGN.md plus timings, counts and bad samples, where
        ``units``, ``trained``, ``reused_checkpoints``, ``labelled``, ``reused_shards``, ``train_s`` and
        ``label_s`` cover rank 0's own units (all of them in a one-process run). On another rank its
        report: ``rank``, ``world_size``, ``units`` (``{"<source>/<method>": {trained, labelled}}``),
        the same counts and ``seconds``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    data_root = Path(data_root) if data_root is not None else out.parent
    ranks = Ranks.from_env() if ranks is None else ranks
    lead = ranks.rank == 0
    if not lead:
        # Lightning read this rank from the environment at import, as for a DDP job, and keeps its
        # rank-zero-only writers (the CSV logs) silent elsewhere; here each rank runs its own fits
        rank_zero_only.rank = 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods = list(plan_sqed(cfg)["methods"])
    names = [sc.name for sc in cfg.sources]
    mine = assign_units(names, methods, ranks)
    # rank 0 prepares every source (it writes the table) and alone writes the pools; the others
    # prepare only the sources of their units, in the same way
    needed = set(names) if lead else {s for s, _ in mine}
    preps = {
        sc.name: prepare_source(sc, cfg, out, data_root, write_pool=lead)
        for sc in cfg.sources
        if sc.name in needed
    }
    if lead:
        atomic_write_json(
            out / "splits.json",
            {p.name: dict(zip(p.pool_ids, p.pool_splits, strict=True)) for p in preps.values()}
            | {"_seg": {p.name: [p.source.samples[i].image_id for i in p.seg] for p in preps.values()}},
        )
    t_prep = time.perf_counter()
    loggers = _wandb(cfg, out) if lead else []
    units: dict[str, dict[str, bool]] = {}
    timing = {
        "train_s": 0.0,
        "label_s": 0.0,
        "trained": 0,
        "reused_checkpoints": 0,
        "labelled": 0,
        "reused_shards": 0,
    }
    shard_bytes, recorded = 0, {"train_s": 0.0, "train_images": 0, "label_s": 0.0, "label_rows": 0}
    try:
        for name, group in itertools.groupby(mine, key=lambda unit: unit[0]):
            prep = preps[name]
            # read only if a method needs training, then shared by the source's methods, then freed
            data = functools.cache(functools.partial(training_data, prep, cfg))
            for _, method in group:
                t = time.perf_counter()
                task, trained = train_method(prep, method, cfg, out, loggers, data, ranks)
                timing["train_s"] += time.perf_counter() - t
                timing["trained" if trained else "reused_checkpoints"] += 1
                t = time.perf_counter()
                _, labelled = label_method(prep, method, task, cfg, out, ranks)
                timing["label_s"] += time.perf_counter() - t
                timing["labelled" if labelled else "reused_shards"] += 1
                units[f"{name}/{method}"] = {"trained": trained, "labelled": labelled}
                done = len(units)
                elapsed = time.perf_counter() - t_prep
                of_rank = f" of rank {ranks.rank}" if ranks.world_size > 1 else ""
                progress.line("sqed", f"{name}/{method} {'trained' if trained else 'reused'}: unit {done}/{len(mine)}"
                                      f"{of_rank}, {elapsed:.0f} s{progress.eta(done, len(mine), elapsed)}")  # fmt: skip
        timing = {k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()}
        if not lead:
            return {"rank": ranks.rank, "world_size": ranks.world_size, "units": units, **timing,
                    "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        t_wait = time.perf_counter()
        others = [(preps[s], m) for s in names for m in methods if f"{s}/{m}" not in units]
        _await_units(others, cfg, out, names, methods, ranks.world_size, wait_s)
        t_wait = time.perf_counter() - t_wait
        # the table, source by source and method by method, from the shards whichever rank wrote them
        rows: list[dict[str, Any]] = []
        for prep in preps.values():
            for method in methods:
                path = _shard_path(out, prep.name, method)
                shard_bytes += path.stat().st_size
                for k, v in _recorded(out, prep, method, path).items():
                    recorded[k] += v
                new_rows = _rows(prep, method, path, out)
                log.info("%s/%s: mean OA %.3f", prep.name, method, np.mean([r["oa"] for r in new_rows]))
                rows += new_rows
    except BaseException:
        finish_runs(loggers)
        raise
    write_table(out / TABLE, rows)
    plot_oa(rows, out / "oa_distributions.png")
    summary = {
        **oa_summary(rows),
        "methods": methods,
        "sources": {
            p.name: {
                "layout": next(s.layout or s.name for s in cfg.sources if s.name == p.name),
                "classes": list(p.source.classes),
                "n_samples": len(p.source),
                "n_seg_train": len(p.seg),
                "n_pool": len(p.pool),
                "n_bad": len(p.source.bad),
                "n_unlabelled": len(p.source.unlabelled),
                "bad": [str(b) for b in p.source.bad[:20]],
            }
            for p in preps.values()
        },
        "n_bad": sum(len(p.source.bad) for p in preps.values()),
        "feature_bytes_per_row": shard_bytes / max(len(rows), 1),
        # as recorded when each checkpoint and shard was made, so a resumed run reports the same
        "rows_labelled_per_s": _rate(recorded["label_rows"], recorded["label_s"]),
        "train_images_per_s": _rate(recorded["train_images"], recorded["train_s"]),
        "train_s_recorded": _finite(recorded["train_s"]),
        "label_s_recorded": _finite(recorded["label_s"]),
        **timing,
        "units": units,
        "world_size": ranks.world_size,
        "prepare_s": round(t_prep - t0, 2),
        "waited_s": round(t_wait, 2),  # for the other ranks' units
        "seconds": round(time.perf_counter() - t0, 2),
        "config": asdict(cfg),
    }
    per_method = [[m, summary["per_method_oa"].get(m), summary["wins"].get(m, 0)] for m in methods]
    publish(
        loggers, "sqed", {k: v for k, v in summary.items() if k not in ("config", "sources")},
        tables={"per_method": (["method", "oa_mean", "images_won"], per_method)},
        images={"oa_distributions": out / "oa_distributions.png"},
    )  # fmt: skip
    write_summary(out, summary)
    return summary


def _unit_done(out: Path, source: str, method: str, label_fp: str) -> bool:
    """Whether a unit's checkpoint and its label shard of this configuration are on disk (both are
    written atomically, the shard last)."""
    if not (_unit_folder(out, source, method) / "final.ckpt").is_file():
        return False
    try:
        return read_shard_meta(_shard_path(out, source, method)).get("fingerprint") == label_fp
    except RSSQAError:
        return False


def _await_units(
    units: Sequence[tuple[PreparedSource, str]],
    cfg: SQEDConfig,
    out: Path,
    sources: Sequence[str],
    methods: Sequence[str],
    world_size: int,
    wait_s: float,
) -> None:
    """Poll (every :data:`POLL_S` s) until the other ranks' ``units`` are done (see :func:`_unit_done`).

    Raises:
        RSSQAError: none of them finished for ``wait_s`` seconds; names those missing and their ranks.
    """
    pending = {
        f"{p.name}/{m}": (p.name, m, _label_fingerprint(_train_fingerprint(p, m, cfg)[3], p))
        for p, m in units
    }
    if not pending:
        return
    # SLURM signals every task before the time limit; the ranks still training then checkpoint and
    # requeue the job: rank 0, idle here, must not end first (srun would end the job, no requeue)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        progress = time.monotonic()
        while True:
            done = [k for k, unit in pending.items() if _unit_done(out, *unit)]
            for k in done:
                del pending[k]
            if not pending:
                return
            if done:
                progress = time.monotonic()
            elif time.monotonic() - progress > wait_s:
                missing = ", ".join(
                    f"{k} (rank {_owner(sources, methods, s, m, world_size)})"
                    for k, (s, m, _) in pending.items()
                )
                raise RSSQAError(
                    f"{out}: no unit of the other ranks finished in {wait_s:g} s; missing {missing} "
                    f"(are all WORLD_SIZE={world_size} ranks running?)"
                )
            time.sleep(POLL_S)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _recorded(out: Path, prep: PreparedSource, method: str, shard: Path) -> dict[str, float]:
    """Times and amounts recorded when a method's checkpoint and label shard were made."""
    record = out / "methods" / prep.name / method / "train.json"
    trained = json.loads(record.read_text()) if record.is_file() else {}
    return {
        "label_s": read_shard_meta(shard).get("seconds", math.nan),
        "label_rows": len(prep.pool),
        "train_s": trained.get("seconds", math.nan),
        "train_images": trained.get("images", 0) * trained.get("epochs", 0),
    }


def _finite(x: float) -> float | None:
    # parts built by an older version carry no timing: say "unknown", not NaN (invalid JSON)
    return round(x, 2) if math.isfinite(x) else None


def _rate(n: float, seconds: float) -> float | None:
    return round(n / seconds, 2) if math.isfinite(seconds) and seconds > 0 else None
