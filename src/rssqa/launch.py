"""Render (and submit) the cluster launch of a stage: SLURM ``sbatch`` + ``srun``, or ``torchrun``.

The launched command is the stage's own local command line, run as one task per GPU (``nodes x gpus``
tasks): the same code path as a local run. Stages that train one model with DDP get the trainer told
the nodes and devices; sqed, whose ranks share out independent (source, method) units, takes the line
as it is and each task reads its rank from srun's or torchrun's environment. ``--dry-run`` prints the
script instead of submitting it.

Usage: ``python -m rssqa.launch pretrain --profile paper --nodes 4 --gpus 8 --dry-run -- stages/pretrain.py
--config conf/paper/pretrain.yaml --out runs/paper/pretrain`` (the Makefile does this for ``NODES=``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from rssqa.errors import RSSQAError

STAGES = ("purify", "pretrain", "pretrain_raw", "sqed", "sqa")
# stages whose ranks share out independent units, each rank reading its rank from the launcher's
# environment (RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID): no trainer arguments
UNIT_PARALLEL = ("sqed",)
LAUNCHERS = {"slurm": "slurm.sbatch", "torchrun": "torchrun.sh"}
ROOT = Path(__file__).resolve().parents[2]


def distributed_args(nodes: int, gpus: int) -> list[str]:
    """Trainer arguments that every stage's CLI takes, telling Lightning the nodes and devices."""
    return [
        "--trainer.accelerator", "gpu",
        "--trainer.num_nodes", str(nodes),
        "--trainer.devices", str(gpus),
        "--trainer.strategy", "ddp",
    ]  # fmt: skip


def render(
    stage: str,
    command: list[str],
    profile: str,
    nodes: int,
    gpus: int,
    launcher: str = "slurm",
    runs: str = "runs",
    time: str = "24:00:00",
    partition: str | None = None,
    cpus_per_task: int = 8,
    python: str = ".venv/bin/python",
) -> str:
    """The launch script for ``stage`` as text.

    Args:
        stage: the stage's name.
        command: the stage's local command line (entry point and arguments), as the Makefile runs it;
            the nodes and devices are appended (not for the stages of :data:`UNIT_PARALLEL`).

    Raises:
        RSSQAError: unknown stage or launcher, missing config, or a non-positive node or GPU count.
    """
    if stage not in STAGES:
        raise RSSQAError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if launcher not in LAUNCHERS:
        raise RSSQAError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if nodes < 1 or gpus < 1:
        raise RSSQAError(f"nodes and gpus must be >= 1 (got nodes={nodes}, gpus={gpus})")
    if not command or not command[0].endswith(".py"):
        raise RSSQAError(f"launch {stage}: give the stage's command after '--' (got {' '.join(command)!r})")
    for flag, value in zip(command, command[1:], strict=False):
        if flag == "--config" and not (ROOT / value).is_file():
            raise RSSQAError(f"{value}: no such config for stage {stage!r} and profile {profile!r}")
    if stage not in UNIT_PARALLEL:
        command = [*command, *distributed_args(nodes, gpus)]
    template = Template((ROOT / "conf" / "cluster" / LAUNCHERS[launcher]).read_text())
    return template.substitute(
        STAGE=stage,
        PROFILE=profile,
        NODES=nodes,
        NODES_MINUS_ONE=nodes - 1,
        GPUS=gpus,
        WORLD_SIZE=nodes * gpus,
        CPUS_PER_TASK=cpus_per_task,
        TIME=time,
        PARTITION_LINE=f"#SBATCH --partition={partition}" if partition else "",
        RUN_DIR=f"{runs}/{profile}/{stage}",
        PROJECT_DIR=shlex.quote(str(ROOT)),
        PYTHON=python,
        WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
        RUN_GROUP=os.environ.get("RSSQA_RUN_GROUP", f"{profile}-cluster"),
        COMMAND=" ".join(shlex.quote(c) for c in command),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m rssqa.launch STAGE [options] -- STAGE_COMMAND ...",
    )  # fmt: skip
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--launcher", choices=list(LAUNCHERS), default="slurm")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--partition")
    ap.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    try:
        text = render(args.stage, command, args.profile, args.nodes, args.gpus, args.launcher, args.runs,
                      args.time, args.partition)  # fmt: skip
    except RSSQAError as e:
        print(f"rssqa launch: {e}", file=sys.stderr)
        return 2
    out = Path(args.runs) / args.profile / args.stage / "launch" / LAUNCHERS[args.launcher]
    if args.dry_run:
        print(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    if args.launcher == "slurm":
        if shutil.which("sbatch") is None:
            print(f"rssqa launch: sbatch not found; the script is at {out}", file=sys.stderr)
            return 2
        return subprocess.call(["sbatch", str(out)])
    print(f"run {out} on each of the {args.nodes} node(s) with NODE_RANK and MASTER_ADDR set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
