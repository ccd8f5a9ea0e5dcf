"""The pixel error head's rows: per-pixel inputs and targets of RS-SQED's (image, method) rows.

For the images of a split, the methods of the image's source run through the one seam
(:class:`rssqa.models.quality_inputs.QualityInputs` with ``pixels=True``), which hands back each
method's softmax and its full-resolution agreement with the others (weighted by the others' predicted
quality when the scores are given); :func:`rssqa.models.pixel_error.pixel_inputs` turns them into
per-pixel channels and the target is ``pred != mask`` where the mask is labelled (255, the ignore
index, is left out of the loss and of every metric). Used by :mod:`rssqa.tasks.sqa.pixel`.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rssqa.agreement import quality_agreement_maps
from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import pixel_inputs
from rssqa.models.segmenters import Segmenter, load_segmenter
from rssqa.progress import eta, line
from rssqa.tasks.sqa.data import SQADataModule

IGNORE = 255  # the ignore index of RS-SQED's masks
LABEL = "sqa/pixel"
Scores = Mapping[tuple[int, str], float]  # (data image index, method) -> the recommender's predicted OA
MIN_VAL_IMAGES = 2  # per source, to train on some val images and choose the epoch on others


def pixel_device() -> torch.device:
    """Where the methods run and the head trains: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Progress:
    """``[sqa/pixel] what done/total unit, eta`` at most every ``every_s`` seconds, and at the end."""

    def __init__(self, what: str, total: int, unit: str = "rows", every_s: float = 10.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if done >= self.total or now - self.last >= self.every_s:
            self.last = now
            line(LABEL, f"{self.what} {done}/{self.total} {self.unit}{extra}{eta(done, self.total, now - self.t0)}")


# --------------------------------------------------------------------------------------- the rows
@dataclass
class Rows:
    """Per-pixel inputs of (image, method) rows at full resolution.

    ``x``: ``8×H×W`` per row (:func:`~rssqa.models.pixel_error.pixel_inputs`), float16 (stored rows serve training and epoch selection; the test
    split is scored on the float32 inputs, as the scorer computes them); ``target``: ``H×W`` uint8
    per row (0 right, 1 wrong, 255 unlabelled); ``image``: the data module's image index (for the
    tokens); ``method``: index into the data module's methods; ``source``: the source's name.
    """

    x: list[torch.Tensor]
    target: list[torch.Tensor]
    image: list[int]
    method: list[int]
    source: list[str]


def choose_images(data: SQADataModule, source: str, split: str, n: int, seed: int) -> list[tuple[int, int]]:
    """``(pool image_row, data image index)`` of ``n`` seeded images of ``split`` in ``source`` (0: all); the
    split is the data module's (``data.split_of``, RS-SQED's own unless a fold or a held-out source set it)."""
    key_index = {k: i for i, k in enumerate(data.image_keys)}
    rows = {
        r["key"]: r["image_row"] for r, sp in zip(data.sqed.rows, data.split_of, strict=True) if r["source"] == source and sp == split
    }  # fmt: skip
    keys = sorted(rows, key=lambda k: rows[k])
    if n and n < len(keys):
        pick = np.random.default_rng([seed, zlib.crc32(f"{source}/{split}".encode())]).permutation(len(keys))[:n]
        keys = [keys[i] for i in sorted(pick)]
    return [(rows[k], key_index[k]) for k in keys]


def methods_of(data: SQADataModule) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for r in data.sqed.rows:
        out.setdefault(r["source"], set()).add(r["method"])
    return {s: sorted(m) for s, m in sorted(out.items())}


def partition_val(data: SQADataModule, source: str, n_train: int, n_select: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The val split's images of ``source`` in two disjoint seeded parts: ``n_select`` to choose the
    epoch (0: a quarter) and up to ``n_train`` of the rest to train on (0: all of the rest)."""
    keys = choose_images(data, source, "val", 0, seed)
    if len(keys) < MIN_VAL_IMAGES:
        raise RSSQAError(
            f"{data.sqed.folder}: {source} has {len(keys)} val-split images; the pixel error head with quality weights needs at least {MIN_VAL_IMAGES}"
        )
    order = np.random.default_rng([seed, zlib.crc32(f"{source}/partition".encode())]).permutation(len(keys))
    n_select = min(n_select or max(1, len(keys) // 4), len(keys) - 1)
    rest = order[n_select:]
    train = rest[:n_train] if n_train else rest  # a seeded draw of the rest, not its first images
    return [keys[i] for i in sorted(train)], [keys[i] for i in sorted(order[:n_select])]


# The methods the seam passes of this process loaded, kept for its next pass (a head's train, val and test
# passes, and every later head, run the same methods of each source): at most KEEP_BYTES of their weights,
# the least recently used let go first. Keyed by the checkpoint's path, size and time, and the device.
KEEP_BYTES = 2 * 2**30
_loaded: OrderedDict[tuple, tuple[Segmenter, int]] = OrderedDict()


def loaded_segmenter(path: str | os.PathLike, device: torch.device) -> Segmenter:
    """:func:`~rssqa.models.segmenters.load_segmenter` of ``path`` on ``device``, loaded once per process while
    it stays among the last :data:`KEEP_BYTES` of loaded weights (the seam only reads it: eval mode, no
    gradient); a checkpoint written again since is loaded again."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return load_segmenter(path, map_location=device)  # its own one-line error
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(device))
    hit = _loaded.pop(key, None)
    if hit is None:
        seg = load_segmenter(path, map_location=device)
        hit = (seg, sum(t.numel() * t.element_size() for t in seg.state_dict().values()))
    _loaded[key] = hit
    while len(_loaded) > 1 and sum(n for _, n in _loaded.values()) > KEEP_BYTES:
        _loaded.popitem(last=False)
    return hit[0]


def seam_pixels(
    data: SQADataModule, source: str, methods: Sequence[str], pool_rows: Sequence[int], agreement: bool, block: int
) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Per block of ``pool_rows``: its offset in ``pool_rows`` and, per method, the seam's per-pixel outputs
    (:class:`~rssqa.models.quality_inputs.QualityInputs` with ``pixels=True``: ``probs``, ``pred`` and, with
    ``agreement``, ``agree``), read from the source's seam cache when the run made one
    (:mod:`rssqa.tasks.sqa.pixel_cache`; the same numbers), else computed by the methods here."""
    from rssqa.tasks.sqa.pixel_cache import open_seam_cache  # that module builds on this one

    cache = open_seam_cache(data, source, methods)
    if cache is not None and agreement and cache.agree is None:
        cache = None
    inputs = replace(data.inputs, grid=data.grid, feat_dim=0)
    block = -(-block // inputs.seg_chunk) * inputs.seg_chunk  # whole segmenter chunks: no padded forwards
    if cache is None:
        segmenters = [loaded_segmenter(data.sqed.checkpoint(source, m), pixel_device()) for m in methods]
        images = data.sqed.images(source)
    for start in range(0, len(pool_rows), block):
        part = list(pool_rows[start : start + block])
        if cache is not None:
            yield start, cache.pixels(part, pixel_device())
            continue
        imgs = np.ascontiguousarray(images[part])
        yield start, inputs(imgs, segmenters, None, [0] * len(segmenters), agreement=agreement, pixels=True)["pixels"]


def seam_blocks(
    data: SQADataModule, source: str, methods: Sequence[str], chosen: Sequence[tuple[int, int]], agreement: bool, block: int,
    quality: Scores | None = None, power: float = 0.0,
) -> Iterator[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per block of images: their data image indices and, per method, :func:`pixel_inputs` ``B×8×H×W``
    with the target ``B×H×W`` (uint8: 1 wrong, 0 right, 255 unlabelled); the block's methods all go
    through the one seam at once (:func:`seam_pixels`; agreement between them included; weighted by
    ``quality``, the predicted OA of each (image, method), when given)."""
    masks = data.sqed.masks(source)
    for start, pixels in seam_pixels(data, source, methods, [r for r, _ in chosen], agreement, block):
        part = chosen[start : start + len(pixels[0]["pred"])]
        mask = torch.from_numpy(np.ascontiguousarray(masks[[r for r, _ in part]]))
        if mask.shape != pixels[0]["pred"].shape:
            raise RSSQAError(f"{data.sqed.folder}/pool/{source}: masks {tuple(mask.shape)} do not fit images {tuple(pixels[0]['pred'].shape)}")
        weighted = [None] * len(methods)
        if quality is not None and power > 0:
            try:
                q = torch.tensor([[quality[(i, m)] for m in methods] for _, i in part])
            except KeyError as e:
                raise RSSQAError(f"pixel error head: no predicted quality for (image, method) {e.args[0]} of {source}") from None
            weighted = quality_agreement_maps([p["probs"] for p in pixels], [p["pred"] for p in pixels], q, power)
        per_method = []
        for p, w in zip(pixels, weighted, strict=True):
            x = pixel_inputs(p["probs"].cpu(), p["agree"].cpu() if agreement else None, None if w is None else w.cpu())
            wrong = (p["pred"].cpu() != mask.long()).to(torch.uint8)
            per_method.append((x, torch.where(mask == IGNORE, torch.full_like(wrong, IGNORE), wrong)))
        yield [i for _, i in part], per_method


def _accuracy(target: torch.Tensor) -> float:
    """Share of the labelled pixels of one row that are right (0 with none labelled)."""
    lab = target != IGNORE
    return float((target[lab] == 0).float().mean()) if lab.any() else 0.0


def collect_rows(
    data: SQADataModule, plan: Mapping[str, Sequence[tuple[int, int]]], what: str, agreement: bool, block: int,
    top: int = 0, quality: Scores | None = None, power: float = 0.0,
) -> Rows:
    """Per-pixel inputs and targets on the images ``plan`` names per source (:func:`choose_images`): of every
    method, or of each image's ``top`` most accurate methods when ``top`` is positive."""
    rows = Rows([], [], [], [], [])
    progress = Progress(f"{what} inputs", sum(len(c) * len(methods_of(data)[s]) for s, c in plan.items()))
    done = 0
    for source, methods in methods_of(data).items():
        blocks = seam_blocks(data, source, methods, plan[source], agreement, block, quality, power)
        for image_idx, per_method in blocks:
            keep = np.ones((len(image_idx), len(methods)), bool)
            if 0 < top < len(methods):
                acc = np.array([[_accuracy(t[b]) for _, t in per_method] for b in range(len(image_idx))])
                keep[:] = False
                np.put_along_axis(keep, np.argsort(-acc, axis=1, kind="stable")[:, :top], True, axis=1)
            for k, (m, (x, t)) in enumerate(zip(methods, per_method, strict=True)):
                for b, img in enumerate(image_idx):
                    if not keep[b, k]:
                        continue
                    rows.x.append(x[b].half())
                    rows.target.append(t[b].clone())
                    rows.image.append(img)
                    rows.method.append(data.methods.index(m))
                    rows.source.append(source)
            done += len(image_idx) * len(methods)
            progress(done)
    if not rows.x:
        raise RSSQAError(f"{data.sqed.folder}: no {what} images for the pixel error head")
    return rows
