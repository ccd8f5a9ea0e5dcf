"""The quality metrics agree with scipy on known vectors.

torchmetrics adds a 1e-6 guard to the Spearman denominator, and ranks are float32, hence the 1e-5 tolerance.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rssqa import metrics
from rssqa.errors import RSSQAError

RNG = np.random.default_rng(0)
TARGET = RNG.uniform(0.4, 0.95, 50)
PRED = TARGET + RNG.normal(0, 0.08, 50)
# ties on both sides: tau-b and average ranks matter here
TIED_PRED = np.round(PRED, 1)
TIED_TARGET = np.round(TARGET, 1)


@pytest.mark.parametrize("pred,target", [(PRED, TARGET), (TIED_PRED, TIED_TARGET), ([1, 2, 3, 4], [1, 3, 2, 4])])
def test_correlations_match_scipy(pred, target):
    assert metrics.srcc(pred, target) == pytest.approx(stats.spearmanr(pred, target).statistic, abs=1e-5)
    assert metrics.plcc(pred, target) == pytest.approx(stats.pearsonr(pred, target).statistic, abs=1e-5)
    tau = stats.kendalltau(pred, target, variant="b").statistic
    assert metrics.krcc(pred, target) == pytest.approx(tau, abs=1e-5)


def test_known_values():
    assert metrics.srcc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-5)
    assert metrics.krcc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert metrics.srcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-5)
    # RMSE is a root *mean*, not a root sum: 0.1 off on every row is 0.1
    assert metrics.rmse([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]) == pytest.approx(0.1)
    assert metrics.rmse([0.5, 0.5], [0.5, 0.9]) == pytest.approx(math.sqrt(0.08))


def test_logistic_fit_straightens_a_monotone_curve():
    x = np.linspace(-3, 3, 80)
    y = 0.5 + 0.4 / (1 + np.exp(-2.5 * x))
    linear = metrics.plcc(x, y)
    fitted = metrics.plcc_logistic(x, y)
    assert linear < 0.99 < fitted
    assert fitted == pytest.approx(1.0, abs=1e-4)
    # a fit never changes ranks; with noise it is at least as good as the linear PLCC on the same data
    assert metrics.plcc_logistic(PRED, TARGET) >= metrics.plcc(PRED, TARGET) - 1e-6


def test_undefined_and_bad_inputs():
    assert math.isnan(metrics.srcc([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.plcc_logistic([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.krcc([1.0], [1.0]))
    with pytest.raises(RSSQAError, match="3 predictions for 2 targets"):
        metrics.srcc([1, 2, 3], [1, 2])


def test_grouped_metrics_split_rows_by_group():
    groups = ["a"] * 25 + ["b"] * 25
    out = metrics.grouped_metrics(PRED, TARGET, groups)
    assert sorted(out) == ["a", "b"]
    assert set(out["a"]) == set(metrics.METRICS)
    assert out["b"]["srcc"] == pytest.approx(stats.spearmanr(PRED[25:], TARGET[25:]).statistic)


def test_paired_bootstrap_separates_a_better_score_from_a_tie():
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(150), 4)
    oa = rng.uniform(0.2, 0.9, len(images))
    good = oa + rng.normal(0, 0.05, len(oa))
    poor = oa + rng.normal(0, 0.3, len(oa))
    out = metrics.paired_bootstrap(good, poor, oa, images, n_boot=300)
    for name, ref in (("srcc", stats.spearmanr), ("plcc", stats.pearsonr)):
        r = out[name]
        assert r["diff"] == pytest.approx(ref(good, oa)[0] - ref(poor, oa)[0], abs=1e-6)
        assert 0 < r["low"] < r["diff"] < r["high"] and r["a_better"] == 1.0
    twin = good + rng.normal(0, 1e-3, len(oa))  # the same score up to a whisker: the interval spans 0
    tie = metrics.paired_bootstrap(good, twin, oa, images, n_boot=300)["srcc"]
    assert tie["low"] < 0 < tie["high"] and 0.05 < tie["a_better"] < 0.95
    with pytest.raises(RSSQAError, match="one size"):
        metrics.paired_bootstrap(good[:-1], poor[:-1], oa[:-1], images[:-1])


def _bootstrap_pair(a, b, t, groups, n_boot, seed):
    """The paired bootstrap of one pair from scratch: draws, both scores' correlations, their differences."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    _, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(inv.max() + 1)]
    draws = np.random.default_rng(seed).integers(0, len(members), (n_boot, len(members)))
    idx = np.stack([np.concatenate([members[k] for k in d]) for d in draws], axis=1)
    tt = torch.from_numpy(t[idx])
    return {name: (fn(torch.from_numpy(a[idx]), tt) - fn(torch.from_numpy(b[idx]), tt)).numpy()
            for name, fn in (("srcc", spearman_corrcoef), ("plcc", pearson_corrcoef))}  # fmt: skip


def test_many_pairs_on_one_set_of_draws_give_each_pair_s_numbers():
    """PairedBootstrap keeps each score's correlations over the draws: every pair, in any order and asked
    again, gives exactly what a from-scratch bootstrap of that pair with torchmetrics gives, tied scores
    included (rounded, or one per image)."""
    rng = np.random.default_rng(2)
    images = np.repeat(np.arange(60), 3)
    oa = rng.uniform(0.2, 0.9, len(images))
    scores = [oa + rng.normal(0, s, len(oa)) for s in (0.05, 0.1, 0.3)]
    scores += [np.round(scores[1], 1), np.repeat(rng.uniform(size=60), 3)]
    boot = metrics.PairedBootstrap(oa, images, n_boot=200, seed=4)
    for i, j in ((0, 1), (2, 0), (1, 2), (0, 1), (1, 0), (3, 4), (4, 0)):
        got = boot.compare(scores[i], scores[j])
        assert got == metrics.paired_bootstrap(scores[i], scores[j], oa, images, n_boot=200, seed=4)
        ref = _bootstrap_pair(scores[i], scores[j], oa, images, 200, 4)
        for name in ("srcc", "plcc"):
            assert got[name]["low"] == float(np.percentile(ref[name], 2.5))
            assert got[name]["high"] == float(np.percentile(ref[name], 97.5))
            assert got[name]["a_better"] == float((ref[name] > 0).mean())
    assert len(boot._kept) == 2 * 5  # one pass per score and metric
    with pytest.raises(RSSQAError, match="equal lengths"):
        boot.compare(scores[0][:-3], scores[1][:-3])


def test_mean_bootstrap_over_images():
    rng = np.random.default_rng(1)
    gain = rng.normal(0.02, 0.01, 200)  # a per-image gain clearly above zero
    v = metrics.mean_bootstrap(gain, n_boot=500)
    assert v["diff"] == pytest.approx(gain.mean()) and 0 < v["low"] < v["diff"] < v["high"]
    assert v["verdict"] == "ahead" and v["a_better"] == 1.0
    assert metrics.mean_bootstrap(-gain, n_boot=500)["verdict"] == "behind"
    noise = rng.normal(0, 0.01, 200)
    assert metrics.mean_bootstrap(noise - noise.mean(), n_boot=500)["verdict"] == "tie"  # centred on zero
    assert metrics.mean_bootstrap(gain, n_boot=500, seed=3) == metrics.mean_bootstrap(gain, n_boot=500, seed=3)
    assert metrics.mean_bootstrap(np.zeros(0))["verdict"] == "tie"
