"""Sources made ready for the units, and the fingerprints that tell a reusable file from a stale one.

:func:`prepare_source` opens and checks a source, splits its images (``seg`` trains the methods, the
pool is RS-SQED) and writes or reuses its pool arrays. The fingerprint helpers hash everything a
checkpoint or a label shard depends on (configuration, image lists, file sizes and times), so a rerun
reuses exactly the files that still match.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.data.segsets import SegArrays, SegSource, SegSubset, build_source
from rssqa.data.sqed import assign_splits
from rssqa.errors import RSSQAError
from rssqa.models.segmenters import MethodSpec, resolve_method
from rssqa.runs import atomic_write_json
from rssqa.tasks.sqed.config import SourceConfig, SQEDConfig


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed_for(seed: int, *names: str) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode())) % 2**31


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
    read = source.reading()  # how the files were read (absent: three 8-bit bands as they are): the scorer reads new images so
    listing = {
        "source": sc.name,
        "files": pool_files,
        "classes": list(source.classes),
        **({"read": read} if read else {}),
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
    stats: list[Any] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    # the same files read another way (resampled) are other pixels; empty by default, so the
    # fingerprints of sources read as they are stay what they were
    return _fingerprint(stats + ([source.read_options()] if source.read_options() else []))


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


def _label_fingerprint(train_fp: str, prep: PreparedSource, chunk: int) -> str:
    return _fingerprint({"task": train_fp, "pool": prep.pool_ids, "files": prep.pool_files, "chunk": chunk})
