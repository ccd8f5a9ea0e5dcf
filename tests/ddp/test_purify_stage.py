"""The real purify stage in subprocesses: killed part-way then rerun (equals an uninterrupted run), and
run as two gloo processes (every input sample exactly once in the output)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.conftest import stage_env
from tests.tasks.test_purify import ROOT, build_corpus, input_keys, read_tar, stage_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tiny_world, tmp_path_factory) -> dict[str, object]:
    return build_corpus(tiny_world, tmp_path_factory.mktemp("extra"))


def stage_cmd(corpus, out: Path, *extra: str, python: Sequence[str] = (sys.executable,)) -> list[str]:
    return [*python, str(ROOT / "stages" / "purify.py"), *stage_args(corpus, out, *extra)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def kill_when(cmd: list[str], ready, timeout: float = 600) -> None:
    """Start the stage and SIGKILL it as soon as ``ready()`` holds (a real, unannounced kill)."""
    proc = subprocess.Popen(cmd, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the stage ended before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_stage_killed_part_way_then_rerun_equals_uninterrupted(corpus, tmp_path, stage_python):
    whole = tmp_path / "whole"
    subprocess.run(stage_cmd(corpus, whole, python=stage_python), check=True, env=stage_env(), capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    cmd = stage_cmd(corpus, cut)
    done = cut / "done"
    # first kill: while the captioner is being fitted (the filter is already exported)
    kill_when(cmd, lambda: (cut / "rounds" / "0" / "filter" / "open_clip_config.json").is_file())
    assert not (cut / "rounds" / "0" / "captioner").exists() and not done.exists()
    # second kill: part-way through the write pass
    kill_when(cmd, lambda: done.is_dir() and len(list(done.glob("*.json"))) >= 1)
    n_done = len(list(done.glob("*.json")))
    assert 1 <= n_done < 5, "the kill should land part-way through the write pass"
    assert not (cut / "summary.json").exists()
    subprocess.run(stage_cmd(corpus, cut, python=stage_python), check=True, env=stage_env(), capture_output=True, timeout=600)
    assert shard_bytes(cut) == shard_bytes(whole)
    for path in sorted((whole / "done").glob("*.json")):
        a, b = json.loads(path.read_text()), json.loads((done / path.name).read_text())
        assert a["records"] == b["records"] and a["bad"] == b["bad"]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    for k in ("n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad", "noise_f1", "threshold"):
        assert a[k] == b[k]


@pytest.mark.ddp
def test_stage_as_two_gloo_processes_outputs_each_sample_once(corpus, tmp_path, stage_python):
    out = tmp_path / "ddp"
    cmd = stage_cmd(corpus, out, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                    python=stage_python)  # fmt: skip
    res = subprocess.run(cmd, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the CPU time counts both ranks' processes: rank 1 was still running when rank 0 wrote the summary
    cpu = [r["cpu_s"] for r in summary["per_rank"]]
    # (each figure is rounded to 0.01 s on its own: the total may sit up to 0.01 under the rounded parts' sum)
    assert len(cpu) == 2 and min(cpu) > 0 and summary["cpu_s"] >= cpu[0] + cpu[1] - 0.011
    markers = [json.loads(p.read_text()) for p in sorted((out / "done").glob("*.json"))]
    assert {m["rank"] for m in markers} == {0, 1}
    accounted = [r["key"] for m in markers for r in m["records"]] + [b["key"] for m in markers for b in m["bad"]]
    assert sorted(accounted) == sorted(input_keys(corpus["inputs"]))
    written = [k for p in sorted((out / "shards").glob("*.tar")) for k in read_tar(p)]
    kept = [r["key"] for m in markers for r in m["records"] if r["decision"] != "dropped"]
    assert sorted(written) == sorted(kept) and len(written) == len(set(written))
    assert summary["n_in"] == len(accounted)
