"""Experiment tracking shared by every stage: CSV always, Weights & Biases offline unless asked online.

All stages of one pipeline run log to one W&B project (``WANDB_PROJECT``, default ``rssqa``) in one
group (``RSSQA_RUN_GROUP``, set once per ``make demo``), each stage a run named after it. Offline runs
are written under the stage's run folder; ``wandb sync <run folder>/wandb/offline-run-*`` uploads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


def wandb_mode() -> str:
    """``online`` only when the user sets ``WANDB_MODE=online``; ``disabled`` turns W&B off."""
    mode = os.environ.get("WANDB_MODE", "offline").lower()
    return mode if mode in ("online", "offline", "disabled") else "offline"


def run_group(profile: str) -> str:
    """The W&B group of this pipeline run."""
    return os.environ.get("RSSQA_RUN_GROUP") or profile


def make_loggers(run_dir: str | os.PathLike, stage: str, profile: str, config: dict[str, Any] | None = None) -> list[Logger]:
    """The stage's loggers: a :class:`CSVLogger` in ``run_dir/csv`` and, unless disabled, a :class:`WandbLogger`.

    Args:
        run_dir: the stage's run folder (``runs/<profile>/<stage>``).
        stage: the stage name (the W&B run name and job type).
        profile: smoke, demo or paper (a W&B tag).
        config: hyper-parameters to record with the W&B run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv", version="")]
    mode = wandb_mode()
    if mode != "disabled":
        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "rssqa"),
                group=run_group(profile),
                name=stage,
                job_type=stage,
                tags=[profile, stage],
                save_dir=str(run_dir),
                offline=mode != "online",
                config=config,
            )
        )
    return loggers
