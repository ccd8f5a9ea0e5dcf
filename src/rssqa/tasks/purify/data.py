"""Prediction data of the purify stage: shard-aligned batches of the input shards a rank still owes.

:class:`SamplePrep` turns a sample's raw tar members into model inputs (in the DataLoader workers),
:class:`ShardBatches` groups them into batches that never span shards, and :class:`PendingShards` is
the LightningDataModule of one pass: this rank's input shards that have no done-marker yet.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rssqa.data.caption_rules import RuleConfig, check_caption, normalize_caption
from rssqa.data.shards import IMAGE_EXTS, decode_sample, tar_samples
from rssqa.errors import BadSample
from rssqa.tasks.purify.writers import shard_name

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ============================================================================================ prediction data
@dataclass
class SamplePrep:
    """Worker-side preparation of one raw sample for the filter (and the captioner).

    Attributes:
        filter_transform: the filter's evaluation preprocessing (PIL -> ``3×S×S``).
        captioner_transform: the captioner's, or None when it equals the filter's.
        tokenizer: the filter's tokenizer.
        rules: the caption rules.
    """

    filter_transform: Callable
    captioner_transform: Callable | None
    tokenizer: Callable
    rules: RuleConfig

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw tar members -> a prepared sample; raises :class:`BadSample`."""
        sample = decode_sample(raw, decode_images=True)
        ext = next(e for e in IMAGE_EXTS if e in raw)
        pil = Image.fromarray(sample["image"])
        clean = normalize_caption(sample["txt"])
        return {
            "key": sample["__key__"],
            "ext": ext,
            "image": raw[ext],
            "caption": sample["txt"],
            "clean": clean,
            "rule": check_caption(clean, self.rules),
            "meta": sample["json"],
            "pixels": self.filter_transform(pil),
            "cap_pixels": None if self.captioner_transform is None else self.captioner_transform(pil),
        }


class ShardBatches(IterableDataset):
    """Shard-aligned batches of the shards given to this rank, split over DataLoader workers.

    Every batch holds samples of one shard only, in shard order, so a sample meets the same batch
    however many shards were done before (resume) and whichever worker reads it. Bad samples travel
    with the batch they occurred in (``bad``: list of (key, reason)). The last batch of a shard has
    ``last=True`` (a shard with no good sample still yields one, empty, batch).

    Args:
        shards: ``(input index, url)`` pairs this rank must process.
        prep: the worker-side preparation.
        batch_size: good samples per batch.
    """

    def __init__(self, shards: Sequence[tuple[int, str]], prep: SamplePrep, batch_size: int):
        super().__init__()
        self.shards, self.prep, self.batch_size = list(shards), prep, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for index, url in mine:
            yield from self._shard(index, url)

    def _shard(self, index: int, url: str) -> Iterator[dict[str, Any]]:
        good: list[dict[str, Any]] = []
        bad: list[tuple[str, str]] = []
        for raw in tar_samples([url]):
            try:
                good.append(self.prep(raw))
            except BadSample as e:
                log.warning("skipped sample %r in %s: %s", e.key, e.source, e.reason)
                bad.append((e.key, _ADDRESS.sub("", e.reason)))  # markers must not depend on memory layout
            if len(good) == self.batch_size:
                yield self._collate(index, url, good, bad, last=False)
                good, bad = [], []
        yield self._collate(index, url, good, bad, last=True)

    def _collate(self, index: int, url: str, good: list[dict], bad: list[tuple[str, str]], last: bool) -> dict[str, Any]:
        batch: dict[str, Any] = {"shard": index, "url": url, "last": last, "bad": bad}
        for k in ("key", "ext", "image", "caption", "clean", "rule", "meta"):
            batch[k] = [s[k] for s in good]
        batch["pixels"] = torch.stack([s["pixels"] for s in good]) if good else torch.zeros(0)
        batch["cap_pixels"] = (
            torch.stack([s["cap_pixels"] for s in good]) if good and good[0]["cap_pixels"] is not None else None
        )
        return batch


class PendingShards(L.LightningDataModule):
    """Prediction data of one pass: this rank's input shards that have no marker in ``folder`` yet.

    Input shard ``i`` belongs to rank ``i % world_size`` (a fixed owner, so ranks never race on a
    shard); the list is made when the pass starts, after the processes are launched.
    """

    def __init__(self, inputs: Sequence[str], folder: Path, prep: SamplePrep, batch_size: int, num_workers: int):
        super().__init__()
        self.inputs, self.folder, self.prep = list(inputs), folder, prep
        self.batch_size, self.num_workers = batch_size, num_workers

    def pending(self, rank: int, world_size: int) -> list[tuple[int, str]]:
        """``(index, url)`` of the shards of ``rank`` without a marker."""
        return [
            (i, u) for i, u in enumerate(self.inputs)
            if i % world_size == rank and not (self.folder / f"{shard_name(i)}.json").is_file()
        ]  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        todo = self.pending(self.trainer.global_rank, self.trainer.world_size)
        workers = min(self.num_workers, len(todo))
        return DataLoader(ShardBatches(todo, self.prep, self.batch_size), batch_size=None, num_workers=workers)
