"""Stage sqa: train RS-SQA, compare it with the baselines and ablations, export the scorer.

    python stages/sqa.py --config conf/smoke/sqa.yaml --out runs/smoke/sqa

Writes ``<out>/checkpoints/<run>/`` (best validation SRCC per run), ``<out>/logs/<run>/`` (CSV),
``<out>/wandb/`` (offline unless WANDB_MODE says otherwise), ``<out>/figures/*.png``, the scorer in
``<out>/scorer/``, ``<out>/config.yaml`` (the resolved config), ``<out>/predictions.json`` and, last,
``<out>/summary.json``. ``--print_config`` shows the resolved config. ``--fit_workers 2`` trains the
heads in two processes side by side (with ``--threads 1``: the same numbers in about half the time on
two cores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rssqa.errors import RSSQAError
from rssqa.report_format import diff_text
from rssqa.runs import is_done
from rssqa.tasks.sqa import ABLATIONS, SQADataModule, SQATask, run_sqa
from rssqa.tasks.sqa.fits import TrainerRecipe
from rssqa.tasks.sqa.pixel import PixelConfig
from rssqa.tracking import make_loggers, publish, quiet_lightning


class SQACLI(LightningCLI):
    """LightningCLI plus the run-folder contract and one fresh Trainer per trained model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="run folder, e.g. runs/smoke/sqa")
        parser.add_argument("--ablations", type=list[str], default=list(ABLATIONS), help="ablations to train")
        parser.add_argument(
            "--agreement_model", type=bool, default=True,
            help="also train RS-SQA with agreement between methods (when RS-SQED has it): exported beside the "
            "paper's head, used by rssqa recommend",
        )  # fmt: skip
        parser.add_argument(
            "--agreement_overrides", type=dict, default={}, help="model options of the agreement model that differ"
        )
        parser.add_argument(
            "--ranking_overrides", type=dict, default={},
            help="when set: a second agreement model with these options (stronger ranking terms), for recommendation",
        )
        parser.add_argument(
            "--loso", type=bool, default=False,
            help="also leave each source out in turn: train on the others, test on it (the summary's leave_one_source_out)",
        )  # fmt: skip
        parser.add_argument(
            "--group_folds", type=int, default=0,
            help="K >= 3: also cross-validate over the split groups (areas) in K folds, each the test split once "
            "(the summary's group_folds); 0: off",
        )  # fmt: skip
        parser.add_argument(
            "--pixel", type=PixelConfig, default=PixelConfig(),
            help="the pixel error head: trained on RS-SQED's pool, tested against per-pixel baselines, exported",
        )  # fmt: skip
        parser.add_argument("--wandb", type=bool, default=True, help="log to Weights & Biases too (offline by default)")
        parser.add_argument("--force", type=bool, default=False, help="run again even when out holds a summary")
        parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
        parser.add_argument(
            "--fit_workers", type=int, default=1,
            help="processes that train the heads side by side (1: this one); the numbers do not depend on it",
        )  # fmt: skip
        parser.link_arguments("out", "data.cache_dir", compute_fn=lambda out: str(Path(out) / "cache"))
        parser.link_arguments("out", "trainer.default_root_dir")
        parser.link_arguments("seed_everything", "data.seed")

    def trainer_recipe(self) -> TrainerRecipe:
        """What each trained head's Trainer is made of: the config's trainer options, CSV (+ W&B) logs,
        a checkpoint of the best validation SRCC (the same in this process and in fit workers)."""
        return TrainerRecipe(str(self.config.out), self.config.trainer.as_dict(), wandb=self.config.wandb)


def main(args: list[str] | None = None) -> dict | None:
    quiet_lightning()
    cli = SQACLI(
        SQATask, SQADataModule, run=False, args=args, seed_everything_default=0, save_config_kwargs={"overwrite": True}
    )
    out = Path(cli.config.out)
    if is_done(out) and not cli.config.force:
        print(f"{out}: already done (summary.json present); pass --force true to run again")
        return None
    if cli.config.threads:
        torch.set_num_threads(cli.config.threads)
    out.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, str(out / "config.yaml"), overwrite=True, skip_validation=True)
    summary = run_sqa(
        cli.model, cli.datamodule, cli.trainer_recipe(), out, cli.config.ablations, cli.config.seed_everything,
        agreement_model=cli.config.agreement_model, agreement_overrides=dict(cli.config.agreement_overrides or {}),
        loso=cli.config.loso, ranking_overrides=dict(cli.config.ranking_overrides or {}),
        pixel=PixelConfig.of(cli.config.pixel.as_dict() if cli.config.pixel is not None else None),
        group_folds=cli.config.group_folds, fit_workers=cli.config.fit_workers, threads=cli.config.threads,
    )  # fmt: skip
    if cli.config.wandb:  # one more run in the group: the comparison, the recommendation and the figures
        publish(make_loggers(out, "sqa", name="sqa", csv=False), "sqa", summary, tables=comparison_tables(summary),
                images={p.stem: p for p in sorted((out / "figures").glob("*.png"))})  # fmt: skip
    print_summary(summary)
    return summary


def comparison_tables(s: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The summary's comparison (RS-SQA, baselines, ablations) and recommendation as W&B tables."""
    metrics = ["srcc", "plcc", "krcc", "rmse"]
    rows = [["rs_sqa", *(s["test"][k] for k in metrics)]]
    rows += [[name, *(m[k] for k in metrics)] for name, m in s["baselines"].items() if m]
    rk = ["top1", "top1_within", "regret", "chosen_oa"]
    rec = [["rs_sqa", *(s["recommend"][k] for k in rk)]]
    rec += [[name, *(m[k] for k in rk)] for name, m in s["recommend_baselines"].items()]
    tables = {"comparison": (["model", *metrics], rows), "recommend": (["model", *rk], rec)}
    for key in ("vs_rs_sqa", "vs_with_agreement"):
        if key in s:
            vs = [[name, *(v[m][k] for m in ("srcc", "plcc") for k in ("diff", "low", "high", "a_better", "verdict"))]
                  for name, v in s[key].items()]  # fmt: skip
            cols = [f"{m}_{k}" for m in ("srcc", "plcc") for k in ("diff", "low", "high", "share_ahead", "verdict")]
            tables[key] = (["against", *cols], vs)
    px = s.get("pixel_error")
    if px:
        rows_px = [["pixel_error_head", px["auroc"], px["ap"]]]
        rows_px += [[name, b["auroc"], b["ap"]] for name, b in px["baselines"].items() if b]
        tables["pixel_comparison"] = (["score", "auroc", "ap"], rows_px)  # beside the summary keys pixel_error/*
    cv = s.get("group_folds")
    if cv:  # out-of-fold figures over the split groups: one row per score
        p = cv["pooled"]
        rows_cv = [[name, srcc, p["mean_fold_srcc"].get(name), p["recommend"][name]["chosen_oa"], p["recommend"][name]["regret"]]
                   for name, srcc in p["srcc"].items()]  # fmt: skip
        tables["group_folds"] = (["score", "srcc", "mean_fold_srcc", "chosen_oa", "regret"], rows_cv)
    return tables


def print_summary(s: dict) -> None:
    """The comparison table and recommendation figures, for the terminal."""
    rows = [("rs_sqa", s["test"])] + [(k, v) for k, v in s["baselines"].items() if v]
    print(f"{'':>14} {'SRCC':>7} {'PLCC':>7} {'KRCC':>7} {'RMSE':>7}   RS-SQA - it, SRCC (95% bootstrap)")
    for name, m in rows:
        line = f"{name:>14} " + " ".join(f"{m[k]:7.3f}" if m[k] is not None else f"{'-':>7}" for k in ("srcc", "plcc", "krcc", "rmse"))
        v = s.get("vs_rs_sqa", {}).get(name)
        if v:
            line += f"   {diff_text(v['srcc'])}"
        print(line)
    r = s["recommend"]
    print(
        f"recommend: top1 {r['top1']:.3f}, chosen OA {r['chosen_oa']:.3f}, best fixed ({r['best_fixed_method']}) "
        f"{r['best_fixed_oa']:.3f}, oracle {r['oracle_oa']:.3f}, regret {r['regret']:.3f}; {s['seconds']} s"
    )
    for name in ("with_agreement", "with_agreement_ranking", "error_map"):
        a = s.get("recommend_baselines", {}).get(name)
        if a:  # gap_closed is null where the best fixed method is already the oracle
            gap = "-" if a["gap_closed"] is None else f"{a['gap_closed']:.2f}"
            v = a.get("vs_best_fixed") or {}
            vs = f", minus best fixed {diff_text(v)}" if v.get("verdict") else ""
            print(f"{name}: top1 {a['top1']:.3f}, chosen OA {a['chosen_oa']:.3f}, regret {a['regret']:.3f}, gap closed {gap}{vs}")
    px = s.get("pixel_error")
    num = lambda x, f=".3f": "-" if x is None else format(x, f)  # noqa: E731 - undefined figures are null
    for what, c in (("every (image, method)", px), ("recommended method", (px or {}).get("recommended"))):
        if c:
            v, best = c["vs_best_baseline"], c["best_baseline"]
            vs = f"; minus {best}: {num(v['diff'], '+.3f')} [{num(v['low'], '+.3f')}, {num(v['high'], '+.3f')}] {v['verdict']}" if v else ""
            print(f"pixel error head, {what}: AUROC {num(c['auroc'])}, AP {num(c['ap'])}{vs} ({c['n_pixels']} test pixels)")
    cv = (s.get("group_folds") or {}).get("pooled")
    for name, v in (cv or {}).get("vs_consensus", {}).items():
        print(f"{name} minus consensus, out of {s['group_folds']['k']} group folds ({cv['n_images']} images): SRCC "
              f"{num(v['diff'], '+.3f')} [{num(v['low'], '+.3f')}, {num(v['high'], '+.3f')}] {v['verdict']}")  # fmt: skip
    h = s.get("recommend_headroom")
    if h:
        print(
            f"top1 {h['target']:g} needs a within-image error below {h['sigma_for_target']:.3f} OA; "
            f"RS-SQA's is {h['within_image_error']['rs_sqa']:.3f}"
        )


if __name__ == "__main__":
    try:
        main()
    except RSSQAError as e:
        if os.environ.get("RSSQA_DEBUG"):
            raise
        sys.exit(f"error: {e}")
