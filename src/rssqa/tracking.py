"""Experiment tracking shared by every stage: CSV always, Weights & Biases offline unless asked online.

All stages of one pipeline run log to one W&B project (``WANDB_PROJECT``, default ``rssqa``) in one
group (``RSSQA_RUN_GROUP``, set once per ``make demo``; the profile name otherwise), each stage a run
named after its run folder (``purify``, ``pretrain``, ``pretrain_raw``, ``sqed``, ``sqa/<model>``) with
the stage as job type. Offline runs are written under the stage's run folder;
``wandb sync runs/<profile>/*/wandb/offline-run-*`` uploads them all. ``WANDB_MODE=online`` logs live,
``WANDB_MODE=disabled`` turns W&B off (CSV stays).

At its end every stage calls :func:`publish`: the summary's numbers become the run's summary
(``<stage>/<key>``, nested keys joined by ``/``), its tables become W&B tables and its figures images,
so that the dashboard of a pipeline run holds what ``runs/<profile>/report.md`` holds.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

_UNSET = object()


def wandb_mode() -> str:
    """``online`` only when the user sets ``WANDB_MODE=online``; ``disabled`` turns W&B off."""
    mode = os.environ.get("WANDB_MODE", "offline").lower()
    return mode if mode in ("online", "offline", "disabled") else "offline"


def run_group(profile: str) -> str:
    """The W&B group of this pipeline run: ``RSSQA_RUN_GROUP``, else the profile."""
    return os.environ.get("RSSQA_RUN_GROUP") or profile


def make_loggers(
    run_dir: str | os.PathLike,
    stage: str,
    *,
    name: str | None = None,
    profile: str | None = None,
    wandb: bool = True,
    csv: bool = True,
    csv_version: Any = _UNSET,
    config: dict[str, Any] | None = None,
) -> list[Logger]:
    """The stage's loggers: a :class:`CSVLogger` in ``run_dir/logs`` and, unless disabled, a :class:`WandbLogger`.

    Args:
        run_dir: the stage's run folder (``runs/<profile>/<stage>``); W&B writes ``run_dir/wandb/``.
        stage: the stage (the W&B job type and a tag): purify, pretrain, sqed, sqa or report.
        name: the W&B run name (default: the run folder's name, e.g. ``pretrain_raw``).
        profile: smoke, demo or paper (a tag; default: the name of the run folder's parent).
        wandb: False leaves W&B out whatever ``WANDB_MODE`` says.
        csv: False leaves the CSV logger out (a stage that writes its own CSV).
        csv_version: the CSV logger's version folder; unset: none (``logs/metrics.csv``); None: Lightning's
            ``version_<n>`` numbering (one per invocation, kept across resumes).
        config: hyper-parameters recorded with the W&B run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    profile = profile or run_dir.resolve().parent.name
    loggers: list[Logger] = []
    if csv:
        loggers.append(CSVLogger(run_dir, name="logs", version="" if csv_version is _UNSET else csv_version))
    mode = wandb_mode()
    if wandb and mode != "disabled":
        wb = WandbLogger(
            project=os.environ.get("WANDB_PROJECT", "rssqa"),
            group=run_group(profile),
            name=name or run_dir.name,
            job_type=stage,
            tags=[profile, stage],
            save_dir=str(run_dir),
            offline=mode != "online",
            config=config,
        )
        wb._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing None still prints a warning
        loggers.append(wb)
    return loggers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested summary, keyed ``a/b/c`` (booleans and strings are left out)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = v
    return out


def publish(
    loggers: Iterable[Logger],
    stage: str,
    summary: Mapping[str, Any],
    *,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    finish: bool = True,
) -> None:
    """Put a stage's results into its W&B run: summary numbers, tables and figures; then close the run.

    Args:
        loggers: the stage's loggers (those that are not W&B are skipped).
        stage: prefix of every key (``<stage>/<key>``).
        summary: the stage summary (nested dicts are flattened; see :func:`flatten`).
        tables: ``{name: (columns, rows)}``.
        images: ``{name: path of a PNG}``; missing files are skipped.
        finish: close the W&B run afterwards (an offline run is complete on disk only then).
    """
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        run = lg.experiment
        run.summary.update(flatten(summary, f"{stage}/"))
        # a table or figure W&B refuses must not cost the stage its results: warn, go on
        for key, (columns, rows) in (tables or {}).items():
            try:
                lg.log_table(f"{stage}/{key}", columns=list(columns), data=[list(r) for r in rows])
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"W&B table {stage}/{key} not logged: {e}", stacklevel=2)
        for key, path in (images or {}).items():
            if Path(path).is_file():
                try:
                    lg.log_image(f"{stage}/{key}", [str(path)])
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"W&B image {stage}/{key} ({path}) not logged: {e}", stacklevel=2)
        if finish:
            run.finish()


def finish_runs(loggers: Iterable[Logger]) -> None:
    """Close the W&B runs these loggers started (no-op for runs never started)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg._experiment.finish()


def quiet_lightning() -> None:
    """Silence the libraries' advice that does not apply to these stage runs.

    Kept: warnings about the user's own data or config. Dropped: Lightning's GPU/TPU availability lines,
    its LitLogger tip, worker-count and logging-interval advice, the "checkpoint directory exists"
    notice (a resumed run writes into its own folder on purpose), and deprecations inside Lightning
    and open_clip. (open_clip's "No pretrained weights loaded" is hidden where models are created:
    :func:`rssqa.models.clip.quiet_weight_notice`.)
    """
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric",
        "lightning.fabric.utilities.distributed",
        "lightning.pytorch.utilities.distributed",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*LitLogger.*",
        ".*litlogger.*",
        ".*IterableDataset. has .__len__. defined.*",
        ".*is running on a CPU.*",
        ".*all_gather is deprecated.*",  # inside open_clip's loss; not ours to change
        ".*treespec, LeafSpec.*is deprecated.*",  # inside Lightning's pytree helper
        ".*You have overridden .transfer_batch_to_device. in .LightningModule.*",  # on purpose (purify)
        ".*Couldn't infer the batch indices fetched from your dataloader.*",  # purify's writers do not need them
        ".*.tensorboardX. has been removed as a dependency.*",  # the CLI's unused default Trainer
    ):
        warnings.filterwarnings("ignore", message=pattern)
