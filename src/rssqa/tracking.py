"""Experiment tracking shared by every stage: CSV always, Weights & Biases offline unless asked online.

All stages of one pipeline run log to one W&B project (``WANDB_PROJECT``, default ``rssqa``) in one
group (``RSSQA_RUN_GROUP``, set once per ``make demo``; the profile name otherwise), each stage a run
named after its run folder (``purify``, ``pretrain``, ``pretrain_raw``, ``sqed``, ``sqa/<model>``) with
the stage as job type. Offline runs are written under the stage's run folder;
``wandb sync runs/<profile>/*/wandb/offline-run-*`` uploads them all. ``WANDB_MODE=online`` logs live,
``WANDB_MODE=disabled`` turns W&B off (CSV stays).

At its end every stage calls :func:`publish`: the summary's numbers become the run's summary
(``<stage>/<key>``, nested keys joined by ``/``), its tables become W&B tables and its figures images,
so that the dashboard of a pipeline run holds what ``runs/<profile>/report.md`` holds. The report,
which trains nothing, opens its run with :func:`wandb_run` and fills it with :func:`publish_run`: it
never imports Lightning (nor torch), which is imported here only when a stage asks for its loggers.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

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
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = []
    if csv:
        loggers.append(CSVLogger(run_dir, name="logs", version="" if csv_version is _UNSET else csv_version))
    if wandb and wandb_mode() != "disabled":
        wb = WandbLogger(**_identity(run_dir, stage, name, profile), save_dir=str(run_dir),
                         offline=wandb_mode() != "online", config=config)  # fmt: skip
        wb._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing None still prints a warning
        loggers.append(wb)
    return loggers


def _identity(run_dir: Path, stage: str, name: str | None, profile: str | None) -> dict[str, Any]:
    """Who a stage's W&B run is (:func:`make_loggers`, :func:`wandb_run`): project, group, name, job type, tags."""
    profile = profile or run_dir.resolve().parent.name
    return {
        "project": os.environ.get("WANDB_PROJECT", "rssqa"),
        "group": run_group(profile),
        "name": name or run_dir.name,
        "job_type": stage,
        "tags": [profile, stage],
    }


def wandb_run(run_dir: str | os.PathLike, stage: str, *, name: str | None = None, profile: str | None = None) -> Any:
    """A W&B run like the one :func:`make_loggers` gives a stage, opened without Lightning; ``None`` when
    ``WANDB_MODE=disabled``. Fill it with :func:`publish_run`."""
    if wandb_mode() == "disabled":
        return None
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(**_identity(run_dir, stage, name, profile), dir=str(run_dir), mode=wandb_mode(), reinit="finish_previous")


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


def publish(loggers: Iterable[Logger], stage: str, summary: Mapping[str, Any], **options: Any) -> None:
    """:func:`publish_run` into the W&B run of each of a stage's loggers (those that are not W&B are skipped);
    ``options``: its ``tables``, ``images`` and ``finish``."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            publish_run(lg.experiment, stage, summary, **options)


def publish_run(
    run: Any,
    stage: str,
    summary: Mapping[str, Any],
    *,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    finish: bool = True,
) -> None:
    """Put a stage's results into its W&B run: summary numbers, tables and figures; then close the run.

    Args:
        run: a W&B run (a stage logger's, :func:`publish`; the report's, :func:`wandb_run`); ``None``: nothing to do.
        stage: prefix of every key (``<stage>/<key>``).
        summary: the stage summary (nested dicts are flattened; see :func:`flatten`).
        tables: ``{name: (columns, rows)}``.
        images: ``{name: path of a PNG}``; missing files are skipped.
        finish: close the W&B run afterwards (an offline run is complete on disk only then).
    """
    if run is None:
        return
    import wandb

    run.summary.update(flatten(summary, f"{stage}/"))
    # a table or figure W&B refuses must not cost the stage its results: warn, go on
    for key, (columns, rows) in (tables or {}).items():
        try:
            run.log({f"{stage}/{key}": wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"W&B table {stage}/{key} not logged: {e}", stacklevel=2)
    for key, path in (images or {}).items():
        if Path(path).is_file():
            try:
                run.log({f"{stage}/{key}": [wandb.Image(str(path))]})
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"W&B image {stage}/{key} ({path}) not logged: {e}", stacklevel=2)
    if finish:
        run.finish()


def finish_runs(loggers: Iterable[Logger]) -> None:
    """Close the W&B runs these loggers started (no-op for runs never started)."""
    from lightning.pytorch.loggers import WandbLogger

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
