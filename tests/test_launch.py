"""Cluster launch: every stage's SLURM and torchrun script renders with the right world size and command."""

from __future__ import annotations

import re
import subprocess

import pytest

from rssqa.errors import RSSQAError
from rssqa.launch import STAGES, UNIT_PARALLEL, main, render
from tests.conftest import ROOT

COMMANDS = {
    "purify": "stages/purify.py --config conf/paper/purify.yaml --out runs/paper/purify",
    "pretrain": "stages/pretrain.py --config conf/paper/pretrain.yaml --out runs/paper/pretrain",
    "pretrain_raw": "stages/pretrain.py --config conf/paper/pretrain_raw.yaml --out runs/paper/pretrain_raw",
    "sqed": "stages/sqed.py --config conf/paper/sqed.yaml --out runs/paper/sqed",
    "sqa": "stages/sqa.py --config conf/paper/sqa.yaml --out runs/paper/sqa",
}


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
@pytest.mark.parametrize("stage", [s for s in STAGES if s not in UNIT_PARALLEL])
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
def test_sqed_launches_one_task_per_gpu_with_its_own_command_line(launcher):
    """sqed's ranks share out units: nodes x gpus tasks of the local command, no trainer arguments."""
    assert UNIT_PARALLEL == ("sqed",)
    text = render("sqed", COMMANDS["sqed"].split(), "paper", nodes=2, gpus=8, launcher=launcher)
    assert "world size 16" in text and "--trainer." not in text
    assert not re.search(r"\$\{[A-Z_]+\}", text)
    # the command ends the launch line: srun / torchrun start it once per task
    launch = text.rstrip().splitlines()[-1]
    assert launch.endswith(COMMANDS["sqed"])
    if launcher == "slurm":
        assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text
        assert launch.startswith("srun ")  # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID per task
    else:
        assert "--nnodes=2 --nproc-per-node=8" in text  # RANK / WORLD_SIZE / LOCAL_RANK per process
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_bad_launches_are_one_line_errors(capsys):
    with pytest.raises(RSSQAError, match="no such config"):
        render("pretrain", ["stages/pretrain.py", "--config", "conf/paper/nope.yaml"], "paper", 1, 1)
    with pytest.raises(RSSQAError, match="nodes and gpus"):
        render("pretrain", COMMANDS["pretrain"].split(), "paper", 0, 8)
    assert main(["pretrain", "--dry-run", "--"]) == 2
    assert "give the stage's command" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "sqed"])
def test_make_dry_run_prints_a_world_size_32_launch(stage):
    r = subprocess.run(
        ["make", "--no-print-directory", stage, "PROFILE=paper", "NODES=4", "GPUS=8", "DRY_RUN=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "= world size 32" in r.stdout and f"stages/{stage}.py --config conf/paper/{stage}.yaml" in r.stdout
    trainer_args = "--trainer.num_nodes 4 --trainer.devices 8" in r.stdout
    assert trainer_args == (stage == "pretrain")
