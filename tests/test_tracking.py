"""Experiment tracking: the stages' loggers, the pipeline group, and what an offline W&B run holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from rssqa.errors import RSSQAError
from rssqa.tracking import flatten, make_loggers, publish, publish_run, run_group, wandb_mode, wandb_run
from rssqa.wandb_offline import read_offline_run


def test_flatten_keeps_finite_numbers_only():
    tree = {"a": 1, "b": {"c": 0.5, "d": "text", "e": {"f": 2}}, "g": True, "h": math.nan, "i": None}
    assert flatten(tree, "s/") == {"s/a": 1, "s/b/c": 0.5, "s/b/e/f": 2}


def test_mode_and_group_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("RSSQA_RUN_GROUP", raising=False)
    assert wandb_mode() == "offline"  # never online unless asked
    assert run_group("demo") == "demo"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("RSSQA_RUN_GROUP", "demo-20261124")
    assert wandb_mode() == "online"
    assert run_group("demo") == "demo-20261124"


def test_disabled_leaves_csv_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = make_loggers(tmp_path / "demo" / "sqed", "sqed")
    assert [type(lg) for lg in loggers] == [CSVLogger]
    assert not (tmp_path / "demo" / "sqed" / "wandb").exists()


def test_offline_run_holds_group_summary_history_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RSSQA_RUN_GROUP", "pipeline-42")
    run_dir = tmp_path / "demo" / "pretrain_raw"
    loggers = make_loggers(run_dir, "pretrain", config={"lr": 0.001})
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    for step, loss in enumerate((2.0, 1.5, 1.25)):
        for lg in loggers:
            lg.log_metrics({"train/loss": loss}, step=step)
    summary = {"zeroshot_top1": 0.61, "compare": {"raw": {"zeroshot_top1": 0.55}}, "model_name": "rs-tiny"}
    publish(loggers, "pretrain", summary, tables={"eval": (["metric", "value"], [["zeroshot_top1", 0.61]])})
    for lg in loggers:
        lg.finalize("success")

    run = read_offline_run(run_dir / "wandb", wait_s=30)  # the W&B service may still be writing it
    assert (run["project"], run["group"], run["name"], run["job_type"]) == ("rssqa", "pipeline-42", "pretrain_raw", "pretrain")
    assert set(run["tags"]) == {"demo", "pretrain"}
    assert run["config"]["lr"] == 0.001
    assert [h["train/loss"] for h in run["history"] if "train/loss" in h] == [2.0, 1.5, 1.25]
    assert run["summary"]["pretrain/zeroshot_top1"] == 0.61
    assert run["summary"]["pretrain/compare/raw/zeroshot_top1"] == 0.55
    assert run["summary"]["pretrain/eval/_type"] == "table-file"
    table = json.loads(next((run_dir / "wandb" / "latest-run").glob("files/media/table/pretrain/eval_*.table.json")).read_text())
    assert table["columns"] == ["metric", "value"] and table["data"] == [["zeroshot_top1", 0.61]]
    assert (run_dir / "logs" / "metrics.csv").read_text().count("\n") == 4  # header + 3 steps


def test_report_run_opened_without_lightning_is_a_stage_run_alike(tmp_path, monkeypatch):
    """The report's run (wandb_run + publish_run) has the identity a stage's logger gives its run, and the
    report module, in a process of its own, imports neither torch nor Lightning (a few seconds, not 15)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RSSQA_RUN_GROUP", "pipeline-42")
    run_dir = tmp_path / "demo" / "report_plots"
    figure = tmp_path / "figure.png"
    figure.write_bytes(bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
                                     "0000000a4944415478da63600000000200015e4c6f4b0000000049454e44ae426082"))  # fmt: skip
    publish_run(wandb_run(run_dir, "report", name="report"), "report", {"n": 3},
                tables={"comparison": (["model", "srcc"], [["rs_sqa", 0.8]])}, images={"figures/scatter": figure})  # fmt: skip
    run = read_offline_run(run_dir / "wandb", wait_s=30)
    assert (run["project"], run["group"], run["name"], run["job_type"]) == ("rssqa", "pipeline-42", "report", "report")
    assert set(run["tags"]) == {"demo", "report"} and run["summary"]["report/n"] == 3
    assert run["summary"]["report/comparison/_type"] == "table-file"
    assert run["summary"]["report/figures/scatter/_type"] == "images/separated"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_run(tmp_path / "off", "report") is None and not (tmp_path / "off").exists()
    publish_run(None, "report", {"n": 3})  # nothing to do, no error

    code = "import sys, rssqa.report\nprint(','.join(m for m in ('torch', 'lightning', 'torchmetrics') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"the report imports {out.stdout.strip()}"


def test_reading_a_folder_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(RSSQAError, match="no run-"):
        read_offline_run(tmp_path)


def test_a_log_without_its_run_record_is_a_clear_error_after_the_wait(tmp_path):
    run = tmp_path / "offline-run-x"
    run.mkdir()
    (run / "run-x.wandb").write_bytes(b":W&B\x00\x00\x00")  # the header alone: the service has written nothing yet
    with pytest.raises(RSSQAError, match=r"run-x\.wandb: no run record in the log"):
        read_offline_run(run, wait_s=0.3)
