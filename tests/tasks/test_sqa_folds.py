"""Cross-validation over split groups (rssqa.tasks.sqa.folds) on a hand-made table."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rssqa.errors import RSSQAError
from rssqa.report import _folds_section
from rssqa.report_format import md_table
from rssqa.tasks.sqa.folds import (
    cross_validate_groups,
    fold_jobs,
    fold_of_groups,
    fold_splits,
    run_name,
)

METHODS = ("a", "b", "c")
# group -> (split, images): area "s" trained the methods; "g4" is twice the size of the others
GROUPS = {"s": ("seg", 2), "g1": ("train", 2), "g2": ("train", 2), "g3": ("val", 2), "g4": ("test", 4), "g5": ("train", 2)}


def _data(seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    rows, split, image, method, oa = [], [], [], [], []
    n_img = 0
    for group, (sp, n) in GROUPS.items():
        for _ in range(n):
            quality = rng.uniform(0.3, 0.9, len(METHODS))
            for m, q in zip(METHODS, quality, strict=True):
                rows.append({"source": "area", "group": group, "method": m})
                split.append(sp)
                image.append(n_img)
                method.append(m)
                oa.append(q)
            n_img += 1
    return SimpleNamespace(
        sqed=SimpleNamespace(rows=rows), split_of=np.array(split, dtype="<U8"), image_idx=torch.tensor(image),
        method_of=np.array(method), oa=torch.tensor(oa), rows=None,
    )  # fmt: skip


def _attach_rows(data: SimpleNamespace) -> SimpleNamespace:
    data.rows = lambda split: np.flatnonzero(data.split_of == split).tolist()
    return data


def test_every_group_is_tested_once_and_seg_is_never_used():
    data = _attach_rows(_data())
    fold = fold_of_groups(data, 3)
    assert set(fold) == {"area/g1", "area/g2", "area/g3", "area/g4", "area/g5"}  # not the seg area
    assert fold["area/g4"] == 0  # the largest group is dealt first
    splits = fold_splits(data, 3)
    tested = np.zeros(len(data.split_of), int)
    for k, split in enumerate(splits):
        assert (split[data.split_of == "seg"] == "unused").all()
        tested += split == "test"
        val_groups = {r["group"] for r, s in zip(data.sqed.rows, split, strict=True) if s == "val"}
        assert val_groups == {g.split("/")[1] for g, f in fold.items() if f == (k + 1) % 3}
        assert set(split[data.split_of != "seg"]) == {"train", "val", "test"}
    assert (tested[data.split_of != "seg"] == 1).all() and (tested[data.split_of == "seg"] == 0).all()
    # each group to the emptiest fold, largest first: g4 (12 rows) alone, g1 + g3 and g2 + g5 (6 + 6)
    assert [int((s == "test").sum()) for s in splits] == [12, 12, 12]
    assert fold["area/g1"] == fold["area/g3"] == 1 and fold["area/g2"] == fold["area/g5"] == 2
    jobs = fold_jobs({"m": {"lr": 1.0}}, data, 3)
    assert [j.run for j in jobs] == [run_name(k, "m") for k in range(3)]
    assert all((j.split_of == s).all() for j, s in zip(jobs, splits, strict=True))


def test_too_many_folds_is_a_one_line_error():
    data = _attach_rows(_data())
    with pytest.raises(RSSQAError, match=r"group_folds: 6 folds but only 5 groups"):
        fold_splits(data, 6)
    with pytest.raises(RSSQAError, match="at least 3"):
        fold_splits(data, 2)


def test_out_of_fold_figures_of_a_perfect_and_a_useless_score():
    data = _attach_rows(_data())
    original = data.split_of.copy()
    oa = data.oa.double().numpy()
    noise = np.random.default_rng(1).uniform(size=len(oa))

    def predictions(run: str, split: str = "test") -> np.ndarray:
        rows = data.rows(split)  # the fold's split is in place while its predictions are read
        return oa[rows] if run.endswith("_perfect") else noise[rows]

    def baselines(d):
        rows = d.rows("test")
        return {"consensus": {"test": noise[rows] * 0.5}, "_atc_thresholds": {}}

    def best_fixed(d):
        train = d.rows("train")
        return max(METHODS, key=lambda m: oa[[r for r in train if d.method_of[r] == m]].mean())

    out = cross_validate_groups({"perfect": {}, "useless": {}}, data, 3, predictions, baselines, best_fixed,
                                ("consensus",), "perfect", n_boot=200, val_predictions=lambda run: predictions(run, "val"))  # fmt: skip
    assert (data.split_of == original).all()
    p = out["pooled"]
    assert p["n_images"] == 12 and p["n_rows"] == 36
    assert p["srcc"]["perfect"] == pytest.approx(1.0)
    assert p["error"]["perfect"] == {"bias": 0.0, "rmse": 0.0} and p["error"]["useless"]["rmse"] > 0.1
    assert p["srcc"]["consensus"] == pytest.approx(p["srcc"]["useless"])  # the same order
    assert p["recommend"]["perfect"]["regret"] == pytest.approx(0.0)
    assert p["recommend"]["perfect"]["chosen_oa"] == pytest.approx(p["recommend"]["perfect"]["oracle_oa"])
    assert p["vs_consensus"]["perfect"]["verdict"] == "ahead"
    gain = p["recommended_minus_best_fixed"]
    assert gain["diff"] >= 0 and gain["low"] <= gain["diff"] <= gain["high"]
    assert [len(f["groups"]) for f in out["folds"]] and sum(f["n_images"] for f in out["folds"]) == 12
    assert all(f["scores"]["perfect"]["regret"] == pytest.approx(0.0) for f in out["folds"])
    # intervals from each fold's val rows: 12 rows, three bins of four, too few for a 90% interval (it needs the
    # 5th of 4 residuals), so every interval is all of [0, 1], which says so rather than guess
    for name in ("perfect", "useless"):
        assert p["intervals"][name] == {"coverage": 1.0, "below": 0.0, "above": 0.0, "mean_width": 1.0, "n": 36}
        assert all(f["scores"][name]["interval"]["n"] == 12 for f in out["folds"])
    # the report's section: a row per fold and the pooled row, the verdicts in words
    md = _folds_section(out, lambda key, header, rows: md_table(header, rows))
    assert md.count("\n| ") == 1 + 3 + 1  # header, three folds, pooled
    assert "perfect minus consensus in SRCC, all folds: " in md and "ahead" in md
    assert "Recommending by perfect: chosen OA" in md

