"""Recommendation metrics on a hand-built table."""

import pytest

from rssqa.errors import RSSQAError
from rssqa.recommend import best_fixed_method, rank_methods, recommend_metrics

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
