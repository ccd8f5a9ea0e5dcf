"""Recommendation metrics on a hand-built table."""

import numpy as np
import pytest

from rssqa.errors import RSSQAError
from rssqa.recommend import best_fixed_method, headroom, rank_methods, recommend_metrics, within_image_error

# three images x three methods: (image, method, oa, score)
ROWS = [
    ("i1", "a", 0.90, 0.8), ("i1", "b", 0.80, 0.9), ("i1", "c", 0.70, 0.1),  # picks b, best is a
    ("i2", "a", 0.60, 0.2), ("i2", "b", 0.75, 0.7), ("i2", "c", 0.75, 0.3),  # picks b, tie best b/c
    ("i3", "a", 0.50, 0.9), ("i3", "b", 0.40, 0.1), ("i3", "c", 0.45, 0.2),  # picks a = best
]  # fmt: skip


def _cols(rows):
    return [list(c) for c in zip(*rows, strict=True)]


def test_metrics_by_hand():
    ids, methods, oa, scores = _cols(ROWS)
    out = recommend_metrics(ids, methods, oa, scores, best_fixed="a")
    assert out["top1"] == pytest.approx(2 / 3)
    assert out["chosen_oa"] == pytest.approx((0.80 + 0.75 + 0.50) / 3)
    assert out["best_fixed_oa"] == pytest.approx((0.90 + 0.60 + 0.50) / 3)
    assert out["oracle_oa"] == pytest.approx((0.90 + 0.75 + 0.50) / 3)
    assert out["regret"] == pytest.approx(out["oracle_oa"] - out["chosen_oa"])
    assert out["n_images"] == 3
    # within 0.01: i1 picks b at 0.80 against 0.90, a miss either way
    assert out["top1_within"] == pytest.approx(2 / 3)
    loose = recommend_metrics(ids, methods, oa, scores, best_fixed="a", tolerance=0.1)
    assert loose["top1_within"] == 1.0 and loose["top1"] == out["top1"]


def test_oracle_scores_give_full_marks():
    ids, methods, oa, _ = _cols(ROWS)
    out = recommend_metrics(ids, methods, oa, oa, best_fixed="b")
    assert out["top1"] == 1.0
    assert out["regret"] == pytest.approx(0.0)


def test_best_fixed_and_ranking():
    ids, methods, oa, _ = _cols(ROWS)
    # means: a 0.667, b 0.65, c 0.633
    assert best_fixed_method(ids, methods, oa) == "a"
    assert rank_methods({"x": 0.5, "b": 0.7, "a": 0.5}) == [("b", 0.7), ("a", 0.5), ("x", 0.5)]


def test_incomplete_or_duplicate_rows():
    ids, methods, oa, scores = _cols(ROWS[:-1])
    with pytest.raises(RSSQAError, match=r"i3 lacks methods \['c'\]"):
        recommend_metrics(ids, methods, oa, scores, best_fixed="a")
    ids, methods, oa, scores = _cols([*ROWS, ROWS[0]])
    with pytest.raises(RSSQAError, match="twice"):
        recommend_metrics(ids, methods, oa, scores, best_fixed="a")
    ids, methods, oa, scores = _cols(ROWS)
    with pytest.raises(RSSQAError, match="'z' not among"):
        recommend_metrics(ids, methods, oa, scores, best_fixed="z")


def test_headroom_of_noise_free_and_noisy_oracles():
    ids, methods, oa, _ = _cols(ROWS)
    h = headroom(ids, methods, oa, sigmas=(0.0, 1e-4, 10.0), target=0.9, repeats=400)
    assert h["top1_at_sigma"]["0"] == 1.0 and h["top1_at_sigma"]["0.0001"] == 1.0
    # huge noise: a random pick; i2 has two best of three, i1 and i3 one -> (1/3 + 2/3 + 1/3) / 3
    assert h["top1_at_sigma"]["10"] == pytest.approx(4 / 9, abs=0.05)
    # the smallest OA gap to the best is 0.05 (i3): noise far below it keeps top1 >= 0.9
    assert 0.005 < h["sigma_for_target"] < 0.2
    assert headroom(ids, methods, oa, target=1.01)["sigma_for_target"] == 0.0


def test_within_image_error_ignores_per_image_offsets():
    ids, methods, oa, _ = _cols(ROWS)
    offset = {"i1": 0.3, "i2": -0.2, "i3": 0.05}
    shifted = [v + offset[i] for i, v in zip(ids, oa, strict=True)]
    assert within_image_error(ids, methods, oa, shifted) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(4000) for _ in range(4)]
    methods = ["a", "b", "c", "d"] * 4000
    oa = rng.uniform(0.3, 0.9, len(ids))
    noisy = oa + rng.normal(0.0, 0.05, len(ids)) + np.repeat(rng.normal(0, 0.2, 4000), 4)
    assert within_image_error(ids, methods, oa, noisy) == pytest.approx(0.05, rel=0.03)


def test_policy_ranks_by_the_model_only_where_validation_says_ahead():
    from rssqa.recommend import POLICY_FIXED, POLICY_MODEL, apply_policy, choose_policy

    assert choose_policy({"diff": 0.02, "low": 0.001, "high": 0.04, "verdict": "ahead"}) == POLICY_MODEL
    for verdict in ("tie", "behind"):
        assert choose_policy({"diff": 0.01, "low": -0.01, "high": 0.03, "verdict": verdict}) == POLICY_FIXED
    ranking = rank_methods({"a": 0.5, "b": 0.9, "c": 0.7})
    assert apply_policy(ranking, "a") == [("a", 0.5), ("b", 0.9), ("c", 0.7)]  # the fixed method first, the rest in order
    assert apply_policy(ranking, None) == apply_policy(ranking, "z") == ranking  # none, or not among the ranked
