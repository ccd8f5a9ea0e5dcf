"""Stage pretrain pieces: augmentation, the corpus stream, evaluation metrics, the task, the stage in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torchmetrics.retrieval import RetrievalRecall

from rssqa.data.augment import dihedral, dihedral_index
from rssqa.data.corpus import CorpusDataModule, CorpusStream, EpochLoader, check_shards
from rssqa.errors import RSSQAError
from rssqa.evaluate.retrieval import match_ranks, retrieval_recall
from rssqa.evaluate.zeroshot import load_labelled_folder, zeroshot_accuracy
from rssqa.models.clip import create_clip, encode_images, input_spec
from rssqa.runs import write_summary
from rssqa.tasks.pretrain import LAST_GOOD, PretrainTask, warmup_cosine
from tests.conftest import pretrain_smoke_args
from tests.ddp.common import write_fixture_shards

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_fixture_shards(tmp_path_factory.mktemp("shards") / "corpus", bad=True)


@pytest.fixture(scope="module")
def spec():
    _, _, _, tokenizer = create_clip("rs-tiny")
    model = create_clip("rs-tiny")[0]
    return input_spec(model, tokenizer)


# ------------------------------------------------------------------------------------------------ augment
def test_dihedral_is_the_group_of_the_square():
    image = np.arange(2 * 3 * 1, dtype=np.uint8).reshape(2, 3, 1)
    outs = [dihedral(image, k) for k in range(8)]
    assert np.array_equal(outs[0], image)
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8  # all distinct
    assert outs[1].shape == (3, 2, 1) and np.array_equal(outs[1], np.rot90(image))
    assert np.array_equal(outs[4], image[:, ::-1])
    assert np.array_equal(dihedral(dihedral(image, 4), 4), image)  # a mirror is its own inverse
    with pytest.raises(ValueError):
        dihedral(image, 8)


def test_dihedral_draw_is_uniform_and_reproducible():
    draws = [dihedral_index(0, 0, f"k{i}") for i in range(4000)]
    counts = np.bincount(draws, minlength=8)
    assert counts.min() > 400 and counts.max() < 600
    assert draws == [dihedral_index(0, 0, f"k{i}") for i in range(4000)]
    assert draws != [dihedral_index(0, 1, f"k{i}") for i in range(4000)]  # a new epoch, new draws


# ------------------------------------------------------------------------------------------------ metrics
def test_warmup_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_retrieval_recall_agrees_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=-1)
    ours = retrieval_recall(img, txt, ks=(1, 5, 10))
    sim = img @ txt.T
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        indexes = torch.arange(40).repeat_interleave(40)
        target = torch.eye(40, dtype=torch.bool).flatten()
        for k in (1, 5, 10):
            ref = RetrievalRecall(top_k=k)(scores.flatten(), target, indexes=indexes)
            assert ours[f"{direction}_R@{k}"] == pytest.approx(float(ref), abs=1e-6)
    assert ours["mean_recall"] == pytest.approx(np.mean([v for k, v in ours.items() if "@" in k]))
    assert 0 < ours["i2t_R@1"] < ours["i2t_R@10"] < 1


def test_retrieval_ties_count_against_the_model():
    collapsed = torch.ones(5, 4) / 2
    assert match_ranks(collapsed @ collapsed.T).tolist() == [4] * 5
    rec = retrieval_recall(collapsed, collapsed, ks=(1, 4))
    assert rec["i2t_R@1"] == rec["t2i_R@1"] == 0.0 and rec["i2t_R@4"] == 0.0
    perfect = torch.eye(5)
    assert retrieval_recall(perfect, perfect)["mean_recall"] == 1.0


def test_zeroshot_accuracy_on_known_vectors():
    classifier = torch.eye(3)
    feats = torch.tensor([[1.0, 0.1, 0], [0, 1, 0.2], [0.9, 0, 0.5], [0, 0.3, 1]])
    labels = torch.tensor([0, 1, 2, 2])
    acc = zeroshot_accuracy(feats, classifier, labels, ks=(1, 2))
    assert acc["top1"] == 0.75 and acc["top2"] == 1.0
    assert acc["balanced_top1"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_labelled_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("dense_urban", "forest"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    images, labels, names = load_labelled_folder(tmp_path, 32)
    assert (
        images.shape == (4, 32, 32, 3)
        and labels.tolist() == [0, 0, 1, 1]
        and names == ["dense urban", "forest"]
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(RSSQAError, match="empty: no images"):
        load_labelled_folder(tmp_path, 32)


# ------------------------------------------------------------------------------------------------ corpus
def _batches(stream: CorpusStream, epoch: int, start: int = 0, workers: int = 0) -> list[dict]:
    loader = EpochLoader(stream, position=lambda: epoch * len(stream) + start, num_workers=workers)
    return list(loader)


def test_stream_batches_shapes_and_bad_samples(shards, spec):
    stream = CorpusStream(shards, spec, batch_size=8, batches_per_epoch=6, resampled=False, shuffle=0)
    batches = _batches(stream, 0)
    assert len(batches) == 6
    b = batches[0]
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["text"].shape == (8, 40) and b["text"].dtype == torch.int64
    keys = [k for b in batches for k in b["__key__"]]
    assert "s0_0003" not in keys and sum(b["n_bad"] for b in batches) == 1  # the corrupt one, counted
    assert len(set(keys[:47])) == 47  # one pass over 47 good samples before repeating


def test_stream_is_reproducible_and_resumes_mid_epoch(shards, spec):
    stream = CorpusStream(shards, spec, batch_size=8, batches_per_epoch=5, seed=3, shuffle=32)
    full = _batches(stream, 1)
    again = _batches(stream, 1)
    resumed = _batches(stream, 1, start=2)
    assert [b["__key__"] for b in full] == [b["__key__"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again, strict=True))
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[2:], resumed, strict=True))
    assert [b["__key__"] for b in _batches(stream, 2)] != [b["__key__"] for b in full]


def test_stream_resumes_with_workers(shards, spec):
    stream = CorpusStream(shards, spec, batch_size=4, batches_per_epoch=6, seed=1, shuffle=16)
    full = _batches(stream, 0, workers=2)
    resumed = _batches(stream, 0, start=3, workers=2)
    assert len(full) == 6
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[3:]]


def test_empty_and_missing_shards(tmp_path, spec):
    with pytest.raises(RSSQAError, match="nothing-here: shard not found"):
        check_shards(tmp_path / "nothing-here")
    with pytest.raises(RSSQAError, match="no shards found"):
        check_shards(str(tmp_path / "*.tar"))
    (tmp_path / "empty").mkdir()
    with wds.TarWriter(str(tmp_path / "empty" / "shard-000000.tar")):
        pass
    with pytest.raises(RSSQAError, match="hold no usable samples"):
        check_shards(tmp_path / "empty")
    stream = CorpusStream(tmp_path / "empty", spec, batch_size=2, batches_per_epoch=1, resampled=False)
    with pytest.raises(RSSQAError, match="no usable samples"):
        _batches(stream, 0)


# ------------------------------------------------------------------------------------------------ task
def _datamodule(shards: Path, **kw) -> CorpusDataModule:
    args = dict(
        batch_size=8, samples_per_epoch=32, shuffle=16, eval_scenes=12, eval_pairs=16, eval_image_size=32
    )
    return CorpusDataModule(str(shards), **{**args, **kw})


def _trainer(tmp_path: Path, **kw) -> Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    return Trainer(**{**args, **kw})


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_task_trains_validates_and_learns(shards, tmp_path):
    seed_everything(0)
    task = PretrainTask("rs-tiny", lr=2e-3, warmup_steps=2)
    rec = LossRecorder()
    trainer = _trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=[rec])
    trainer.fit(task, datamodule=_datamodule(shards))
    assert trainer.global_step == 12 and len(rec.losses) == 12
    assert np.mean(rec.losses[-3:]) < rec.losses[0]  # the loss goes down on a tiny corpus
    m = task.eval_metrics
    assert 0 <= m["zeroshot_top1"] <= 1 and 0 <= m["retrieval_mean_recall"] <= 1
    assert {"retrieval_i2t_R@1", "retrieval_t2i_R@10", "zeroshot_balanced_top1"} <= set(m)
    assert task.last_eval_step == 12
    # the learned temperature is kept within open_clip's bound
    assert float(task.model.logit_scale.detach()) <= math.log(100) + 1e-6


def test_accumulation_and_grad_checkpointing(shards, tmp_path):
    seed_everything(0)
    task = PretrainTask("rs-tiny", grad_checkpointing=True, warmup_steps=1)
    assert task.model.visual.transformer.grad_checkpointing
    rec = LossRecorder()
    dm = _datamodule(shards, samples_per_epoch=40, eval_scenes=0, eval_pairs=0)
    trainer = _trainer(
        tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[rec], enable_checkpointing=False
    )
    trainer.fit(task, datamodule=dm)
    # 40 samples of batch 8 -> 5 batches, cut to whole optimiser steps: 4 batches, 2 steps
    assert dm.batches_per_epoch == 4 and len(rec.losses) == 4 and trainer.global_step == 2


def test_nan_stops_with_the_last_good_checkpoint_named(shards, tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.visual.proj.fill_(float("nan"))

    seed_everything(0)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_last=True, save_top_k=0
    )
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[Poison(), ckpt], limit_val_batches=0)
    with pytest.raises(
        RSSQAError,
        match=r"step 3: training loss is not finite \(nan\); last good checkpoint kept as .*last-good\.ckpt",
    ):
        trainer.fit(
            PretrainTask("rs-tiny", warmup_steps=1),
            datamodule=_datamodule(shards, eval_scenes=0, eval_pairs=0),
        )
    kept = tmp_path / "checkpoints" / LAST_GOOD
    state = torch.load(kept, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_task_starts_from_a_local_checkpoint(shards, tmp_path):
    from rssqa.models.clip import export_clip

    seed_everything(1)
    model, _, _, _ = create_clip("rs-tiny")
    out = export_clip(model, "rs-tiny", tmp_path / "remoteclip_like")
    task = PretrainTask("rs-tiny", checkpoint=str(out))
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(encode_images(task.model, images), encode_images(model, images))
    with pytest.raises(RSSQAError, match="does not match model config 'rs-small'"):
        PretrainTask("rs-small", checkpoint=str(out))


# ------------------------------------------------------------------------------------------------ stage
def test_stage_end_to_end_in_process(shards, tmp_path, monkeypatch):
    """The real entry point on fixture shards: summary keys, export loadable by open_clip, logs."""
    import importlib.util

    monkeypatch.chdir(ROOT)
    spec_ = importlib.util.spec_from_file_location("stage_pretrain", ROOT / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(stage)
    out = tmp_path / "pretrain"
    folder = tmp_path / "labelled"
    for name, colour in (("bare_soil", (150, 110, 70)), ("water", (20, 60, 120))):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((48, 40, 3), colour, np.uint8)).save(folder / name / f"{i}.png")
    raw = {"zeroshot_top1": 0.25, "retrieval_mean_recall": 0.1}  # a finished raw-corpus run beside ours
    write_summary(tmp_path / "pretrain_raw", raw)
    summary = stage.main(pretrain_smoke_args(out, shards, 2, "--data.zeroshot_folder", str(folder)))
    saved = json.loads((out / "summary.json").read_text())
    for key in ("world_size", "samples_seen", "samples_per_s", "zeroshot_top1", "retrieval_mean_recall"):
        assert saved[key] == pytest.approx(summary[key]), key
    assert saved["world_size"] == 1 and saved["samples_seen"] == 32 and saved["global_step"] == 4
    assert saved["samples_per_s"] > 0 and saved["shards"] == str(shards)
    assert 0 <= saved["eval"]["folder_zeroshot_top1"] <= 1  # the real-folder option, evaluated too
    compare = saved["compare"]
    assert compare["other"] == str(tmp_path / "pretrain_raw")
    assert compare["zeroshot_top1"]["delta"] == pytest.approx(saved["zeroshot_top1"] - 0.25)
    assert compare["ours_better_on_both"] == (
        saved["zeroshot_top1"] > 0.25 and saved["retrieval_mean_recall"] > 0.1
    )
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "logs").glob("version_*/metrics.csv"))
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out / "clip_rs"))
    assert sum(p.numel() for p in model.parameters()) > 0
