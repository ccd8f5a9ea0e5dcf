"""stages/sqed.py as two ranks (``--local_ranks 2``: a second process with RANK/WORLD_SIZE, as torchrun starts
it) builds what one process builds, each unit trained by exactly one rank; with three methods, the ranks'
shares of the agreement between methods join into a one-process build's file, and a rank that builds all
of a source's methods labels them and writes their agreement in one pass, as one process does.

Compared with a one-process build: the table, splits and pool files byte for byte; the label shards array
for array and their metadata except ``seconds`` (the labelling time, recorded in the shard, so the files'
bytes differ between any two runs); the checkpoints tensor for tensor.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rssqa.data.sqed import TABLE, read_label_shard
from rssqa.errors import RSSQAError
from rssqa.runs import read_summary
from rssqa.tasks.sqed import Ranks, TrainConfig, build_sqed
from tests.conftest import stage_env
from tests.tasks.test_sqed import ROOT, tiny_config

pytestmark = pytest.mark.slow

# the two sources and two methods of tiny_config; rank r of 2 owns the units i % 2 == r with
# i = method_index * 2 + source_index: rank 0 vaihingen's, rank 1 loveda's
OWNER = {"vaihingen/pspnet": 0, "vaihingen/linknet": 0, "loveda/pspnet": 1, "loveda/linknet": 1}
UNIT_LINE = re.compile(r"^  rank (\d+): (\S+) (trained|reused its checkpoint), ", re.MULTILINE)


def run_ranks(config: Path, out: Path, python: Sequence[str], start_method: str = "", timeout: float = 900) -> str:
    """``--local_ranks 2``: the stage (run by ``python``) starts rank 1 itself (with torchrun's rank
    variables; ``start_method``: how, ``RSSQA_START_METHOD``) and is rank 0; their stdout together.
    Neither outlives the call."""
    env = {**stage_env(), "RSSQA_START_METHOD": start_method}
    cmd = [*python, str(ROOT / "stages" / "sqed.py"), "--config", str(config), "--out", str(out),
           "--wait_s", "600", "--local_ranks", "2"]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    return stdout


def unit_files(out: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.glob(pattern))


def test_two_ranks_build_what_one_process_builds(tiny_world, tmp_path, stage_python):
    cfg = tiny_config(tiny_world, train=TrainConfig(epochs=1, batch_size=4))
    config = tmp_path / "sqed.yaml"
    config.write_text(yaml.safe_dump({"sqed": asdict(cfg)}, sort_keys=False))  # splits: key order counts
    one = tmp_path / "one"
    build_sqed(cfg, one, ranks=Ranks())
    # rank 1 forked from rank 0 (its imports inherited), and started as a fresh interpreter where forking
    # is unsafe (here: asked for); each the same build as one process
    for start in ("fork", "spawn"):
        two = tmp_path / start
        stdout = run_ranks(config, two, stage_python, start_method=start)

        # each unit trained and labelled by its owner only
        seen = [(int(r), unit, how) for r, unit, how in UNIT_LINE.findall(stdout)]
        assert sorted((unit, r, how) for r, unit, how in seen) == sorted(
            (u, r, "trained") for u, r in OWNER.items()
        )
        for unit, rank in OWNER.items():
            record = json.loads((two / "methods" / unit / "train.json").read_text())
            assert (record["rank"], record["world_size"]) == (rank, 2)
        how = {"fork": "forked from it", "spawn": "fresh interpreters"}[start]
        assert f"sqed: 2 ranks on this machine (this process is rank 0, the others {how})" in stdout
        assert "sqed: rank 1 of 2, local rank 1" in stdout
        assert "rank 0 writes the table" in stdout and "sqed -> " in stdout
        summary = read_summary(two)
        assert summary["world_size"] == 2 and set(summary["units"]) == {u for u, r in OWNER.items() if r == 0}

        # the same build
        assert (two / TABLE).read_bytes() == (one / TABLE).read_bytes()
        assert read_summary(one)["n_rows"] == summary["n_rows"] == len((one / TABLE).read_text().splitlines()) - 1
        shared = ["splits.json", *unit_files(one, "pool/*/*")]
        assert unit_files(two, "pool/*/*") == unit_files(one, "pool/*/*")
        for name in shared:
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
        shards = unit_files(one, "features/*/*.safetensors")
        assert len(shards) == 4 and unit_files(two, "features/*/*.safetensors") == shards
        for name in shards:
            (a, meta_a), (b, meta_b) = read_label_shard(one / name), read_label_shard(two / name)
            assert a.keys() == b.keys() and all(
                np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a
            )
            assert meta_a.pop("seconds") >= 0 and meta_b.pop("seconds") >= 0
            assert meta_a == meta_b, name
        for unit in OWNER:
            wa, wb = (
                torch.load(d / "methods" / unit / "final.ckpt", weights_only=False)["state_dict"]
                for d in (one, two)
            )
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), unit
            # every rank writes the CSV logs of its own fits
            assert (two / "logs" / unit / "metrics.csv").is_file(), unit


def test_ranks_share_the_agreement_between_methods(tiny_world, tmp_path, monkeypatch):
    """With three methods of one source spread over two ranks, each rank computes the agreement of its
    share of the pool (rank 1 first here, so rank 0 finds its part): the file and the table are a
    one-process build's (which labels and agrees in one pass), and no part file is left."""
    from rssqa.tasks.sqed import agreement as sqed_agreement

    cfg = tiny_config(tiny_world, methods=["pspnet", "linknet", "fpn"], train=TrainConfig(epochs=1, batch_size=4))
    cfg = replace(cfg, sources=cfg.sources[:1])  # vaihingen: pspnet and fpn on rank 0, linknet on rank 1
    one = tmp_path / "one"
    summary = build_sqed(cfg, one)
    assert summary["agreement"]["computed"] == ["vaihingen"]
    two = tmp_path / "two"
    shutil.copytree(one, two)
    (two / "summary.json").unlink()
    for f in two.glob("features/*/agreement.safetensors"):
        f.unlink()
    report = build_sqed(cfg, two, ranks=Ranks(1, 2))
    assert report["rank"] == 1 and report["agreement_s"] >= 0
    parts = sorted(p.relative_to(two).as_posix() for p in two.glob("features/*/agreement.part*"))
    assert parts == ["features/vaihingen/agreement.part1of2.safetensors"]
    monkeypatch.setattr(sqed_agreement, "POLL_S", 0.05)
    summary = build_sqed(cfg, two, ranks=Ranks(0, 2), wait_s=5)
    assert summary["agreement"]["computed"] == ["vaihingen"]
    assert not list(two.glob("features/*/agreement.part*"))
    for source in ("vaihingen",):
        (a, meta_a), (b, meta_b) = (read_label_shard(d / "features" / source / "agreement.safetensors") for d in (one, two))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), source
        assert meta_a.pop("seconds") >= 0 and meta_b.pop("seconds") >= 0 and meta_a == meta_b
    assert (two / TABLE).read_bytes() == (one / TABLE).read_bytes()
    # a part that never comes: rank 0 names the rank it waited for
    (two / "features" / "vaihingen" / "agreement.safetensors").unlink()
    with pytest.raises(RSSQAError, match=r"agreement parts of ranks \[1\] did not come in 0.1 s"):
        build_sqed(cfg, two, ranks=Ranks(0, 2), wait_s=0.1)


def test_a_rank_that_builds_all_of_a_source_labels_and_agrees_it_alone(tiny_world, tmp_path, monkeypatch):
    """Two sources, three methods, two ranks: each rank builds every method of one source, labels them
    and writes their agreement in one pass (no part files); rank 0 waits for the other source's file. The
    shards, the agreement files and the table are a one-process build's."""
    from rssqa.tasks.sqed import agreement as sqed_agreement

    cfg = tiny_config(tiny_world, methods=["pspnet", "linknet", "fpn"], train=TrainConfig(epochs=1, batch_size=4))
    one = tmp_path / "one"
    build_sqed(cfg, one)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    (two / "summary.json").unlink()
    for f in [*two.glob("features/*/agreement.safetensors"), two / "features" / "loveda" / "fpn.safetensors"]:
        f.unlink()
    report = build_sqed(cfg, two, ranks=Ranks(1, 2))  # loveda's: one shard and the agreement written again
    assert report["units"]["loveda/fpn"] == {"trained": False, "labelled": True} and report["labelled"] == 1
    assert not list(two.glob("features/*/agreement.part*")) and (two / "features" / "loveda" / "agreement.safetensors").is_file()
    monkeypatch.setattr(sqed_agreement, "POLL_S", 0.05)
    summary = build_sqed(cfg, two, ranks=Ranks(0, 2), wait_s=5)
    # loveda's file was there before rank 0 started (here the ranks ran one after the other)
    assert summary["agreement"] == {"computed": ["vaihingen"], "reused": ["loveda"], "seconds": summary["agreement"]["seconds"]}
    assert summary["labelled"] == 0
    for name in unit_files(one, "features/*/*.safetensors"):
        (a, meta_a), (b, meta_b) = (read_label_shard(d / name) for d in (one, two))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
        assert meta_a.pop("seconds") >= 0 and meta_b.pop("seconds") >= 0 and meta_a == meta_b, name
    assert (two / TABLE).read_bytes() == (one / TABLE).read_bytes()
    # a lost shard alone: only its method runs again, the agreement file stays as it was
    agreement = two / "features" / "loveda" / "agreement.safetensors"
    before = agreement.stat().st_mtime_ns
    (two / "features" / "loveda" / "linknet.safetensors").unlink()
    assert build_sqed(cfg, two, ranks=Ranks(1, 2))["labelled"] == 1 and agreement.stat().st_mtime_ns == before
    (a, _), (b, _) = (read_label_shard(d / "features" / "loveda" / "linknet.safetensors") for d in (one, two))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # rerun as is: all reused; a file that never comes: rank 0 names it
    (two / "summary.json").unlink()
    assert build_sqed(cfg, two, ranks=Ranks(0, 2), wait_s=5)["agreement"]["reused"] == ["loveda", "vaihingen"]
    (two / "summary.json").unlink()
    (two / "features" / "loveda" / "agreement.safetensors").unlink()
    with pytest.raises(RSSQAError, match=r"the agreement of loveda did not come in 0.1 s"):
        build_sqed(cfg, two, ranks=Ranks(0, 2), wait_s=0.1)
