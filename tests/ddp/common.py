"""Helpers of the subprocess tests of the pretrain stage: run it, read its per-step losses."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from rssqa.world import sample_pairs
from tests.conftest import stage_env

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "stages" / "pretrain.py"


def stage_command(out: Path, shards: Path, *extra: str, python: Sequence[str] = (sys.executable,)) -> list[str]:
    """The pretrain stage on tiny fixture shards: rs-tiny, batch 8, small held-out sets, no W&B;
    ``python``: a fresh interpreter, or the ``stage_python`` fixture's preloaded one."""
    return [
        *python, str(STAGE),
        "--config", str(ROOT / "conf" / "smoke" / "pretrain.yaml"),
        "--out", str(out),
        "--data.shards", str(shards),
        "--data.batch_size", "8",
        "--data.eval_scenes", "12",
        "--data.eval_pairs", "16",
        "--data.eval_image_size", "32",
        "--trainer.log_every_n_steps", "1",
        "--wandb", "false",
        *extra,
    ]  # fmt: skip


def run_stage(
    out: Path, shards: Path, *extra: str, python: Sequence[str] = (sys.executable,), timeout: float = 600
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        stage_command(out, shards, *extra, python=python),
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def step_losses(metrics_csv: Path) -> dict[int, float]:
    """``{step: train/loss}`` from a CSVLogger file (step = the batch's global step before its update)."""
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _jpg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_fixture_shards(folder: Path, n_shards: int = 3, per_shard: int = 16, bad: bool = False) -> Path:
    """Tiny shards in the corpus format, written with plain webdataset; optionally one corrupt image."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = sample_pairs(n_shards * per_shard, 32, seed=7)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(per_shard):
                p = pairs[s * per_shard + i]
                jpg = b"\xff\xd8 not a jpeg" if bad and s == 0 and i == 3 else _jpg(p["image"])
                w.write(
                    {"__key__": f"s{s}_{i:04d}", "jpg": jpg, "txt": p["txt"], "json": json.dumps(p["json"])}
                )
    return folder
