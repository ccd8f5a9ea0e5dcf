"""Stage pretrain: train CLIP-RS on image-text shards, evaluate it, export it in open_clip's format.

One entry point for one CPU process, gloo DDP on a laptop, and multi-node GPU jobs (SLURM ``srun`` or
``torchrun``; Lightning reads the environment):

    python stages/pretrain.py --config conf/smoke/pretrain.yaml --out runs/smoke/pretrain
    python stages/pretrain.py --config conf/paper/pretrain.yaml --out runs/paper/pretrain \
        --trainer.num_nodes 4 --trainer.devices 8

Writes ``<out>/checkpoints/`` (``last.ckpt``; a run restarts from it unless ``--resume never``),
``<out>/logs/`` (CSV), ``<out>/wandb/`` (offline unless WANDB_MODE says otherwise), the model in
``<out>/clip_rs/`` and, last, ``<out>/summary.json``. ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import open_clip
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rssqa.data.corpus import CorpusDataModule
from rssqa.errors import RSSQAError
from rssqa.progress import ProgressLog
from rssqa.runs import resolve_under
from rssqa.tasks.pretrain import PretrainTask, finish
from rssqa.tracking import make_loggers, publish, quiet_lightning


class PretrainCLI(LightningCLI):
    """LightningCLI plus the run-folder contract: ``--out``, default loggers, checkpoints, resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="run folder, e.g. runs/smoke/pretrain")
        parser.add_argument(
            "--data_root", default=None, help="base of relative shard paths (default: the parent of --out)"
        )
        parser.add_argument(
            "--resume", default="auto", help="auto (last.ckpt if present) | never | a .ckpt path"
        )
        parser.add_argument(
            "--wandb", type=bool, default=True, help="log to Weights & Biases too (offline by default)"
        )
        parser.add_argument(
            "--export_name", default="clip_rs", help="folder of the exported model inside --out"
        )
        parser.add_argument(
            "--threads", type=int, default=0, help="intra-op CPU threads per process (0: torch's default)"
        )
        parser.add_argument(
            "--compare_with",
            default=None,
            help="another pretrain run folder (relative: to the parent of --out) to set beside ours in the summary",
        )
        parser.add_argument(
            "--dry_run", type=bool, default=False, help="check the config, print the plan, exit"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.every_n_train_steps": 100,
                # every rank evaluates the whole held-out set (see CorpusDataModule.val_dataloader)
                "trainer.use_distributed_sampler": False,
                "trainer.num_sanity_val_steps": 0,
            }
        )
        parser.link_arguments(
            "out", "checkpoint.dirpath", compute_fn=lambda out: str(Path(out) / "checkpoints")
        )
        parser.link_arguments("out", "trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        root = self.config.data_root or str(Path(self.config.out).parent)
        self.config.data.shards = resolve_under(self.config.data.shards, root)
        if self.config.dry_run:
            print(describe_plan(self.config))
            sys.exit(0)
        trainer = self.config.trainer
        if str(trainer.precision).startswith("bf16") and not torch.cuda.is_available():
            warnings.warn(
                f"precision {trainer.precision} needs a GPU here; training in 32-true", stacklevel=1
            )
            trainer.precision = "32-true"

    def instantiate_trainer(self, **kwargs):
        if self.config.trainer.logger in (None, True):
            # CSV in <out>/logs/version_<n> (one per invocation), W&B in the pipeline run's group
            kwargs["logger"] = make_loggers(self.config.out, "pretrain", wandb=self.config.wandb, csv_version=None)
        if not self.config.trainer.enable_progress_bar:  # a progress line every few seconds instead of a bar
            kwargs["callbacks"] = [*(self.config_init.trainer.callbacks or []), ProgressLog(Path(self.config.out).name)]
        return super().instantiate_trainer(**kwargs)


def describe_plan(config) -> str:
    """What a run of this config would do: model size, global batch, steps, inputs; no data is read."""
    from rssqa.models.clip import clip_config, quiet_weight_notice

    model, data, trainer = config.model, config.data, config.trainer
    with torch.device("meta"), quiet_weight_notice():
        n_params = sum(
            p.numel() for p in open_clip.create_model(model.model_name, device="meta").parameters()
        )
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    world = int(trainer.num_nodes or 1) * int(devices)
    global_batch = data.batch_size * world * int(trainer.accumulate_grad_batches or 1)
    steps = max(1, data.samples_per_epoch // global_batch) * int(trainer.max_epochs or 1)
    if trainer.max_steps and trainer.max_steps > 0:
        steps = min(steps, trainer.max_steps)
    shards = data.shards if isinstance(data.shards, list) else [data.shards]
    lines = [
        f"model          {model.model_name} ({n_params / 1e6:.1f} M parameters, "
        f"{clip_config(model.model_name)['vision_cfg']['image_size']} px)",
        f"init           {model.checkpoint or 'random'}"
        + (
            "" if not model.checkpoint or Path(model.checkpoint).exists() else "  (not found on this machine)"
        ),
        f"world size     {world} ({trainer.num_nodes} node(s) x {trainer.devices} device(s), {trainer.accelerator})",
        f"global batch   {global_batch}",
        f"steps          {steps} ({steps * global_batch:,} samples)",
        f"precision      {trainer.precision}",
        f"shards         {', '.join(map(str, shards))}",
        f"out            {config.out}",
    ]
    return "\n".join(lines)


def resolve_resume(resume: str, out: Path) -> str | None:
    """The checkpoint to resume from: ``auto`` = ``<out>/checkpoints/last.ckpt`` when it exists."""
    if resume == "never":
        return None
    if resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise RSSQAError(f"{resume}: checkpoint to resume from not found")
    return resume


def main(args: list[str] | None = None) -> dict:
    quiet_lightning()  # (the stream splits its work across workers itself, as one silenced warning asks)
    cli = PretrainCLI(
        PretrainTask,
        CorpusDataModule,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )
    out = Path(cli.config.out)
    ckpt = resolve_resume(cli.config.resume, out)
    if ckpt and cli.trainer.is_global_zero:
        print(f"resuming from {ckpt}", file=sys.stderr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    compare = cli.config.compare_with
    if compare and not os.path.isabs(compare):
        compare = str(Path(cli.config.data_root or out.parent) / compare)
    summary = finish(cli.trainer, cli.model, out, cli.config.export_name, compare)
    if cli.trainer.is_global_zero:
        keys = (
            "world_size",
            "global_step",
            "samples_seen",
            "samples_per_s",
            "zeroshot_top1",
            "retrieval_mean_recall",
        )
        print("\n".join(f"{k:>22}  {summary[k]}" for k in keys))
        if "compare" in summary:
            print(f"{'compare':>22}  {summary['compare']}")
        publish(cli.trainer.loggers, "pretrain", summary)
    return summary


if __name__ == "__main__":
    try:
        main()
    except RSSQAError as e:
        sys.exit(f"error: {e}")
