"""Split-conformal intervals of a predicted OA (:mod:`rssqa.intervals`)."""

from __future__ import annotations

import numpy as np
import pytest

from rssqa import intervals
from rssqa.errors import RSSQAError


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and true OA where low predictions are far less sure than high ones."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.3, 1.0, n)
    oa = np.clip(pred + rng.normal(0.02, 0.25 * (1.0 - pred), n), 0, 1)
    return pred, oa


def test_new_rows_like_the_held_out_ones_are_covered_at_the_level():
    fitted = intervals.fit(*_rows(1500, 0), level=0.9)
    got = intervals.coverage(*_rows(20000, 1), fitted)
    assert 0.88 <= got["coverage"] <= 0.93 and got["below"] + got["above"] == pytest.approx(1 - got["coverage"])
    # each side misses about half of what the interval misses: the offsets are signed, not a symmetric width
    assert 0.02 <= got["below"] <= 0.08 and 0.02 <= got["above"] <= 0.08
    # the bins: an image scored 0.95 gets a narrower interval than one scored 0.45
    low, high = intervals.bounds(np.array([0.45, 0.95]), fitted)
    assert (high - low)[1] < 0.5 * (high - low)[0]
    assert len(fitted["edges"]) == intervals.BINS - 1 and sum(fitted["n"]) == 1500


def test_one_bin_and_a_wider_level():
    pred, oa = _rows(800, 2)
    one = intervals.fit(pred, oa, level=0.8, bins=1)
    wide = intervals.fit(pred, oa, level=0.95, bins=1)
    assert one["edges"] == [] and wide["low"][0] < one["low"][0] < 0 < one["high"][0] < wide["high"][0]
    new = _rows(5000, 3)
    assert intervals.coverage(*new, one)["coverage"] < intervals.coverage(*new, wide)["coverage"]


def test_too_few_rows_give_the_whole_range():
    """With 5 held-out rows a 90% interval needs the 6th largest residual: there is none, so [0, 1]."""
    fitted = intervals.fit([0.5, 0.6, 0.7, 0.8, 0.9], [0.55, 0.6, 0.6, 0.85, 0.9], level=0.9, bins=1)
    assert fitted["low"] == [-1.0] and fitted["high"] == [1.0]
    low, high = intervals.bounds(np.array([0.2, 0.7]), fitted)
    assert low.tolist() == [0.0, 0.0] and high.tolist() == [1.0, 1.0]
    # at 50% the same rows suffice: the 1st smallest (floor(6 * 0.25)) and the 5th (ceil(6 * 0.75))
    half = intervals.fit([0.5, 0.6, 0.7, 0.8, 0.9], [0.55, 0.6, 0.6, 0.85, 0.9], level=0.5, bins=1)
    assert half["low"] == [pytest.approx(-0.1)] and half["high"] == [pytest.approx(0.05)]


def test_a_perfect_score_gets_a_zero_width_interval_that_covers():
    pred = np.linspace(0.2, 0.9, 60)
    fitted = intervals.fit(pred, pred)
    got = intervals.coverage(pred, pred, fitted)
    assert got["coverage"] == 1.0 and got["mean_width"] == 0.0 and got["n"] == 60


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(RSSQAError, match="3 predictions for 2 true values"):
        intervals.fit([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(RSSQAError, match="level 1.5 must be in"):
        intervals.fit([0.1], [0.1], level=1.5)
