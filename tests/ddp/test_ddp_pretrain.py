"""Two gloo processes through stages/pretrain.py take the same steps as one process on the global batch."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from rssqa.tasks.pretrain import PretrainTask
from tests.ddp.common import run_stage, step_losses, write_fixture_shards

STEPS = 4


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, stage_python):
    shards = write_fixture_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    record, out = tmp_path / "record", tmp_path / "pretrain"
    callbacks = [
        {"class_path": "tests.ddp.pretrain_record.RecordBatches", "init_args": {"out_dir": str(record)}}
    ]
    (tmp_path / "record.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    run_stage(
        out, shards,
        "--config", str(tmp_path / "record.yaml"),
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.max_steps", str(STEPS),
        "--data.samples_per_epoch", str(STEPS * 16),
        "--checkpoint.every_n_train_steps", "100",
        python=stage_python,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS
    assert summary["samples_seen"] == STEPS * 16 and summary["global_batch_size"] == 16
    ddp_losses = step_losses(next((out / "logs").glob("version_*/metrics.csv")))
    assert sorted(ddp_losses) == list(range(STEPS))

    # one process, the same initial weights, hyper-parameters and global batches (rank 0 rows first,
    # the order in which ClipLoss gathers features)
    config = yaml.safe_load(next((out / "logs").glob("version_*/config.yaml")).read_text())
    task = PretrainTask(**config["model"])
    task.model.load_state_dict(torch.load(record / "init.pt"))
    batches = []
    for step in range(STEPS):
        parts = [torch.load(record / f"rank{r}-step{step}.pt") for r in (0, 1)]
        assert parts[0]["keys"] != parts[1]["keys"]  # each rank reads its own (resampled) stream
        batches.append({k: torch.cat([p[k] for p in parts]) for k in ("image", "text")})
    recorder = LossRecorder()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
        default_root_dir=tmp_path / "single",
    )
    trainer.fit(task, train_dataloaders=DataLoader(batches, batch_size=None))
    assert recorder.losses == pytest.approx([ddp_losses[s] for s in range(STEPS)], rel=1e-4, abs=1e-5)
    # the steps matter: the later losses differ from the first, so the updates were compared too
    assert abs(recorder.losses[-1] - recorder.losses[0]) > 1e-3
