"""Image-text corpus for contrastive pretraining: WebDataset shards in, ready batches out, resumable.

Training data are the purify stage's shards (``txt`` = the chosen caption) or, for the ablation, the
world's raw corpus; both go through :func:`rssqa.data.shards.shard_pipeline`. Shards are drawn with
replacement (``resampled``, the usual choice at scale) or read in passes; an epoch is a set number of
samples, not a pass.

Reproducible and resumable: the stream of a (rank, worker) is a pure function of ``(seed, epoch)``, and
the position in it follows the trainer's global step. A run restarted from a mid-epoch checkpoint skips
the batches it already trained on (decoding but not training them) and then sees exactly the batches an
uninterrupted run sees. Resuming needs the same world size, number of workers and batch size.

Validation sets are held out from the corpus and kept in memory: zero-shot scene classification and
trusted image-caption pairs from :mod:`rssqa.world`, and optionally a real labelled image folder.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rssqa.data.augment import RandomDihedral
from rssqa.data.shards import iter_shard, list_shards, read_sizes, shard_pipeline
from rssqa.errors import RSSQAError
from rssqa.models.clip import InputSpec, normalise_pixels

MAX_BAD_RUN = 10_000  # this many unusable samples in a row means the input is broken, not noisy


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an ``H×W×3`` uint8 image to a square and resize it to ``size`` (bilinear); a no-op at size."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def collate_pairs(
    images: Sequence[np.ndarray], texts: Sequence[str], spec: InputSpec
) -> dict[str, torch.Tensor]:
    """Stack ``H×W×3`` uint8 images and captions into model input: ``image`` ``B×3×S×S`` float32, ``text`` ``B×L`` int64."""
    pixels = torch.from_numpy(np.stack([fit_square(im, spec.image_size) for im in images]))
    return {
        "image": normalise_pixels(pixels, spec.image_size, spec.mean, spec.std),
        "text": spec.tokenizer(list(texts)),
    }


def _mix(*parts: Any) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class CorpusStream(IterableDataset):
    """Batches of one rank for one epoch: ``{"image", "text", "__key__", "n_bad"}``.

    Args:
        shards: anything :func:`rssqa.data.shards.list_shards` accepts.
        spec: model input (size, normalisation, tokenizer).
        batch_size: samples per batch (per rank).
        batches_per_epoch: batches per rank per epoch; DataLoader worker ``w`` of ``W`` makes batches
            ``w, w + W, ...`` so the loader delivers them in order.
        seed: stream seed.
        resampled: draw shards with replacement; otherwise read them in passes (each rank and worker
            its own shards), starting a new shuffled pass when one ends.
        shuffle: sample shuffle buffer (0 = shard order).
        augment: random 90-degree rotations and flips (:class:`RandomDihedral`).

    ``epoch`` and ``start_batch`` are set by :class:`EpochLoader` before each iteration. ``n_bad`` is the
    number of unusable samples skipped while filling the batch.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        spec: InputSpec,
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        resampled: bool = True,
        shuffle: int = 1000,
        augment: bool = True,
    ):
        self.urls = list_shards(shards)
        self.spec, self.batch_size, self.batches_per_epoch = spec, batch_size, batches_per_epoch
        self.seed, self.resampled, self.shuffle = seed, resampled, shuffle
        self.augment = RandomDihedral(seed, enabled=augment)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(worker, self.batches_per_epoch, n_workers)
        skip = sum(1 for j in mine if j < self.start_batch)
        self.augment.epoch = self.epoch
        samples = self._samples()
        for index in range(len(mine)):
            images, texts, keys, n_bad = self._fill(samples)
            if index < skip:
                continue
            batch = collate_pairs(images, texts, self.spec)
            yield {**batch, "__key__": keys, "n_bad": n_bad}

    def _fill(self, samples: Iterator[dict[str, Any]]) -> tuple[list, list, list, int]:
        images, texts, keys, n_bad, bad_run = [], [], [], 0, 0
        while len(keys) < self.batch_size:
            sample = next(samples)
            if "__bad__" in sample:
                n_bad, bad_run = n_bad + 1, bad_run + 1
                if bad_run >= MAX_BAD_RUN:
                    raise RSSQAError(
                        f"{sample['__url__']}: {MAX_BAD_RUN} unusable samples in a row "
                        f"(last {sample['__key__']!r}: {sample['__bad__']})"
                    )
                continue
            bad_run = 0
            images.append(self.augment(sample["image"], sample["__key__"]))
            texts.append(sample["txt"])
            keys.append(sample["__key__"])
        return images, texts, keys, n_bad

    def _samples(self) -> Iterator[dict[str, Any]]:
        for pass_ in itertools.count():
            pipeline = shard_pipeline(
                self.urls,
                shuffle=self.shuffle,
                seed=_mix(self.seed, self.epoch, pass_),
                epoch=self.epoch,
                resampled=self.resampled,
                on_bad="mark",
            )
            n_good = 0
            for sample in pipeline:
                n_good += "__bad__" not in sample
                yield sample
            if n_good == 0:  # a whole pass without one usable sample: nothing will ever come
                raise RSSQAError(
                    f"{self.urls[0]} (+{len(self.urls) - 1} shards): no usable samples for this reader "
                    "(all bad, or fewer shards than ranks x workers without resampled: true)"
                )


class EpochLoader(DataLoader):
    """A DataLoader over a :class:`CorpusStream` that starts each epoch where the trainer is.

    Args:
        dataset: the stream.
        position: returns the number of batches this rank has trained on so far (global step times
            gradient accumulation); ``None`` counts epochs locally (use outside a Trainer).
        **kw: DataLoader options (``num_workers``, ``pin_memory``, ...); batching is the stream's.

    The position comes from the trainer's restored global step, so the loader needs no state of its
    own; ``state_dict`` reports it and marks the loader as resumable to Lightning.
    """

    def __init__(self, dataset: CorpusStream, position: Callable[[], int] | None = None, **kw: Any):
        super().__init__(dataset, batch_size=None, **kw)
        self.position = position
        self._local_epoch = -1

    def __iter__(self):
        # Lightning may create the iterator before it restores a checkpoint (to count the steps of
        # the run), so the position is read when the first batch is asked for, not here
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        stream: CorpusStream = self.dataset  # type: ignore[assignment]
        if self.position is not None:
            epoch, start = divmod(self.position(), len(stream))
        else:
            self._local_epoch += 1
            epoch, start = self._local_epoch, 0
        # workers take turns from worker 0, and batch j belongs to worker j % W: start at the turn of
        # the worker owning the first batch before ``start`` and drop the few batches made before it
        n_workers = max(1, self.num_workers)
        drop = start % n_workers
        stream.epoch, stream.start_batch = epoch, start - drop
        yield from itertools.islice(super().__iter__(), drop, None)

    def state_dict(self) -> dict[str, int]:
        stream: CorpusStream = self.dataset  # type: ignore[assignment]
        return {"epoch": stream.epoch, "start_batch": stream.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Nothing to restore: the position follows the trainer's restored global step."""


class EvalSet(Dataset):
    """An in-memory evaluation set: uint8 images with labels (classification) or captions (retrieval).

    Items are ``(index)``; batches come out of :meth:`collate` as ``{"image", "label"}`` or ``{"image", "text"}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        spec: InputSpec,
        labels: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
    ):
        self.images, self.spec = images, spec
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.tokens = None if texts is None else spec.tokenizer(list(texts))
        self.class_names = list(class_names or [])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Preprocess the images (and pick labels or tokens) of a batch of indices."""
        pixels = torch.from_numpy(
            np.stack([fit_square(self.images[i], self.spec.image_size) for i in indices])
        )
        out = {"image": normalise_pixels(pixels, self.spec.image_size, self.spec.mean, self.spec.std)}
        if self.labels is not None:
            out["label"] = self.labels[indices]
        if self.tokens is not None:
            out["text"] = self.tokens[indices]
        return out


class CorpusDataModule(LightningDataModule):
    """Shards for training; held-out zero-shot and retrieval sets for validation.

    Args:
        shards: training shards: a directory, glob, brace pattern or a list of these (e.g. the trusted
            and coarse tiers of the raw corpus, or ``runs/<profile>/purify/shards``).
        batch_size: samples per batch per rank (the global batch is this times the world size).
        samples_per_epoch: global samples per epoch (rounded down to whole steps, at least one).
        resampled: draw shards with replacement (see :class:`CorpusStream`).
        shuffle: sample shuffle buffer.
        augment: random 90-degree rotations and flips.
        num_workers: DataLoader workers per rank.
        seed: data seed.
        eval_scenes: size of the zero-shot scene set from :func:`rssqa.world.sample_scenes` (0 = none).
        eval_pairs: size of the trusted retrieval set from :func:`rssqa.world.sample_pairs` (0 = none).
        eval_image_size: side of the world's evaluation images in pixels.
        eval_seed: seed of the evaluation sets (a stream the corpus never uses).
        eval_batch_size: validation batch size.
        zeroshot_folder: optional real labelled folder (``<class>/<image>``) evaluated as zero-shot too.
        zeroshot_folder_max_per_class: cap on images read per class of that folder.

    The model's input (image size, normalisation, tokenizer) comes from the LightningModule's
    ``input_spec`` attribute, or from :meth:`set_input_spec` when used without a Trainer.
    """

    def __init__(
        self,
        shards: str | list[str],
        batch_size: int = 128,
        samples_per_epoch: int = 10_000,
        resampled: bool = True,
        shuffle: int = 1000,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        eval_scenes: int = 120,
        eval_pairs: int = 200,
        eval_image_size: int = 64,
        eval_seed: int = 0,
        eval_batch_size: int = 128,
        zeroshot_folder: str | None = None,
        zeroshot_folder_max_per_class: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.spec: InputSpec | None = None
        self.eval_sets: dict[str, EvalSet] = {}

    # ------------------------------------------------------------------------------------------- setup
    def set_input_spec(self, spec: InputSpec) -> None:
        """Set the model input explicitly (standalone use)."""
        self.spec = spec

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch: whole optimiser steps, at least one."""
        hp = self.hparams
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        steps = max(1, hp.samples_per_epoch // (hp.batch_size * self.world_size * accumulate))
        return steps * accumulate

    def setup(self, stage: str | None = None) -> None:
        if self.spec is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if module is None or getattr(module, "input_spec", None) is None:
                raise RSSQAError(
                    "data: no model input spec (attach to a Trainer with a PretrainTask or call set_input_spec)"
                )
            self.spec = module.input_spec
        if stage in (None, "fit"):
            check_shards(self.hparams.shards)
        if not self.eval_sets:
            self.eval_sets = self._build_eval_sets()

    def _build_eval_sets(self) -> dict[str, EvalSet]:
        from rssqa import world  # the embedded world is only needed for its held-out sets

        hp, spec, sets = self.hparams, self.spec, {}
        assert spec is not None
        if hp.eval_scenes:
            images, labels, names = world.sample_scenes(hp.eval_scenes, hp.eval_image_size, seed=hp.eval_seed)
            sets["scenes"] = EvalSet(images, spec, labels=labels, class_names=names)
        if hp.eval_pairs:
            pairs = world.sample_pairs(hp.eval_pairs, hp.eval_image_size, seed=hp.eval_seed, tier="trusted")
            images = np.stack([p["image"] for p in pairs])
            sets["pairs"] = EvalSet(images, spec, texts=[p["txt"] for p in pairs])
        if hp.zeroshot_folder:
            from rssqa.evaluate.zeroshot import load_labelled_folder

            images, labels, names = load_labelled_folder(
                hp.zeroshot_folder, spec.image_size, hp.zeroshot_folder_max_per_class
            )
            sets["folder"] = EvalSet(images, spec, labels=labels, class_names=names)
        return sets

    # ------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> EpochLoader:
        hp = self.hparams
        assert self.spec is not None, "setup() first"
        stream = CorpusStream(
            hp.shards,
            self.spec,
            hp.batch_size,
            self.batches_per_epoch,
            seed=hp.seed,
            resampled=hp.resampled,
            shuffle=hp.shuffle,
            augment=hp.augment,
        )
        position = None
        if self.trainer is not None:
            trainer = self.trainer
            position = lambda: trainer.global_step * trainer.accumulate_grad_batches  # noqa: E731
        return EpochLoader(
            stream,
            position=position,
            num_workers=hp.num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context="fork" if hp.num_workers else None,
        )

    @property
    def val_names(self) -> list[str]:
        """Names of the validation loaders, in the order of :meth:`val_dataloader`."""
        return list(self.eval_sets)

    def val_dataloader(self) -> list[DataLoader]:
        # every rank evaluates the whole (small) set: the metrics need all of it, and DDP's sampler
        # would pad and split it (the stage turns Lightning's distributed sampler off)
        return [
            DataLoader(
                s,
                batch_size=self.hparams.eval_batch_size,
                shuffle=False,
                collate_fn=s.collate,
                num_workers=0,
            )
            for s in self.eval_sets.values()
        ]


def check_shards(spec: str | Sequence[str]) -> int:
    """Fail early, with one line, when the training shards hold no samples; return the known count.

    Uses ``sizes.json`` next to the shards where present, otherwise reads shards until a good sample.
    """
    urls = list_shards(spec)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise RSSQAError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing)")
    known, unknown = 0, []
    sizes_cache: dict[str, dict[str, int]] = {}
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in sizes_cache:
            sizes_cache[folder] = read_sizes(folder or ".", missing_ok=True)
        if name in sizes_cache[folder]:
            known += sizes_cache[folder][name]
        else:
            unknown.append(url)
    if known > 0:
        return known
    for url in unknown:
        for _ in iter_shard(url):
            return 1
    raise RSSQAError(f"{urls[0]} (+{len(urls) - 1} shards): the training shards hold no usable samples")
