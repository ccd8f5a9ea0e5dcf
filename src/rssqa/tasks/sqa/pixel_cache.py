"""The seam's per-pixel outputs of a source's pool images, computed once and read by every pixel head of a run.

With group folds the stage trains a pixel error head per fold besides its own, and each reads every
method's softmax, arg-max and full-resolution agreement on its images: the same image comes back as one
fold's test area, another fold's val area and the stage's own split (on the Dubai profile, 12 passes of
the eight methods over 5 areas). :func:`fill_seam_cache` runs the methods once over a source's whole pool
through the one seam (:func:`~rssqa.tasks.sqa.pixel_rows.seam_pixels`) and keeps the outputs in the run's
cache folder, where :func:`open_seam_cache` maps them read-only from any process (the fit workers too),
until :func:`drop_seam_caches` removes them when the run's heads are done (1.5 GB on the Dubai profile).

The seam's encoders run in whole chunks (:mod:`rssqa.models.quality_inputs`), so an image's outputs are
the same bits whichever images share its pass: a head reading the cache gets what a live pass gives. A
cache is keyed by the methods' checkpoints, the pool's images, the chunk and the device kind; it is written under a
temporary name and renamed when complete, and it is not made when it would exceed its byte budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rssqa.agreement import MIN_METHODS
from rssqa.progress import line
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.pixel_rows import LABEL, Progress, methods_of, pixel_device, seam_pixels

FILES = ("probs", "pred", "agree")
META = "meta.json"


@dataclass(frozen=True)
class SeamCache:
    """One source's seam outputs, memory-mapped: ``probs`` ``N×M×C×H×W`` float32, ``pred`` ``N×M×H×W``
    uint8, ``agree`` ``N×M×3×H×W`` float32 (``None`` with fewer than three methods), rows in pool order,
    methods in ``methods`` order."""

    methods: tuple[str, ...]
    probs: np.ndarray
    pred: np.ndarray
    agree: np.ndarray | None

    def pixels(self, pool_rows: Sequence[int], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Per method, what the seam hands back for these pool rows (``probs``, ``pred`` as int64, ``agree``)."""
        rows = list(pool_rows)
        probs, pred = np.asarray(self.probs[rows]), np.asarray(self.pred[rows])
        agree = None if self.agree is None else np.asarray(self.agree[rows])
        out = []
        for j in range(len(self.methods)):
            one = {"probs": torch.from_numpy(np.ascontiguousarray(probs[:, j])).to(device),
                   "pred": torch.from_numpy(pred[:, j].astype(np.int64)).to(device)}  # fmt: skip
            if agree is not None:
                one["agree"] = torch.from_numpy(np.ascontiguousarray(agree[:, j])).to(device)
            out.append(one)
        return out


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cache_folder(data: SQADataModule, source: str, methods: Sequence[str]) -> Path | None:
    """Where the cache of ``source`` would be (``None`` when the data module has no cache folder): the name
    holds a key of every method's checkpoint, the pool's images, the segmenter chunk and the device kind."""
    if not data.hparams.cache_dir:
        return None
    key = {
        "sqed": str(Path(data.sqed.folder).resolve()),
        "device": pixel_device().type,
        "checkpoints": {m: _stamp(data.sqed.checkpoint(source, m)) for m in methods},
        "images": _stamp(data.sqed.folder / "pool" / source / "images.npy"),
        "chunk": data.inputs.seg_chunk,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data.hparams.cache_dir) / f"seam_{source}_{digest}"


def open_seam_cache(data: SQADataModule, source: str, methods: Sequence[str]) -> SeamCache | None:
    """The complete cache of ``source`` for these methods, or ``None`` when there is none."""
    folder = cache_folder(data, source, methods)
    if folder is None or not (folder / META).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    if meta["methods"] != list(methods):
        return None
    arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") if (folder / f"{k}.npy").is_file() else None for k in FILES}
    return SeamCache(tuple(methods), arrays["probs"], arrays["pred"], arrays["agree"])


def fill_seam_cache(data: SQADataModule, block: int, max_bytes: float) -> dict[str, str]:
    """Run the seam once over the whole pool of every source of ``data`` and keep its outputs (see the module).

    Args:
        data: the prepared data module (its ``cache_dir`` holds the caches).
        block: images per seam pass.
        max_bytes: the most the caches of all sources may take together (0: none is made). The size is
            known after the first pass of a source (its classes); a source that would go over is left out.

    Returns:
        ``{source: "made" | "found" | why none was made}``.
    """
    out: dict[str, str] = {}
    sources = methods_of(data)
    agreement = all(len(m) >= MIN_METHODS for m in sources.values())  # as the heads have it (run_pixel)
    used = 0.0
    for source, methods in sources.items():
        folder = cache_folder(data, source, methods)
        if folder is None or max_bytes <= 0:
            out[source] = "no cache folder" if folder is None else "off"
            continue
        if open_seam_cache(data, source, methods) is not None:
            out[source] = "found"
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        n = len(data.sqed.images(source))
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            arrays: dict[str, np.ndarray] = {}
            progress = Progress(f"seam cache of {source}", n * len(methods))
            for start, pixels in seam_pixels(data, source, methods, list(range(n)), agreement, block):
                if not arrays:
                    shapes = {k: tuple(pixels[0][k].shape[1:]) for k in FILES if k in pixels[0]}
                    size = sum(n * len(methods) * np.prod(shape) * (1 if k == "pred" else 4) for k, shape in shapes.items())
                    why = _refuse(size, used, max_bytes, folder.parent, shapes["probs"][0])
                    if why:
                        out[source] = why
                        line(LABEL, f"seam cache of {source}: none ({why}); the heads run the methods on its images")
                        break
                    used += size
                    for k, shape in shapes.items():
                        dtype = np.uint8 if k == "pred" else np.float32
                        arrays[k] = np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", dtype, (n, len(methods), *shape))
                stop = start + len(pixels[0]["pred"])
                for j, p in enumerate(pixels):
                    for k, arr in arrays.items():
                        arr[start:stop, j] = p[k].cpu().numpy()
                progress(stop * len(methods))
            if source in out:
                continue
            for arr in arrays.values():
                arr.flush()
            (tmp / META).write_text(json.dumps({"source": source, "methods": list(methods), "images": n}))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process made it meanwhile: theirs serves
                if open_seam_cache(data, source, methods) is None:
                    raise
            out[source] = "made"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _refuse(size: float, used: float, max_bytes: float, where: Path, classes: int) -> str | None:
    """Why a cache of ``size`` bytes is not made (``None``: it is)."""
    if used + size > max_bytes:
        return f"{(used + size) / 1e9:.2f} GB over the budget of {max_bytes / 1e9:.2f} GB (pixel.cache_gb)"
    if size > 0.5 * shutil.disk_usage(where).free:
        return f"{size / 1e9:.2f} GB, more than half the free disk of {where}"
    if classes > 255:  # the arg-max is kept as uint8
        return f"{classes} classes"
    return None


def drop_seam_caches(data: SQADataModule) -> None:
    """Remove the seam caches of ``data``'s sources (their heads are done; a rerun makes them again)."""
    for source, methods in methods_of(data).items():
        folder = cache_folder(data, source, methods)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
