"""A pretrain run killed part-way (SIGKILL) and started again ends like an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stage_env
from tests.ddp.common import ROOT, run_stage, stage_command, step_losses, write_fixture_shards

# 4 steps per epoch, 10 steps: the kill lands in the first epochs and the resumed run crosses epochs
ARGS = (
    "--trainer.max_steps",
    "10",
    "--data.samples_per_epoch",
    "32",
    "--checkpoint.every_n_train_steps",
    "3",
)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_steps_and_losses(tmp_path, stage_python):
    shards = write_fixture_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run_stage(ref, shards, *ARGS, python=stage_python)
    ref_losses = step_losses(next((ref / "logs").glob("version_0/metrics.csv")))
    assert sorted(ref_losses) == list(range(10))

    proc = subprocess.Popen(
        stage_command(out, shards, *ARGS), cwd=ROOT, env=stage_env(), stderr=subprocess.PIPE
    )
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()
    resumed_from = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 3 <= resumed_from < 10

    proc = run_stage(out, shards, *ARGS, python=stage_python)
    assert f"resuming from {last}" in proc.stderr
    losses = step_losses(out / "logs" / "version_1" / "metrics.csv")
    assert sorted(losses) == list(range(resumed_from, 10))
    assert [losses[s] for s in sorted(losses)] == pytest.approx(
        [ref_losses[s] for s in sorted(losses)], rel=1e-6
    )

    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("global_step", "samples_seen", "epochs", "zeroshot_top1", "retrieval_mean_recall"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    a, b = (load_file(str(d / "clip_rs" / "open_clip_model.safetensors")) for d in (out, ref))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
