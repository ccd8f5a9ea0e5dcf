"""``accelerator: auto`` in the smoke and demo profiles: a GPU where there is one, else the CPU, same results.

Runs the real pretrain stage (in-process, on tiny fixture shards) with the smoke profile's config, once
as it stands (``auto``) and once with ``--trainer.accelerator cpu``: the auto run must land on this
machine's accelerator (the CPU here), write its summary, and, on a CPU, match the explicit CPU run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import pretrain_smoke_args
from tests.ddp.common import write_fixture_shards

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "demo")
# what the summaries must agree on (timings excluded)
SAME = ("world_size", "samples_seen", "global_step", "epochs", "zeroshot_top1", "retrieval_mean_recall", "eval", "precision")


def expected_device() -> str:
    """The device Lightning's ``accelerator: auto`` picks on this machine."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_name_auto_not_cpu(profile):
    """Every stage config of the profile that names an accelerator names ``auto``."""
    named = {}
    for path in sorted((ROOT / "conf" / profile).glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if "accelerator" in (cfg.get("trainer") or {}):
            named[path.name] = cfg["trainer"]["accelerator"]
        train = ((cfg.get("sqed") or {}).get("train")) or {}
        if "accelerator" in train:
            named[path.name] = train["accelerator"]
    assert {"pretrain.yaml", "pretrain_raw.yaml", "purify.yaml", "sqa.yaml"} <= set(named)
    assert set(named.values()) == {"auto"}, named


def _stage():
    spec = importlib.util.spec_from_file_location("stage_pretrain_auto", ROOT / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def _run(stage, monkeypatch, shards: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    """The smoke pretrain stage, shrunk to 2 steps; returns its summary and where it ran."""
    seen: dict = {}
    finish = stage.finish

    def spy(trainer, task, *args, **kw):
        seen.update(
            accelerator=type(trainer.accelerator).__name__,
            root_device=trainer.strategy.root_device.type,
            model_device=task.device.type,
        )
        return finish(trainer, task, *args, **kw)

    monkeypatch.setattr(stage, "finish", spy)
    monkeypatch.setattr(sys, "argv", ["stages/pretrain.py"])  # the CLI reads args, not pytest's command line
    summary = stage.main(pretrain_smoke_args(out, shards, 1, "--compare_with", "null", *extra))
    return summary, seen


def test_smoke_pretrain_with_auto_runs_here_and_matches_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "conf" / "smoke" / "pretrain.yaml").read_text())
    assert config["trainer"]["accelerator"] == "auto"
    shards = write_fixture_shards(tmp_path / "corpus", n_shards=2, per_shard=16)
    stage = _stage()

    auto, seen = _run(stage, monkeypatch, shards, tmp_path / "auto")
    device = expected_device()
    assert seen["root_device"] == device and seen["model_device"] == device, seen
    if device == "cpu":
        assert seen["accelerator"] == "CPUAccelerator"
    saved = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert saved["global_step"] == 2 and saved["samples_seen"] == 16 and saved["world_size"] == 1
    assert saved["samples_per_s"] > 0 and saved["zeroshot_top1"] is not None
    assert (tmp_path / "auto" / "clip_rs").is_dir()

    if device != "cpu":
        pytest.skip(f"auto picked {device}: the comparison with a CPU run is for CPU machines")
    cpu, seen_cpu = _run(stage, monkeypatch, shards, tmp_path / "cpu", "--trainer.accelerator", "cpu")
    assert seen_cpu["accelerator"] == "CPUAccelerator"
    assert {k: auto[k] for k in SAME} == {k: cpu[k] for k in SAME}
