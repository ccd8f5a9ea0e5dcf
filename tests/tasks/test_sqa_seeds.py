"""The heads of a finished sqa run trained again under other seeds (rssqa.tasks.sqa.seeds)."""

from __future__ import annotations

import shutil

import pytest
import torch

from rssqa.errors import RSSQAError
from rssqa.report import build_report
from rssqa.runs import read_summary, write_summary
from rssqa.tasks.sqa.seeds import main, seed_spread, spread


def test_spread_of_figures():
    per_seed = {
        0: {"srcc": 0.8, "regret": 0.04, "vs_consensus": {"verdict": "ahead"}, "vs_best_fixed": {"verdict": "tie"}},
        1: {"srcc": 0.7, "regret": 0.06, "vs_consensus": {"verdict": "ahead"}, "vs_best_fixed": {"verdict": "ahead"}},
        2: {"srcc": 0.9, "regret": 0.05, "vs_consensus": {"verdict": "tie"}, "vs_best_fixed": {"verdict": "ahead"}},
    }
    s = spread(per_seed)
    assert s["srcc"] == {"median": 0.8, "min": 0.7, "max": 0.9}
    assert s["regret"] == {"median": 0.05, "min": 0.04, "max": 0.06}
    assert s["vs_consensus"] == {"ahead": 2, "of": 3} and s["vs_best_fixed"] == {"ahead": 2, "of": 3}
    assert "gap_closed" not in s  # a figure no seed has is left out, not invented


def test_seeds_reproduce_the_run_and_move_with_the_seed(run_root):
    """The run's own seed gives the run's figures exactly (the error map's too: its pixel head weighted by
    that seed's ranking head and its fits per fold, reading the methods' outputs from the seam cache); another
    seed trains other heads; the report shows both."""
    torch.set_num_threads(1)
    run = run_root / "sqa"
    models = ["rs_sqa", "with_agreement_ranking", "error_map"]
    alone = seed_spread(run, [0, 1], models=models[:1], workers=1, threads=1)
    out = seed_spread(run, [0, 1], models=[*models, "loso"], workers=1, threads=1)  # rs_sqa kept, the others trained
    assert out["models"]["rs_sqa"] == alone["models"]["rs_sqa"]
    assert out["run_seed"] == read_summary(run)["seed"] == 0
    assert list(out["models"]) == models
    # each source left out, per seed: the run's own seed gives the run's leave_one_source_out
    run_loso = read_summary(run)["leave_one_source_out"]
    for name in ("rs_sqa", "with_agreement"):
        lo = out["loso"][name]
        assert lo["reproduced"] is True, name
        assert {v["of"] for v in lo["per_seed"].values()} == {len(run_loso)}
        assert lo["per_seed"]["0"]["above"] == read_summary(run)["loso_above_consensus"][name]
        assert lo["spread"]["above"]["min"] <= lo["spread"]["above"]["max"] <= len(run_loso)
    for name in models:
        m = out["models"][name]
        assert m["reproduced"] is True, name
        assert set(m["per_seed"]) == {"0", "1"}
        first, second = m["per_seed"]["0"], m["per_seed"]["1"]
        assert first["srcc"] != second["srcc"], name  # the seed changes the fit
        for key in ("srcc", "regret", "top1", "gap_closed"):
            lo, mid, hi = (m["spread"][key][k] for k in ("min", "median", "max"))
            assert lo <= mid <= hi and {lo, hi} == {first[key], second[key]}
        assert m["spread"]["vs_consensus"]["of"] == 2
    assert read_summary(run / "seeds") == out
    assert not list((run / "cache").glob("seam_*"))  # the seeds' pixel heads read one pass of the methods, then dropped
    # the same seeds again: nothing trained, the same summary
    assert seed_spread(run, [0, 1], models=models) == out == seed_spread(run, [0, 1], models=["loso"])
    md = build_report(run_root.parent, run_root.name, wandb=False).read_text()
    assert "How much is the seed?" in md and "with_agreement_ranking" in md and "Each source left out in turn" in md


def test_seeds_errors(run_root, tmp_path, capsys):
    with pytest.raises(RSSQAError, match="not a finished sqa run"):
        seed_spread(tmp_path, [0])
    with pytest.raises(RSSQAError, match="at least one seed"):
        seed_spread(run_root / "sqa", [])
    with pytest.raises(RSSQAError, match="trained no 'nope'"):
        seed_spread(run_root / "sqa", [0], models=["nope"])
    no_pixel = tmp_path / "no_pixel"
    shutil.copytree(run_root / "sqa", no_pixel, ignore=shutil.ignore_patterns("checkpoints", "seeds", "wandb"))
    summary = read_summary(no_pixel)
    write_summary(no_pixel, {**summary, "pixel_error": None, "leave_one_source_out": None})
    with pytest.raises(RSSQAError, match="error_map needs a run with the pixel error head"):
        seed_spread(no_pixel, [0], models=["error_map"])
    with pytest.raises(RSSQAError, match="loso needs a run that left each source out"):
        seed_spread(no_pixel, [0], models=["loso"])
    # on the command line: one line naming what was wrong, exit status 2
    with pytest.raises(SystemExit) as exit_:
        main(["--run", str(tmp_path / "nothing"), "--seeds", "0"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and "not a finished sqa run" in err
