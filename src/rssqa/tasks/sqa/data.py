"""RS-SQED as model inputs in memory: :class:`SQADataModule` and its batching.

The frozen CLIP-RS features of every pool image (cached under the run folder, keyed by the weights)
and the segmentation inputs of every (image, method) row both come from
:mod:`rssqa.models.quality_inputs`, the one implementation the scorer also uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rssqa.data.sqed import SQED
from rssqa.errors import RSSQAError
from rssqa.models.clip import clip_fingerprint, load_clip
from rssqa.models.quality_inputs import QualityInputs, segmentation_input_dims
from rssqa.runs import atomic_write_bytes


def clip_features_for(clip_dir: str | os.PathLike, groups: Sequence[np.ndarray], chunk: int) -> dict[str, Any]:
    """CLIP pooled embeddings and patch tokens with the model at ``clip_dir``.

    Args:
        clip_dir: an open_clip local dir.
        groups: arrays of ``N_i×H_i×W_i×3`` uint8 images (one size per array, e.g. one per source).
        chunk: CLIP forward batch size (part of the numerics).

    Returns:
        ``embed`` ``N×E``, ``tokens`` ``N×T×h×w`` (groups concatenated in order) and the CLIP ``fingerprint``.
    """
    clip, *_ = load_clip(clip_dir)
    clip.eval()
    inputs = QualityInputs(clip_chunk=chunk)
    feats = [inputs.semantics(clip, images) for images in groups]
    return {
        "embed": torch.cat([f["embed"] for f in feats]),
        "tokens": torch.cat([f["tokens"] for f in feats]),
        "fingerprint": clip_fingerprint(clip),
    }


class RowDataset(Dataset):
    """Rows of RS-SQED as model inputs; a batch is fetched at once (``__getitems__``).

    Args:
        data: the prepared :class:`SQADataModule`.
        rows: row indices into the table.
    """

    def __init__(self, data: SQADataModule, rows: Sequence[int]):
        self.data, self.rows = data, torch.as_tensor(list(rows), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.data.batch(self.rows[torch.as_tensor(list(idx), dtype=torch.long)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class ImageBatchSampler(Sampler[list[int]]):
    """Batches of whole images: every method of ``images_per_batch`` images, reshuffled each epoch.

    Same-image pairs are what the ranking term (and recommendation) needs; the order depends only on
    ``seed`` and the epoch.

    Args:
        image_of_row: image index per dataset position, length ``N``.
        images_per_batch: images per batch.
        seed: shuffling seed.
    """

    def __init__(self, image_of_row: Sequence[int], images_per_batch: int, seed: int = 0):
        by_image: dict[int, list[int]] = {}
        for pos, img in enumerate(image_of_row):
            by_image.setdefault(int(img), []).append(pos)
        self.groups = [by_image[k] for k in sorted(by_image)]
        self.images_per_batch, self.seed, self.epoch = images_per_batch, seed, 0

    def __len__(self) -> int:
        return -(-len(self.groups) // self.images_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        self.epoch += 1
        for start in range(0, len(order), self.images_per_batch):
            yield [pos for g in order[start : start + self.images_per_batch] for pos in self.groups[g]]


def _rows_by_shard(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """Table row indices by (source, method): the rows one label shard holds."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault((r["source"], r["method"]), []).append(i)
    return out


class SQADataModule(L.LightningDataModule):
    """RS-SQED rows with frozen CLIP features and segmentation inputs, in memory.

    Args:
        sqed: the sqed run folder (``runs/<profile>/sqed``).
        clip: CLIP-RS, an open_clip local dir (``runs/<profile>/pretrain/clip_rs``).
        generic_clip: the raw-corpus CLIP for the ``generic_clip`` ablation (``None``: not run).
        layers: intermediate feature layers the segmentation branch reads.
        max_classes: length of the sorted class-share profiles.
        per_method_features: also prepare raw method features for per-method adapters.
        images_per_batch: training batch = every method of this many images.
        eval_batch_size: rows per validation / prediction batch.
        clip_chunk: CLIP forward batch (part of the numerics: keep it as the scorer's).
        cache_dir: where CLIP features are cached (``None``: not cached).
        seed: shuffling seed.
        num_workers: DataLoader workers (the data is in memory: 0 is right).
    """

    def __init__(
        self,
        sqed: str,
        clip: str,
        generic_clip: str | None = None,
        layers: Sequence[str] = ("encoder", "decoder"),
        max_classes: int = 8,
        per_method_features: bool = False,
        images_per_batch: int = 8,
        eval_batch_size: int = 512,
        clip_chunk: int = 16,
        cache_dir: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.semantic = "clip_rs"
        self.prepared = False

    # ------------------------------------------------------------------------------------ building
    def setup(self, stage: str | None = None) -> None:
        if self.prepared:
            return
        hp = self.hparams
        self.sqed = SQED(hp.sqed)
        rows = self.sqed.rows
        if not rows:
            raise RSSQAError(f"{hp.sqed}: RS-SQED table is empty")
        self.methods = list(self.sqed.methods)
        self.image_keys = list(dict.fromkeys(r["key"] for r in rows))
        key_index = {k: i for i, k in enumerate(self.image_keys)}
        self.image_idx = torch.tensor([key_index[r["key"]] for r in rows], dtype=torch.long)
        self.oa = torch.tensor([r["oa"] for r in rows], dtype=torch.float32)
        self.split_of = np.array([r["split"] for r in rows])
        self.method_of = np.array([r["method"] for r in rows])
        self.source_of = np.array([r["source"] for r in rows])
        self.method_idx = torch.tensor([self.methods.index(r["method"]) for r in rows], dtype=torch.long)
        # the network behind a row: each source's methods are networks of their own (trained on that source)
        self.network_of = np.unique([f"{r['source']}/{r['method']}" for r in rows], return_inverse=True)[1]
        self._segmentation_inputs(rows)
        self._agreement_inputs(rows)
        self.sem = {}
        for name, path in (("clip_rs", hp.clip), ("generic_clip", hp.generic_clip)):
            if path is not None:
                self.sem[name] = self._clip_features(name, path, rows)
        for split in ("train", "val", "test"):
            if not self.rows(split):
                raise RSSQAError(f"{hp.sqed}: RS-SQED has no {split} rows")
        self.prepared = True

    def _segmentation_inputs(self, rows: list[dict[str, Any]]) -> None:
        hp = self.hparams
        n = len(rows)
        by_shard = _rows_by_shard(rows)
        feat_dim = 0
        if hp.per_method_features:
            for source, method in by_shard:
                _, meta = self.sqed.shard(source, method)
                shapes = meta["feature_shapes"]
                feat_dim = max(feat_dim, sum(shapes[f"feat/{k}"][0] for k in hp.layers))
        self.feat_dim = feat_dim
        self.inputs = QualityInputs(tuple(hp.layers), hp.max_classes, feat_dim, hp.clip_chunk)
        first = True
        chunks = set()
        for (source, method), idx in sorted(by_shard.items()):
            arrays, meta = self.sqed.shard(source, method)
            chunks.add(meta.get("chunk"))
            missing = [k for k in hp.layers if f"feat/{k}" not in arrays]
            if missing:
                raise RSSQAError(f"{self.sqed.folder}/features/{source}/{method}.safetensors: no feature layers {missing}")
            inp = self.inputs.segmentation(arrays)
            feature_rows = torch.tensor([rows[i]["feature_row"] for i in idx], dtype=torch.long)
            if first:
                self.grid, self.hist_bins = int(meta["grid"]), int(meta["hist_bins"])
                self.seg = {k: torch.zeros((n, *v.shape[1:]), dtype=torch.float32) for k, v in inp.items()}
                self.hist_conf = torch.zeros((n, arrays["hist_conf"].shape[1]), dtype=torch.float64)
                first = False
            elif (int(meta["grid"]), int(meta["hist_bins"])) != (self.grid, self.hist_bins):
                raise RSSQAError(f"{self.sqed.folder}: label shards disagree on grid / hist_bins ({source}/{method})")
            target = torch.tensor(idx, dtype=torch.long)
            for k, v in inp.items():
                self.seg[k][target] = v[feature_rows]
            self.hist_conf[target] = torch.as_tensor(arrays["hist_conf"], dtype=torch.float64)[feature_rows]
        if len(chunks) > 1:
            raise RSSQAError(f"{self.sqed.folder}: label shards disagree on the segmenter chunk ({sorted(map(str, chunks))})")
        # the segmenter forward batch labelling used (None: a shard from before it was recorded)
        self.seg_chunk: int | None = chunks.pop()
        self.inputs = replace(self.inputs, seg_chunk=self.seg_chunk or hp.clip_chunk)

    def _agreement_inputs(self, rows: list[dict[str, Any]]) -> None:
        """Agreement with the other methods (:meth:`rssqa.data.sqed.SQED.agreement`), when every source
        has it; else :attr:`agree` is ``None`` and the agreement model cannot be trained."""
        self.agree: dict[str, torch.Tensor] | None = None
        files = {s: self.sqed.agreement(s) for s in sorted({r["source"] for r in rows})}
        if any(f is None for f in files.values()):
            return
        agree: dict[str, torch.Tensor] = {}
        for (source, method), idx in sorted(_rows_by_shard(rows).items()):
            arrays, _ = files[source]
            feature_rows = [rows[i]["feature_row"] for i in idx]
            for k in ("agree_maps", "agree_global"):
                if f"{method}/{k}" not in arrays:
                    raise RSSQAError(f"{self.sqed.folder}/features/{source}: no agreement of method {method} (rerun the sqed stage)")
                values = torch.from_numpy(np.asarray(arrays[f"{method}/{k}"])[feature_rows])
                if k not in agree:
                    agree[k] = torch.zeros((len(rows), *values.shape[1:]), dtype=torch.float32)
                agree[k][torch.tensor(idx)] = values
        self.agree = agree

    def _clip_features(self, name: str, path: str, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if not Path(path).is_dir():
            raise RSSQAError(f"{path}: CLIP model folder not found (data.{'clip' if name == 'clip_rs' else name})")
        first_row: dict[str, dict[str, Any]] = {}
        for r in rows:
            first_row.setdefault(r["key"], r)
        sources = sorted({r["source"] for r in first_row.values()})
        pools = {s: self.sqed.folder / "pool" / s / "images.npy" for s in sources}

        def stamp(p: Path) -> list[int] | None:
            return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None

        key = hashlib.sha1(
            json.dumps(
                {
                    "clip": str(Path(path).resolve()),
                    "weights": stamp(Path(path) / "open_clip_model.safetensors"),
                    "pools": {s: stamp(p) for s, p in pools.items()},
                    "images": self.image_keys,
                    "chunk": hp.clip_chunk,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        cache = Path(hp.cache_dir) / f"clip_{name}_{key}.pt" if hp.cache_dir else None
        if cache is not None and cache.is_file():
            return torch.load(cache, weights_only=True)
        # one group per source (a source's pool images share one size), then back to image order
        order = [[k for k in self.image_keys if first_row[k]["source"] == s] for s in sources]
        groups = [self.sqed.images(s)[[first_row[k]["image_row"] for k in keys]] for s, keys in zip(sources, order, strict=True)]
        feats = clip_features_for(path, groups, hp.clip_chunk)
        position = {k: i for i, k in enumerate(k for keys in order for k in keys)}
        back = torch.tensor([position[k] for k in self.image_keys])
        feats["embed"], feats["tokens"] = feats["embed"][back], feats["tokens"][back]
        feats["path"] = str(path)
        if cache is not None:
            buf = io.BytesIO()
            torch.save(feats, buf)
            atomic_write_bytes(cache, buf.getvalue())
        return feats

    # ---------------------------------------------------------------------------------- accessors
    @property
    def dims(self) -> dict[str, int]:
        """Input widths of :class:`~rssqa.models.sqa.RSSQA`."""
        sem = self.sem["clip_rs"]
        cells, glob = segmentation_input_dims(self.hparams.layers, self.hist_bins, self.hparams.max_classes)
        assert cells == self.seg["seg_cells"].shape[1] and glob == self.seg["seg_global"].shape[1]
        return {
            "embed_dim": int(sem["embed"].shape[1]),
            "token_dim": int(sem["tokens"].shape[1]),
            "cell_dim": cells,
            "global_dim": glob,
            "grid": self.grid,
        }

    def rows(self, split: str) -> list[int]:
        """Row indices of ``split``."""
        return np.flatnonzero(self.split_of == split).tolist()

    def adapter_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-method adapter index of ``rows``: -1 (the shared path alone) for a row whose network has
        no row in the current train split.

        A per-method adapter reads one network's raw features. A source held out (leave one source
        out) brings networks of the same method names that no adapter was trained on: their features
        are in another basis, so they get none, as an unseen method does. Where every network has
        training rows (the stage's own split, the group folds) this is the method's index.
        """
        trained = np.isin(self.network_of[rows.numpy()], self.network_of[self.split_of == "train"])
        return torch.where(torch.from_numpy(trained), self.method_idx[rows], -1)

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of table rows ``rows`` (with the current :attr:`semantic` features)."""
        if self.semantic not in self.sem:
            raise RSSQAError(f"sqa: no {self.semantic} features (set data.{self.semantic.replace('clip_rs', 'clip')})")
        sem = self.sem[self.semantic]
        img = self.image_idx[rows]
        out = {k: v[rows] for k, v in self.seg.items()}
        if self.agree is not None:
            out.update({k: v[rows] for k, v in self.agree.items()})
        out.update(
            sem_embed=sem["embed"][img],
            sem_tokens=sem["tokens"][img],
            oa=self.oa[rows],
            image_idx=img,
            row=rows,
            method_idx=self.adapter_index(rows),
        )
        return out

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel mean and std of every input on the training split (for standardisation)."""
        train = torch.tensor(self.rows("train"))
        images = torch.unique(self.image_idx[train])

        def stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean(dims), x.std(dims)

        out = {"cells": stats(self.seg["seg_cells"][train], (0, 2, 3)), "global": stats(self.seg["seg_global"][train], (0,))}
        if self.agree is not None:
            out["agree_maps"] = stats(self.agree["agree_maps"][train], (0, 2, 3))
            out["agree_global"] = stats(self.agree["agree_global"][train], (0,))
        sem = self.sem[self.semantic]
        out["embed"] = stats(sem["embed"][images], (0,))
        out["tokens"] = stats(sem["tokens"][images], (0, 2, 3))
        if "seg_feats" in self.seg:
            methods = self.method_of[train.numpy()]
            per = [stats(self.seg["seg_feats"][train[methods == m]], (0, 2, 3)) for m in self.methods]
            out["feats"] = (torch.stack([m for m, _ in per]), torch.stack([s for _, s in per]))
        return out

    def _loader(self, rows: list[int], shuffle: bool) -> DataLoader:
        ds = RowDataset(self, rows)
        if shuffle:
            sampler = ImageBatchSampler(self.image_idx[ds.rows].tolist(), self.hparams.images_per_batch, self.hparams.seed)
            return DataLoader(ds, batch_sampler=sampler, collate_fn=_collate, num_workers=self.hparams.num_workers)
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size, collate_fn=_collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.rows("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.rows("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.rows("test"), shuffle=False)

    def split_dataloader(self, split: str) -> DataLoader:
        """Rows of ``split`` in table order, for prediction."""
        return self._loader(self.rows(split), shuffle=False)
