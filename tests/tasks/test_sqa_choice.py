"""The one decision between a recommending model and the best fixed method (rssqa.tasks.sqa.choice)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rssqa.recommend import POLICY_FIXED, POLICY_MODEL
from rssqa.tasks.sqa.choice import best_fixed, recommend_policy, recommendation, val_policy

METHODS = ("a", "b", "c")
MEAN = {"a": 0.5, "b": 0.7, "c": 0.6}  # b is the best fixed method on every split


def _data(n: int = 30, seed: int = 0) -> SimpleNamespace:
    """``n`` images per split, every method on each; per image the methods' OA spread around their means."""
    rng = np.random.default_rng(seed)
    split, image, method, oa = [], [], [], []
    for s, sp in enumerate(("train", "val", "test")):
        for i in range(n):
            for m in METHODS:
                split.append(sp)
                image.append(s * n + i)
                method.append(m)
                oa.append(float(np.clip(MEAN[m] + rng.normal(0, 0.15), 0, 1)))
    data = SimpleNamespace(split_of=np.array(split), image_idx=torch.tensor(image), method_of=np.array(method), oa=torch.tensor(oa))
    data.rows = lambda sp: np.flatnonzero(data.split_of == sp).tolist()
    return data


def test_a_score_that_knows_the_truth_is_followed_and_one_that_picks_the_worst_is_not():
    data = _data()
    oa = data.oa.double().numpy()
    val = data.rows("val")
    assert best_fixed(data) == "b"
    policy, figures = val_policy(data, oa[val])
    assert policy == POLICY_MODEL and figures["vs_best_fixed"]["verdict"] == "ahead"
    assert figures["chosen_oa"] == pytest.approx(figures["oracle_oa"]) and figures["best_fixed_method"] == "b"
    policy, figures = val_policy(data, -oa[val])  # ranks each image's worst method first
    assert policy == POLICY_FIXED and figures["vs_best_fixed"]["verdict"] == "behind"
    # another fixed method to beat, and the bootstrap's own draws: the same decision, other intervals
    policy, other = val_policy(data, oa[val], fixed="a", n_boot=200, seed=3)
    assert policy == POLICY_MODEL and other["best_fixed_method"] == "a" and other["best_fixed_oa"] < figures["best_fixed_oa"]


def test_the_scorer_policy_reports_on_test_what_was_decided_on_val():
    data = _data()
    oa = data.oa.double().numpy()
    good = {sp: oa[data.rows(sp)] for sp in ("val", "test")}
    p = recommend_policy(data, "m", good)
    assert p["policy"] == POLICY_MODEL and p["model"] == "m" and p["method"] == "b"
    assert p["test"]["chosen_oa"] == pytest.approx(recommendation(data, good)["chosen_oa"])
    assert p["test"]["regret"] == pytest.approx(0.0)
    bad = {sp: -v for sp, v in good.items()}
    p = recommend_policy(data, "m", bad)
    # behind on val: the best fixed method on every test image, whatever the model says there
    assert p["policy"] == POLICY_FIXED and p["test"]["chosen_oa"] == pytest.approx(p["test"]["best_fixed_oa"])
    assert p["test"]["vs_best_fixed"]["diff"] == pytest.approx(0.0)
    assert p["val"]["chosen_oa"] < p["val"]["best_fixed_oa"]
