"""Stage sqa: train RS-SQA on RS-SQED, compare it with label-free baselines and ablations, recommend.

:class:`SQADataModule` turns an RS-SQED folder into model inputs once: the frozen CLIP-RS features of
every pool image (cached under the run folder, keyed by the weights), and the method-agnostic
segmentation inputs of every (image, method) row (:func:`rssqa.models.sqa.segmentation_inputs` on the
label shards). :class:`SQATask` trains the quality head with the configured loss terms; the model is
selected on validation SRCC. :func:`run_sqa` trains RS-SQA and its ablations in one run under the same
seed, scores the label-free baselines on the same test rows, evaluates recommendation, draws the
figures, exports the deployable scorer and writes ``summary.json`` last.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rssqa import baselines, metrics, recommend
from rssqa.data.sqed import SQED
from rssqa.errors import RSSQAError
from rssqa.losses import SQALoss
from rssqa.models.sqa import (
    RSSQA,
    VARIANTS,
    clip_image_features,
    segmentation_input_dims,
    segmentation_inputs,
)
from rssqa.runs import atomic_write_bytes, atomic_write_json, write_summary

log = logging.getLogger(__name__)

SEMANTICS = ("clip_rs", "generic_clip")
# ablation name -> (model variant, semantic features); "rs_sqa" is the configured model itself
ABLATIONS: dict[str, tuple[str | None, str]] = {
    "image_only": ("image_only", "clip_rs"),
    "seg_only": ("seg_only", "clip_rs"),
    "no_gating": ("no_gating", "clip_rs"),
    "generic_clip": (None, "generic_clip"),
}
BASELINE_KEYS = ("msp", "entropy", "margin", "atc", *ABLATIONS)
SUMMARY_METRICS = ("srcc", "plcc", "krcc", "rmse")


# ------------------------------------------------------------------------------------------- data
def clip_fingerprint(clip: torch.nn.Module) -> str:
    """SHA-1 over the names, shapes and bytes of a model's weights: which CLIP a scorer was made for."""
    h = hashlib.sha1()
    for name, t in sorted(clip.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def clip_features_for(clip_dir: str | os.PathLike, groups: Sequence[np.ndarray], chunk: int) -> dict[str, Any]:
    """CLIP pooled embeddings and patch tokens with the model at ``clip_dir``.

    Args:
        clip_dir: an open_clip local dir.
        groups: arrays of ``N_i×H_i×W_i×3`` uint8 images (one size per array, e.g. one per source).
        chunk: CLIP forward batch size (part of the numerics).

    Returns:
        ``embed`` ``N×E``, ``tokens`` ``N×T×h×w`` (groups concatenated in order) and the CLIP ``fingerprint``.
    """
    from rssqa.models.clip import load_clip, to_model_input

    clip, *_ = load_clip(clip_dir)
    clip.eval()
    embeds, tokens = [], []
    for images in groups:
        for start in range(0, len(images), 256):  # bound the preprocessed batch in memory
            x = to_model_input(clip, np.ascontiguousarray(images[start : start + 256]))
            e, t = clip_image_features(clip, x, chunk)
            embeds.append(e)
            tokens.append(t)
    return {"embed": torch.cat(embeds), "tokens": torch.cat(tokens), "fingerprint": clip_fingerprint(clip)}


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
        self._segmentation_inputs(rows)
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
        by_shard: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(rows):
            by_shard.setdefault((r["source"], r["method"]), []).append(i)
        feat_dim = 0
        if hp.per_method_features:
            for source, method in by_shard:
                _, meta = self.sqed.shard(source, method)
                shapes = meta["feature_shapes"]
                feat_dim = max(feat_dim, sum(shapes[f"feat/{k}"][0] for k in hp.layers))
        self.feat_dim = feat_dim
        first = True
        for (source, method), idx in sorted(by_shard.items()):
            arrays, meta = self.sqed.shard(source, method)
            missing = [k for k in hp.layers if f"feat/{k}" not in arrays]
            if missing:
                raise RSSQAError(f"{self.sqed.folder}/features/{source}/{method}.safetensors: no feature layers {missing}")
            inp = segmentation_inputs(arrays, hp.layers, hp.max_classes, feat_dim)
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

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of table rows ``rows`` (with the current :attr:`semantic` features)."""
        if self.semantic not in self.sem:
            raise RSSQAError(f"sqa: no {self.semantic} features (set data.{self.semantic.replace('clip_rs', 'clip')})")
        sem = self.sem[self.semantic]
        img = self.image_idx[rows]
        out = {k: v[rows] for k, v in self.seg.items()}
        out.update(
            sem_embed=sem["embed"][img],
            sem_tokens=sem["tokens"][img],
            oa=self.oa[rows],
            image_idx=img,
            row=rows,
            method_idx=self.method_idx[rows],
        )
        return out

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel mean and std of every input on the training split (for standardisation)."""
        train = torch.tensor(self.rows("train"))
        images = torch.unique(self.image_idx[train])

        def stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean(dims), x.std(dims)

        out = {"cells": stats(self.seg["seg_cells"][train], (0, 2, 3)), "global": stats(self.seg["seg_global"][train], (0,))}
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


# ------------------------------------------------------------------------------------------- task
class SQATask(L.LightningModule):
    """Train the RS-SQA quality head on cached inputs; validation SRCC drives model selection.

    Args:
        variant: ``full``, ``no_gating``, ``image_only`` or ``seg_only``.
        width: token width of both branches.
        hidden: hidden units of the MLP.
        dropout: MLP dropout.
        per_method_adapters: add per-method adapters on raw features (needs
            ``data.per_method_features``).
        lr: AdamW learning rate (cosine decay over the run).
        weight_decay: AdamW weight decay.
        w_mse: weight of the regression term.
        w_plcc: weight of the PLCC term.
        w_rank: weight of the pairwise ranking term over every pair in the batch.
        w_rank_image: weight of the pairwise ranking term over the methods of each image.
        rank_min_gap: OA gap below which a pair is not ranked.
        rank_scale: sharpness of the ranking term (and of the listwise term's scores).
        w_list: weight of the listwise term over each image's methods (0: off).
        list_temperature: OA temperature of the listwise term's target.
        ema_decay: decay of an exponential moving average of the weights (Lightning's
            ``EMAWeightAveraging``), which is what validation sees, what is checkpointed and what the
            scorer exports; 0 trains and keeps the raw weights. Averaging steadies a small head trained
            on a few thousand rows, so fewer of its results depend on the seed.
        dims: input widths (filled from the data in ``setup``; stored so checkpoints rebuild alone).
        methods: method names with adapters (filled from the data).
        feat_dim: raw feature width of the adapters (filled from the data).
    """

    def __init__(
        self,
        variant: str = "full",
        width: int = 64,
        hidden: int = 64,
        dropout: float = 0.1,
        per_method_adapters: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 1e-2,
        w_mse: float = 1.0,
        w_plcc: float = 0.5,
        w_rank: float = 0.5,
        w_rank_image: float = 0.0,
        rank_min_gap: float = 0.0,
        rank_scale: float = 20.0,
        w_list: float = 0.0,
        list_temperature: float = 0.02,
        ema_decay: float = 0.0,
        dims: dict[str, int] | None = None,
        methods: list[str] | None = None,
        feat_dim: int = 0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise RSSQAError(f"model.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if not 0.0 <= ema_decay < 1.0:
            raise RSSQAError(f"model.ema_decay: must be in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.loss = SQALoss(w_mse, w_plcc, w_rank, w_rank_image, rank_min_gap, rank_scale, w_list, list_temperature)
        self.model: RSSQA | None = self._build() if dims is not None else None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.best_val_srcc = float("-inf")

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`~rssqa.models.sqa.RSSQA` (also what the scorer stores)."""
        hp = self.hparams
        adapters = hp.per_method_adapters and hp.variant != "image_only"
        return {
            **hp.dims,
            "width": hp.width,
            "hidden": hp.hidden,
            "variant": hp.variant,
            "methods": list(hp.methods or []) if adapters else [],
            "feat_dim": hp.feat_dim if adapters else 0,
            "dropout": hp.dropout,
        }

    def _build(self) -> RSSQA:
        return RSSQA(**self.model_kwargs())

    def setup(self, stage: str) -> None:
        if self.model is None:
            self.build_for(self.trainer.datamodule)

    def build_for(self, data: SQADataModule) -> None:
        """Build the model for ``data``'s input widths and load its training-split input statistics.

        :func:`fit_one` calls this before fitting, so callbacks that copy the model when fitting starts
        (weight averaging) see it whole.
        """
        data.setup("fit")
        if self.hparams.per_method_adapters and not data.hparams.per_method_features:
            raise RSSQAError("model.per_method_adapters needs data.per_method_features: true")
        self.hparams.dims = data.dims
        self.hparams.methods = list(data.methods)
        self.hparams.feat_dim = data.feat_dim
        self.model = self._build()
        set_input_stats(self.model, data.input_stats())

    def configure_callbacks(self) -> list[L.Callback]:
        if not self.hparams.ema_decay:
            return []
        from lightning.pytorch.callbacks import EMAWeightAveraging

        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.loss(self(batch), batch["oa"], batch["image_idx"])
        n = len(batch["oa"])
        self.log_dict({f"train_{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=n)
        return terms["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val.append((self(batch).detach().cpu(), batch["oa"].cpu()))

    def on_validation_epoch_end(self) -> None:
        pred = torch.cat([p for p, _ in self._val])
        oa = torch.cat([t for _, t in self._val])
        self._val.clear()
        srcc = metrics.srcc(pred, oa)
        srcc = -1.0 if np.isnan(srcc) else srcc  # a constant predictor ranks last, not NaN
        self.log_dict(
            {"val_srcc": srcc, "val_plcc": np.nan_to_num(metrics.plcc(pred, oa), nan=-1.0), "val_rmse": metrics.rmse(pred, oa)},
            prog_bar=True,
        )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def set_input_stats(model: RSSQA, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Load training-split input statistics into the model's standardisation buffers."""
    model.norm_cells.set_stats(*stats["cells"])
    model.norm_global.set_stats(*stats["global"])
    model.norm_embed.set_stats(*stats["embed"])
    model.norm_tokens.set_stats(*stats["tokens"])
    if model.methods and "feats" in stats:
        model.set_feature_stats(*stats["feats"])


# ------------------------------------------------------------------------------------------- runs
def fit_one(
    task: SQATask, data: SQADataModule, trainer: L.Trainer, semantic: str = "clip_rs"
) -> tuple[SQATask, dict[str, np.ndarray], float]:
    """Fit ``task``, restore its best validation-SRCC weights, predict every split.

    Returns:
        ``(task, {split: predictions in table row order of the split}, best val SRCC)``.
    """
    data.semantic = semantic
    if task.model is None:
        task.build_for(data)
    trainer.fit(task, datamodule=data)
    ckpt = trainer.checkpoint_callback
    best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else float("nan")
    if ckpt is not None and ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        task.load_state_dict(state)
    task.eval()
    preds = {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            out = [task(b) for b in data.split_dataloader(split)]
            preds[split] = torch.cat(out).numpy().astype(np.float64)
    data.semantic = "clip_rs"
    return task, preds, best


def baseline_scores(data: SQADataModule) -> dict[str, dict[str, np.ndarray]]:
    """The label-free baselines on every split: ``{name: {split: scores}}``.

    ``msp``, ``entropy`` and ``margin`` are read from the table; ``atc`` uses a per-method threshold
    fitted on the train split's confidence histograms.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    rows = data.sqed.rows
    for name in ("msp", "entropy", "margin"):
        col = np.array([r[name] for r in rows], dtype=np.float64)
        out[name] = {s: col[data.rows(s)] for s in ("train", "val", "test")}
    atc = np.zeros(len(rows))
    train = np.array(data.rows("train"))
    thresholds = {}
    for method in data.methods:
        fit_rows = train[data.method_of[train] == method]
        t = baselines.fit_atc_threshold(data.hist_conf[fit_rows], data.oa[fit_rows].double().numpy())
        thresholds[method] = t
        mine = np.flatnonzero(data.method_of == method)
        atc[mine] = baselines.share_above(data.hist_conf[mine], t).numpy()
    out["atc"] = {s: atc[data.rows(s)] for s in ("train", "val", "test")}
    out["_atc_thresholds"] = thresholds  # type: ignore[assignment]
    return out


def _headline(pred: np.ndarray, oa: np.ndarray) -> dict[str, float]:
    m = metrics.quality_metrics(pred, oa)
    return {k: _finite(m[k]) for k in (*SUMMARY_METRICS, "plcc_logistic")}


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return _finite(float(obj))
    return obj


def evaluate(
    data: SQADataModule, preds: dict[str, np.ndarray], split: str = "test"
) -> dict[str, Any]:
    """Quality metrics of ``preds[split]`` overall, per source and per method."""
    rows = data.rows(split)
    oa = data.oa[rows].double().numpy()
    p = preds[split]
    return {
        **_headline(p, oa),
        "per_source": _clean(metrics.grouped_metrics(p, oa, data.source_of[rows])),
        "per_method": _clean(metrics.grouped_metrics(p, oa, data.method_of[rows])),
        "n_rows": len(rows),
    }


def recommendation(data: SQADataModule, preds: dict[str, np.ndarray], split: str = "test") -> dict[str, Any]:
    """Per-image method recommendation on ``split`` from ``preds[split]`` (fixed method from train)."""
    train, rows = data.rows("train"), data.rows(split)
    fixed = recommend.best_fixed_method(data.image_idx[train].tolist(), data.method_of[train], data.oa[train].tolist())
    out = recommend.recommend_metrics(
        data.image_idx[rows].tolist(), data.method_of[rows], data.oa[rows].double().tolist(), preds[split].tolist(), fixed
    )
    return {**out, "best_fixed_method": fixed}


def recommendation_headroom(data: SQADataModule, preds: dict[str, dict[str, np.ndarray]], split: str = "test") -> dict[str, Any]:
    """How exact a score must be for top1 to reach 0.73 on ``split``, beside each learned model's
    within-image error (:func:`rssqa.recommend.headroom`, :func:`rssqa.recommend.within_image_error`)."""
    rows = data.rows(split)
    images, methods = data.image_idx[rows].tolist(), data.method_of[rows]
    oa = data.oa[rows].double().numpy()
    out = recommend.headroom(images, methods, oa)
    out["within_image_error"] = {k: recommend.within_image_error(images, methods, oa, p[split]) for k, p in preds.items()}
    return out


def run_sqa(
    task: SQATask,
    data: SQADataModule,
    make_trainer: Callable[[str], L.Trainer],
    out: str | os.PathLike,
    ablations: Sequence[str] = tuple(ABLATIONS),
    seed: int = 0,
) -> dict[str, Any]:
    """The whole stage: RS-SQA, its ablations, the baselines, recommendation, figures, scorer, summary.

    Args:
        task: the configured RS-SQA task (its hyper-parameters are reused by the ablations).
        data: the data module.
        make_trainer: run name -> a fresh Trainer (loggers and a val-SRCC checkpoint callback).
        out: the run folder; ``summary.json`` is written last.
        ablations: which of :data:`ABLATIONS` to train.
        seed: seeded before every fit, so each run starts from the same state.

    Returns:
        The summary.
    """
    from rssqa.scorer import export_scorer

    t0 = time.perf_counter()
    out = Path(out)
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise RSSQAError(f"ablations: {sorted(unknown)} unknown; choose from {list(ABLATIONS)}")
    data.setup("fit")
    if "generic_clip" in ablations and "generic_clip" not in data.sem:
        raise RSSQAError("ablations: generic_clip needs data.generic_clip (the raw-corpus CLIP, make pretrain-raw)")
    own = set(inspect.signature(SQATask.__init__).parameters) - {"self", "dims", "methods", "feat_dim"}
    hparams = {k: v for k, v in task.hparams.items() if k in own}

    L.seed_everything(seed, workers=True)
    main, preds, best = fit_one(task, data, make_trainer("rs_sqa"))
    runs = {"rs_sqa": {"preds": preds, "best_val_srcc": best, "variant": hparams["variant"]}}
    for name in ablations:
        variant, semantic = ABLATIONS[name]
        L.seed_everything(seed, workers=True)
        ab = SQATask(**{**hparams, "variant": variant or hparams["variant"]})
        _, p, b = fit_one(ab, data, make_trainer(name), semantic)
        runs[name] = {"preds": p, "best_val_srcc": b, "variant": variant or hparams["variant"]}

    base = baseline_scores(data)
    thresholds = base.pop("_atc_thresholds")
    test_rows = data.rows("test")
    oa_test = data.oa[test_rows].double().numpy()
    test_scores = {**{k: v["test"] for k, v in base.items()}, **{k: v["preds"]["test"] for k, v in runs.items() if k != "rs_sqa"}}
    table: dict[str, Any] = {k: _headline(test_scores[k], oa_test) if k in test_scores else None for k in BASELINE_KEYS}
    test = evaluate(data, preds)
    images_test = data.image_idx[test_rows].numpy()
    versus = {k: metrics.paired_bootstrap(preds["test"], test_scores[k], oa_test, images_test, seed=seed) for k in BASELINE_KEYS if k in test_scores}
    rec = recommendation(data, preds)
    rec_baselines = {n: recommendation(data, base[n]) for n in ("msp", "entropy", "margin", "atc")}
    rec_baselines.update({n: recommendation(data, runs[n]["preds"]) for n in ablations})
    headroom = recommendation_headroom(data, {k: v["preds"] for k, v in runs.items()})

    figures = out / "figures"
    plot_scatter(preds["test"], oa_test, data.method_of[test_rows], figures / "scatter_test.png", title="RS-SQA on test")
    sem = data.sem["clip_rs"]
    per_image_oa = np.zeros(len(data.image_keys))
    counts = np.zeros(len(data.image_keys))
    np.add.at(per_image_oa, data.image_idx.numpy(), data.oa.double().numpy())
    np.add.at(counts, data.image_idx.numpy(), 1)
    plot_embedding(sem["embed"].numpy(), per_image_oa / counts, figures / "clip_embedding.png", groups=_image_sources(data))
    plot_comparison(table, test, figures / "comparison.png")

    scorer_dir = export_scorer(main, data, out / "scorer", best_fixed=rec["best_fixed_method"])
    ranking = sorted(
        ((k, v["srcc"]) for k, v in {"rs_sqa": test, **{k: v for k, v in table.items() if v}}.items() if v["srcc"] is not None),
        key=lambda kv: -kv[1],
    )
    label_free = max((table[k]["srcc"] for k in ("msp", "entropy", "margin", "atc") if table[k]["srcc"] is not None), default=None)
    summary = {
        "test": {k: test[k] for k in (*SUMMARY_METRICS, "plcc_logistic", "n_rows")},
        "test_per_source": test["per_source"],
        "test_per_method": test["per_method"],
        "baselines": table,
        "recommend": {k: rec[k] for k in (*recommend.KEYS, "top1_within", "n_images", "best_fixed_method")},
        "recommend_baselines": {k: {m: v[m] for m in ("top1", "top1_within", "regret", "chosen_oa")} for k, v in rec_baselines.items()},
        "recommend_headroom": headroom,
        "srcc_ranking": [k for k, _ in ranking],
        "vs_rs_sqa": versus,
        "srcc_margin_over_label_free": None if label_free is None or test["srcc"] is None else test["srcc"] - label_free,
        "val_srcc": {k: _finite(v["best_val_srcc"]) for k, v in runs.items()},
        "atc_thresholds": thresholds,
        "n_rows": {s: len(data.rows(s)) for s in ("train", "val", "test")},
        "n_images": len(data.image_keys),
        "methods": data.methods,
        "sources": sorted(set(data.source_of.tolist())),
        "clip": str(data.hparams.clip),
        "generic_clip": data.hparams.generic_clip,
        "scorer": str(scorer_dir),
        "figures": sorted(str(p.relative_to(out)) for p in figures.glob("*.png")),
        "hparams": {k: v for k, v in hparams.items()},
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "predictions.json", _predictions(data, runs, base))
    write_summary(out, _clean(summary))
    return summary


def _image_sources(data: SQADataModule) -> np.ndarray:
    src = np.empty(len(data.image_keys), dtype=object)
    src[data.image_idx.numpy()] = data.source_of
    return src.astype(str)


def _predictions(data: SQADataModule, runs: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    rows = data.rows("test")
    table = data.sqed.rows
    return {
        "rows": [{"key": table[i]["key"], "method": table[i]["method"], "oa": table[i]["oa"]} for i in rows],
        "scores": {
            **{k: v["preds"]["test"].round(6).tolist() for k, v in runs.items()},
            **{k: np.asarray(v["test"]).round(6).tolist() for k, v in base.items()},
        },
    }


# ---------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_scatter(pred: np.ndarray, oa: np.ndarray, groups: Sequence[str], path: Path, title: str = "") -> Path:
    """Predicted score against true OA, one colour per group (method), with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    groups = np.asarray(groups)
    for g in sorted(set(groups.tolist())):
        m = groups == g
        ax.scatter(oa[m], pred[m], s=10, alpha=0.7, label=g)
    lo, hi = float(min(oa.min(), pred.min())), float(max(oa.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel("true OA")
    ax.set_ylabel("predicted quality")
    ax.set_title(f"{title}: SRCC {metrics.srcc(pred, oa):.3f}, PLCC {metrics.plcc(pred, oa):.3f}")
    ax.legend(fontsize=7, markerscale=1.5, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` (``N×D``) on their first two principal axes (exact SVD, sign-fixed)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2, :1] + 1e-12)  # a deterministic orientation
    return x @ axes.T


def plot_embedding(embed: np.ndarray, oa: np.ndarray, path: Path, groups: Sequence[str] | None = None) -> Path:
    """2-D PCA of CLIP-RS image embeddings coloured by mean OA over methods (one marker per source)."""
    plt = _pyplot()
    xy = pca_2d(embed)
    fig, ax = plt.subplots(figsize=(6, 5))
    groups = np.asarray(groups if groups is not None else ["images"] * len(xy))
    markers = "osD^v<>p*h"
    sc = None
    for i, g in enumerate(sorted(set(groups.tolist()))):
        m = groups == g
        sc = ax.scatter(xy[m, 0], xy[m, 1], c=oa[m], cmap="viridis", vmin=float(oa.min()), vmax=float(oa.max()),
                        s=14, marker=markers[i % len(markers)], label=g)
    fig.colorbar(sc, ax=ax, label="mean OA over methods")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("CLIP-RS image features")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(table: dict[str, Any], test: dict[str, Any], path: Path) -> Path:
    """Bar chart of test SRCC and PLCC: RS-SQA against every baseline and ablation."""
    plt = _pyplot()
    entries = {"RS-SQA": test, **{k: v for k, v in table.items() if v}}
    names = list(entries)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 4))
    x = np.arange(len(names))
    for j, key in enumerate(("srcc", "plcc")):
        vals = [entries[n][key] if entries[n][key] is not None else 0.0 for n in names]
        ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, label=key.upper())
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("correlation with OA (test)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
