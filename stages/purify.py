"""Stage purify: a captioner-filter loop over WebDataset shards.

One entry point for one CPU process, several CPU processes (gloo) and multi-node GPU jobs (SLURM ``srun``
or ``torchrun``; Lightning reads the environment):

    python stages/purify.py --config conf/smoke/purify.yaml --out runs/smoke/purify
    python stages/purify.py --config conf/demo/purify.yaml --out runs/demo/purify --trainer.devices 2
    srun python stages/purify.py --config conf/paper/purify.yaml --out runs/paper/purify \
        --trainer.num_nodes 16 --trainer.devices 8

Relative shard paths in the config are relative to the parent of ``--out`` (``runs/<profile>``). Writes
``<out>/shards/`` + ``sizes.json``, ``<out>/done/`` (one marker per input shard: a rerun skips them),
``<out>/rounds/``, ``<out>/logs/`` (CSV), ``<out>/wandb/`` (offline unless WANDB_MODE says otherwise),
``<out>/examples.csv`` and, last, ``<out>/summary.json``. ``--dry_run true`` prints the plan and exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from webdataset.shardlists import expand_urls

from rssqa.errors import RSSQAError
from rssqa.runs import is_done, resolve_under
from rssqa.tasks.purify import Purify, PurifyConfig, PurifyTask, check_settings
from rssqa.tracking import quiet_lightning

# the fit Trainers share these settings with the prediction Trainer
SHARED = ("accelerator", "devices", "num_nodes", "strategy", "precision")


class PurifyCLI(LightningCLI):
    """LightningCLI plus the run-folder contract: ``--out``, relative shard paths, ``--dry_run``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="run folder, e.g. runs/smoke/purify")
        parser.add_argument("--data_root", default=None, help="base of relative shard paths (default: parent of --out)")
        parser.add_argument("--dry_run", type=bool, default=False, help="check the config, print the plan, exit")
        parser.link_arguments("out", "model.out_dir")

    def before_instantiate_classes(self) -> None:
        model = self.config.model
        if model.threads:
            torch.set_num_threads(model.threads)
        root = self.config.data_root or str(Path(self.config.out).parent)
        model.input, model.trusted = resolve_under(model.input, root), resolve_under(model.trusted, root)
        if self.config.dry_run:  # settings checked (no shard or weights read), plan shown
            check_settings(PurifyConfig(**{k: v for k, v in vars(model).items() if v is not None}))
            print(describe_plan(self.config))
            sys.exit(0)



def describe_plan(config) -> str:
    """What a run would do, from the config alone (no shard or checkpoint is read)."""
    m, t = config.model, config.trainer

    def count(spec: str | list[str]) -> str:
        specs = spec if isinstance(spec, list) else [spec]
        parts = [f"{len(expand_urls(s))} shards in {s}" if "{" in s else f"{s} (listed at run time)" for s in specs]
        return "; ".join(parts)

    devices = t.devices if t.devices not in (None, "auto") else 1
    world = int(devices) * int(t.num_nodes or 1) if str(devices).isdigit() else devices
    threshold = f"fixed {m.threshold}" if m.threshold is not None else f"keep fraction {m.keep_fraction} (score pass)"
    def model_line(spec) -> str:
        return f"{spec.name} from {spec.checkpoint}" if spec.checkpoint else f"{spec.name}, fitted {spec.fit.steps} steps"
    return "\n".join([
        f"purify -> {config.out}",
        f"  input:     {count(m.input)}",
        f"  trusted:   {count(m.trusted)}",
        f"  filter:    {model_line(m.filter)}; score {m.score}",
        f"  captioner: {model_line(m.captioner)}; {m.generation.method} decoding, <= {m.generation.max_tokens} tokens",
        f"  threshold: {threshold}; rounds {m.rounds}{' with bootstrapping' if m.bootstrap else ''}",
        f"  trainer:   {t.accelerator}, {world} process(es) ({t.num_nodes} node(s)), strategy {t.strategy}, precision {t.precision}",
    ])  # fmt: skip


def main(args: list[str] | None = None) -> dict | None:
    """Parse the config, validate it (before any work) and run the stage unless it is done."""
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_lightning()
    cli = PurifyCLI(
        PurifyTask,
        run=False,
        args=args,
        save_config_callback=None,
        seed_everything_default=0,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                          "use_distributed_sampler": False, "enable_progress_bar": False},  # fmt: skip
    )
    out = cli.model.cfg.out_dir
    if is_done(out):
        print(f"{out}: purify already done (summary.json present); remove it to run again")
        return None
    shared = {k: cli.config["trainer"][k] for k in SHARED if cli.config["trainer"].get(k) is not None}
    summary = Purify(cli.model, cli.trainer, shared).run()
    if cli.trainer.global_rank == 0:
        keys = ("n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad", "samples_per_s", "noise_precision", "noise_recall", "noise_f1")
        print(f"purify -> {out}: " + ", ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except RSSQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
