"""The whole pipeline: ``make demo PROFILE=smoke`` into a scratch run root, then its report and summaries."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from rssqa.wandb_offline import read_offline_run
from tests.conftest import ROOT


@pytest.mark.slow
def test_make_demo_smoke_end_to_end(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "RSSQA_RUN_GROUP": "pipeline-test"}
    r = subprocess.run(
        ["make", "--no-print-directory", "demo", "PROFILE=smoke", f"RUNS={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    root = tmp_path / "smoke"
    summaries = {s: json.loads((root / s / "summary.json").read_text()) for s in
                 ("world", "purify", "pretrain", "pretrain_raw", "sqed", "sqa", "scenes")}  # fmt: skip
    p = summaries["purify"]
    assert p["n_in"] == p["n_kept"] + p["n_rewritten"] + p["n_dropped"] + p["n_bad"]
    assert summaries["sqed"]["n_rows"] == summaries["sqed"]["n_images"] * 8
    assert set(summaries["sqa"]["baselines"]) == {
        "msp", "entropy", "margin", "atc", "agreement", "consensus", "image_only", "seg_only", "generic_clip",
        "no_gating", "with_agreement", "with_agreement_ranking", "error_map",
    }  # fmt: skip
    # eight methods: agreement between them is computed, and the agreement model trained and compared
    assert all(summaries["sqa"]["baselines"][k] is not None for k in ("agreement", "consensus", "with_agreement"))
    assert summaries["sqed"]["agreement"]["computed"] == sorted(summaries["sqed"]["sources"])
    # whole scenes: every world scene scored into four rasters and measured against its truth
    scenes = summaries["scenes"]
    assert scenes["overall"]["n_scenes"] == summaries["world"]["scenes"]["n"] == len(summaries["sqed"]["sources"])
    for row in scenes["scenes"]:
        ev = row["evaluation"]
        assert ev["oracle_oa"] >= max(ev["per_method_oa"].values()) - 1e-9
        assert ev["fused_vs_best_single"]["verdict"] in ("ahead", "tie", "behind")
        assert all((root / "scenes" / row["folder"] / f"{n}.tif").is_file() for n in ("quality", "best_method", "fused", "error"))
    # every scene together: the mean of the scenes' own margins, with an interval around it
    pooled = scenes["overall"]["pooled"]["fused_minus_best_single"]
    margins = [r["evaluation"]["fused_oa"] - r["evaluation"]["best_single_oa"] for r in scenes["scenes"]]
    assert pooled["diff"] == pytest.approx(np.mean(margins)) and pooled["low"] <= pooled["diff"] <= pooled["high"]
    # the band of each scene's mean predicted OA against its true OA, every (scene, method) pair counted
    held = [v for r in scenes["scenes"] for v in r["evaluation"]["in_mean_interval"].values()]
    assert len(held) == 8 * len(scenes["scenes"])
    assert scenes["overall"]["mean_interval_coverage"] == {"inside": sum(held), "of": len(held), "share": pytest.approx(np.mean(held))}
    report = (root / "report.md").read_text()
    for section in ("Purification", "CLIP-RS", "RS-SQED", "RS-SQA against", "Method recommendation", "Whole scenes"):
        assert section in report
    # numbers come from the summaries, not typed by hand
    assert f"{summaries['sqa']['test']['srcc']:.3f}" in report
    assert f"inside it for {sum(held)} of {len(held)} (scene, method) pairs" in report
    report_json = json.loads((root / "report.json").read_text())
    assert report_json["stages"] == list(summaries)
    # where the time went: the pipeline's wall time, and each stage's wall and CPU time
    assert report_json["pipeline_seconds"] > 0
    for stage in ("purify", "pretrain", "sqed", "sqa"):
        t = report_json["stage_times"][stage]
        assert t["wall_s"] == summaries[stage]["wall_s"] > 0 and t["cpu_s"] == summaries[stage]["cpu_s"] > 0, stage
    assert "CPU share" in report
    # the raw CLIP (off the critical path) started once purify had ended, beside CLIP-RS, not beside purify
    raw_start = (root / "pretrain_raw" / "summary.json").stat().st_mtime - summaries["pretrain_raw"]["wall_s"]
    assert raw_start >= (root / "purify" / "summary.json").stat().st_mtime - 0.5

    # W&B: every stage of the run is an offline run in one group, holding its key figures
    key = {"purify": ("purify", ["n_in", "noise_f1"]), "pretrain": ("pretrain", ["zeroshot_top1", "retrieval_mean_recall"]),
           "pretrain_raw": ("pretrain", ["zeroshot_top1", "retrieval_mean_recall"]),
           "sqed": ("sqed", ["oa_mean", "best_method_share"]), "sqa": ("sqa", ["test/srcc", "recommend/top1"])}  # fmt: skip
    for folder, (stage, metrics) in key.items():
        run = read_offline_run(root / folder / "wandb", wait_s=30)  # the latest run: for sqa, the comparison's
        assert (run["project"], run["group"], run["job_type"], run["name"]) == ("rssqa", "pipeline-test", stage, folder)
        for m in metrics:
            expected = summaries[folder]
            for part in m.split("/"):
                expected = expected[part]
            assert run["summary"][f"{stage}/{m}"] == pytest.approx(expected), (folder, m)
    assert run["summary"]["sqa/baselines/msp/srcc"] == pytest.approx(summaries["sqa"]["baselines"]["msp"]["srcc"])
    report_run = read_offline_run(root / "report_plots" / "wandb", wait_s=30)
    assert (report_run["group"], report_run["name"]) == ("pipeline-test", "report")
    assert report_run["summary"]["report/sqa_comparison/_type"] == "table-file"
    assert report_run["summary"]["report/figures/sqa_scatter_test/_type"] == "images/separated"
