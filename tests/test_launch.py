"""Cluster launch: every stage's SLURM and torchrun script renders with the right world size and command."""

from __future__ import annotations

import re
import subprocess

import pytest

from rssqa.errors import RSSQAError
from rssqa.launch import SINGLE_PROCESS, STAGES, main, render
from tests.conftest import ROOT

COMMANDS = {
    "purify": "stages/purify.py --config conf/paper/purify.yaml --out runs/paper/purify",
    "pretrain": "stages/pretrain.py --config conf/paper/pretrain.yaml --out runs/paper/pretrain",
    "pretrain_raw": "stages/pretrain.py --config conf/paper/pretrain_raw.yaml --out runs/paper/pretrain_raw",
    "sqed": "stages/sqed.py --config conf/paper/sqed.yaml --out runs/paper/sqed",
    "sqa": "stages/sqa.py --config conf/paper/sqa.yaml --out runs/paper/sqa",
}


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
@pytest.mark.parametrize("stage", [s for s in STAGES if s not in SINGLE_PROCESS])
def test_every_template_renders(stage, launcher):
    text = render(stage, COMMANDS[stage].split(), "paper", nodes=4, gpus=8, launcher=launcher)
    assert "world size 32" in text
    assert COMMANDS[stage] + " --trainer.accelerator gpu --trainer.num_nodes 4 --trainer.devices 8" in text
    assert not re.search(r"\$\{[A-Z_]+\}", text)  # every template placeholder filled
    if launcher == "slurm":
        assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=8" in text and "srun " in text
    else:
        assert "--nnodes=4 --nproc-per-node=8" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0  # valid shell


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
def test_single_process_stage_renders_for_one_device_and_refuses_more(launcher):
    text = render("sqed", COMMANDS["sqed"].split(), "paper", nodes=1, gpus=1, launcher=launcher)
    assert "world size 1" in text and COMMANDS["sqed"] in text and "--trainer." not in text
    with pytest.raises(RSSQAError, match="runs as one process"):
        render("sqed", COMMANDS["sqed"].split(), "paper", nodes=2, gpus=8, launcher=launcher)


def test_bad_launches_are_one_line_errors(capsys):
    with pytest.raises(RSSQAError, match="no such config"):
        render("pretrain", ["stages/pretrain.py", "--config", "conf/paper/nope.yaml"], "paper", 1, 1)
    with pytest.raises(RSSQAError, match="nodes and gpus"):
        render("pretrain", COMMANDS["pretrain"].split(), "paper", 0, 8)
    assert main(["pretrain", "--dry-run", "--"]) == 2
    assert "give the stage's command" in capsys.readouterr().err


def test_make_dry_run_prints_a_world_size_32_launch():
    r = subprocess.run(
        ["make", "--no-print-directory", "pretrain", "PROFILE=paper", "NODES=4", "GPUS=8", "DRY_RUN=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "= world size 32" in r.stdout and "--trainer.num_nodes 4 --trainer.devices 8" in r.stdout
