"""The pixel error head in the sqa stage: its AUROC bootstrap, and the stage run of tests/tasks/test_sqa.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from rssqa.errors import RSSQAError
from rssqa.pixel_auroc import _pair_sums, auroc_bootstrap, auroc_bootstrap_counts, pair_counts
from rssqa.runs import read_summary
from rssqa.tasks.sqa.pixel import PixelConfig, sample_pixels
from tests.tasks.test_sqa import METHODS, SIZE, SOURCES, trained_run


def _pixels(seed: int, n_images: int = 12, per_image: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.repeat(np.arange(n_images), per_image)
    target = rng.uniform(size=len(image)) < 0.3
    score = np.round(target * 0.5 + rng.uniform(size=len(image)), 1)  # rounded: many ties
    return score, target, image


def test_pair_counts_give_the_pooled_auroc_of_any_reweighting():
    score, target, image = _pixels(0)
    pairs = pair_counts(score, target, image, 12, step=5)
    pos, neg = np.bincount(image, target, 12), np.bincount(image, ~target, 12)
    ones = np.ones(12)
    exact = float(binary_auroc(torch.from_numpy(score), torch.from_numpy(target).long(), thresholds=None))
    assert ones @ pairs @ ones / (pos.sum() * neg.sum()) == pytest.approx(exact, abs=1e-6)
    # image 3 drawn twice, image 5 not at all: the same as the pixels written out that way
    c = ones.copy()
    c[3], c[5] = 2, 0
    keep = np.concatenate([np.flatnonzero(image == i) for i in range(12) for _ in range(int(c[i]))])
    drawn = float(binary_auroc(torch.from_numpy(score[keep]), torch.from_numpy(target[keep]).long(), thresholds=None))
    assert c @ pairs @ c / ((c @ pos) * (c @ neg)) == pytest.approx(drawn, abs=1e-6)


def test_both_ways_of_counting_draws_agree_with_the_drawn_pixels():
    score, target, image = _pixels(3)
    draws = np.random.default_rng(4).integers(0, 3, (20, 12)).astype(np.float64)
    by_pairs, whole = _pair_sums(score, target, image, 12, draws)  # 12 groups <= 20 draws: pair counts
    by_ranks, whole_r = _pair_sums(score, target, image, 12, draws[:5])  # more groups than draws: rank sums
    assert by_ranks == pytest.approx(by_pairs[:5]) and whole_r == pytest.approx(whole)
    c = draws[0]
    keep = np.concatenate([np.flatnonzero(image == i) for i in range(12) for _ in range(int(c[i]))])
    drawn = float(binary_auroc(torch.from_numpy(score[keep]), torch.from_numpy(target[keep]).long(), thresholds=None))
    pos, neg = np.bincount(image, target, 12), np.bincount(image, ~target, 12)
    assert by_ranks[0] / ((c @ pos) * (c @ neg)) == pytest.approx(drawn, abs=1e-6)  # torchmetrics: float32
    with pytest.raises(RSSQAError, match="expected draws x 12 groups"):
        auroc_bootstrap_counts(score, score, target, image, draws[:, :5])


def test_auroc_bootstrap_verdicts():
    score, target, image = _pixels(1)
    noise = np.random.default_rng(2).uniform(size=len(score))
    ahead = auroc_bootstrap(score, noise, target, image, n_boot=200)
    assert ahead["verdict"] == "ahead" and ahead["low"] > 0 and ahead["a_better"] == 1.0
    same = auroc_bootstrap(score, score, target, image, n_boot=200)
    assert same["diff"] == 0 and same["verdict"] == "tie"
    with pytest.raises(RSSQAError, match="at least two test images"):
        auroc_bootstrap(score, noise, target, np.zeros(len(score)))


def test_pixel_sample_is_fixed_and_labelled_only():
    target = torch.zeros(16, 16, dtype=torch.uint8)
    target[:, :4] = 255
    a = sample_pixels(target, 20, 0, 3, 1)
    assert len(a) == 20 and torch.equal(a, sample_pixels(target, 20, 0, 3, 1))
    assert not torch.equal(a, sample_pixels(target, 20, 0, 4, 1))  # another row, another draw
    assert (target.reshape(-1)[a] != 255).all()
    assert len(sample_pixels(target, 0, 0, 3, 1)) == 16 * 12


def test_pixel_config_refuses_unknown_keys_and_bad_values():
    assert PixelConfig.of(None) == PixelConfig() and PixelConfig.of({"epochs": 2}).epochs == 2
    with pytest.raises(RSSQAError, match="pixel: unknown keys"):
        PixelConfig.of({"epoch": 2})
    with pytest.raises(RSSQAError, match="pixel.batch"):
        PixelConfig(batch=0)
    with pytest.raises(RSSQAError, match="pixel.quality_folds: 0 \\(off\\) or at least 2, got 1"):
        PixelConfig(quality_folds=1)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_stage_tests_and_exports_the_pixel_error_head(run_root):
    out = run_root / "sqa"
    px = read_summary(out)["pixel_error"]
    for name, m in {"head": {"auroc": px["auroc"], "ap": px["ap"]}, **px["baselines"]}.items():
        assert m is not None and all(0 <= m[k] <= 1 for k in ("auroc", "ap")), name
    assert px["best_baseline"] == max(px["baselines"], key=lambda k: px["baselines"][k]["auroc"])
    v = px["vs_best_baseline"]
    assert v["diff"] == pytest.approx(px["auroc"] - px["baselines"][px["best_baseline"]]["auroc"], abs=1e-6)
    assert v["low"] <= v["high"] and v["verdict"] == ("ahead" if v["low"] > 0 else "behind" if v["high"] < 0 else "tie")
    n_test = 3 * len(SOURCES)
    assert px["n_test_images"] == n_test and px["n_test_rows"] == n_test * len(METHODS)
    # every test row draws pixels_per_row of its labelled pixels (the fixture leaves a strip unlabelled)
    assert px["n_pixels"] == n_test * len(METHODS) * min(px["pixels_per_row"], SIZE * (SIZE - 4))
    assert px["agreement"] is True and 1 <= px["best_epoch"] <= px["config"]["epochs"]
    # quality-weighted agreement: the recommender's scores are out of sample on val, and on the train split
    # from the fits that left out each fold of it (quality_folds 3), so the head trains on the val images
    # not kept to choose the epoch (3 per source here: 2 choose, 1 left) and on the 6 train ones
    assert px["quality_weighted"] is True and px["train_split"] == "train+val" and px["model"]["quality_power"] == 8
    assert px["config"]["quality_folds"] == 3
    assert px["train_images"] == (1 + 6) * len(SOURCES) and px["val_rows"] == 2 * len(SOURCES) * len(METHODS)
    assert set(px["per_source"]) == set(SOURCES) and math.isfinite(px["val_auroc"])
    # the group folds' heads and this one read the methods' outputs from one pass, dropped afterwards
    assert read_summary(out)["pixel_seam_cache"]["sources"] == dict.fromkeys(SOURCES, "made")
    assert not list((out / "cache").glob("seam_*"))
    assert px["config"]["top"] == 0 and px["train_rows"] == px["train_images"] * len(METHODS)  # every method's rows
    # the recommended population: one row per test image, the method the scorer's ranking head puts first
    rec = px["recommended"]
    assert rec["n_images"] == n_test and rec["n_pixels"] == n_test * min(px["pixels_per_row"], SIZE * (SIZE - 4))
    assert rec["best_baseline"] == max(rec["baselines"], key=lambda k: rec["baselines"][k]["auroc"])
    assert rec["vs_best_baseline"]["diff"] == pytest.approx(rec["auroc"] - rec["baselines"][rec["best_baseline"]]["auroc"], abs=1e-6)

    from rssqa.scorer import Scorer

    config = json.loads((out / "scorer" / "scorer.json").read_text())
    assert (out / "scorer" / "scorer_pixel.safetensors").is_file()
    assert config["pixel_model"] == px["model"] and config["pixel_model"]["token_dim"] == 128
    assert config["image_size"] == [SIZE, SIZE] and config["image_sizes"] == dict.fromkeys(SOURCES, [SIZE, SIZE])
    scorer = Scorer.load(out / "scorer")
    assert scorer.pixel_model is not None and scorer.pixel_model.kwargs == px["model"]
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    maps = scorer.pixel_error([image, image[:, ::-1].copy()], source="alpha")
    assert len(maps) == 2 and maps[0].shape == (len(METHODS), SIZE, SIZE)
    assert np.all((maps[0] >= 0) & (maps[0] <= 1))
    assert np.array_equal(scorer.pixel_error([image], source="alpha")[0], maps[0])  # alone or batched, the same
    with pytest.raises(RSSQAError, match="needs at least 3 methods"):
        scorer.pixel_error([image], ["fpn"], source="alpha")


def test_seam_cache_gives_the_live_seams_numbers(run_root, tmp_path, monkeypatch):
    """The group folds' heads read the methods' per-pixel outputs from one pass over the pool: the same bits
    as a live pass (any block size), found again instead of made twice, over budget not made, then dropped."""
    from rssqa.tasks.sqa import SQADataModule, pixel_rows
    from rssqa.tasks.sqa.pixel_cache import drop_seam_caches, fill_seam_cache, open_seam_cache

    torch.set_num_threads(1)
    dm = SQADataModule(str(run_root / "sqed"), str(run_root / "clip_rs"), cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    methods = pixel_rows.methods_of(dm)
    rng = np.random.default_rng(0)
    quality = {(i, m): float(rng.uniform()) for i in range(len(dm.image_keys)) for m in METHODS}

    def blocks(block: int) -> list:
        out = []
        for source, of_source in methods.items():
            chosen = pixel_rows.choose_images(dm, source, "val", 0, 0) + pixel_rows.choose_images(dm, source, "test", 0, 0)
            out += list(pixel_rows.seam_blocks(dm, source, of_source, chosen, True, block, quality, 8.0))
        return out

    live = blocks(32)
    assert fill_seam_cache(dm, 16, 0) == dict.fromkeys(SOURCES, "off")
    over = fill_seam_cache(dm, 16, 1e3)
    assert all("over the budget of 0.00 GB" in v for v in over.values()) and not list((tmp_path / "cache").glob("seam_*"))
    assert fill_seam_cache(dm, 16, 1e9) == dict.fromkeys(SOURCES, "made")
    assert fill_seam_cache(dm, 16, 1e9) == dict.fromkeys(SOURCES, "found")
    monkeypatch.setattr(pixel_rows, "load_segmenter", lambda *a, **k: pytest.fail("a method ran though the cache has it"))
    cached = blocks(16)
    assert [i for i, _ in cached] == [i for i, _ in live]
    for (_, a), (_, b) in zip(live, cached, strict=True):
        for (xa, ta), (xb, tb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ta, tb)
    drop_seam_caches(dm)
    assert all(open_seam_cache(dm, s, m) is None for s, m in methods.items())
    assert not list((tmp_path / "cache").glob("seam_*"))


def test_error_map_score_is_the_scorers_map_averaged(run_root):
    """The stage's ``error_map`` score of a test row is 1 - the mean of the map the scorer draws for it."""
    from rssqa.data.sqed import SQED
    from rssqa.scorer import Scorer

    s = read_summary(run_root / "sqa")
    assert s["baselines"]["error_map"]["srcc"] is not None and "error_map" in s["recommend_baselines"]
    assert set(s["vs_error_map"]) == {"rs_sqa", *s["baselines"]} - {"error_map"}
    preds = json.loads((run_root / "sqa" / "predictions.json").read_text())
    key = preds["rows"][0]["key"]
    mine = {r["method"]: v for r, v in zip(preds["rows"], preds["scores"]["error_map"], strict=True) if r["key"] == key}
    entry = next(r for r in SQED(str(run_root / "sqed")).rows if r["key"] == key)
    image = np.ascontiguousarray(SQED(str(run_root / "sqed")).images(entry["source"])[entry["image_row"]])
    methods = sorted(mine)
    maps = Scorer.load(run_root / "sqa" / "scorer").pixel_error([image], methods, source=entry["source"])[0]
    assert len(methods) == len(METHODS)
    assert 1.0 - maps.mean(axis=(1, 2)) == pytest.approx([mine[m] for m in methods], abs=1e-4)


def test_report_has_the_pixel_error_section(run_root):
    from rssqa.report import build_report

    px = read_summary(run_root / "sqa")["pixel_error"]
    md = build_report(run_root.parent, run_root.name, wandb=False).read_text()
    section = md[md.index("## Where a segmentation is wrong") : md.index("## Method recommendation")]
    assert f"| pixel error head | {px['auroc']:.3f} | {px['ap']:.3f} |" in section
    assert f"verdict: {px['vs_best_baseline']['verdict']}" in section
    rec = px["recommended"]
    assert f"| pixel error head | {px['auroc']:.3f} | {px['ap']:.3f} | {rec['auroc']:.3f} | {rec['ap']:.3f} |" in section
    assert f"Recommended method: head minus the best baseline ({rec['best_baseline']})" in section
    assert json.loads((run_root / "report.json").read_text())["sqa_pixel_error"]["auroc"] == px["auroc"]
    # the run also left each source out and cross-validated over groups: both sections, with intervals
    loso = md[md.index("## Leave one source out") : md.index("## Cross-validation over areas")]
    assert "with_agreement minus consensus [95%]" in loso and "with the interval excluding zero" in loso
    assert "minus consensus in SRCC, all folds:" in md[md.index("## Cross-validation over areas") :]
    # the predicted OA's intervals: on the test rows, and out of fold
    s = read_summary(run_root / "sqa")
    iv, oof = s["intervals"]["with_agreement"], s["group_folds"]["pooled"]["intervals"]["with_agreement"]
    section = md[md.index("## How far the predicted OA may be: 90% intervals") : md.index("## Cross-validation over areas")]
    assert f"| with_agreement | {sum(iv['n'])} | {iv['test']['coverage']:.3f} | {iv['test']['below']:.3f} |" in section
    assert f"| {oof['coverage']:.3f} ({oof['mean_width']:.2f} wide) |" in section


def test_recommended_methods_are_each_images_first():
    from types import SimpleNamespace

    from rssqa.tasks.sqa.run import recommended_methods

    data = SimpleNamespace(
        methods=["a", "b", "c"], rows=lambda split: [0, 1, 2, 3, 4],
        image_idx=torch.tensor([7, 7, 7, 9, 9]), method_of=np.array(["a", "b", "c", "c", "a"]),
    )  # fmt: skip
    assert recommended_methods(data, np.array([0.2, 0.9, 0.5, 0.1, 0.3])) == {7: 1, 9: 0}


def test_collect_rows_keeps_each_images_most_accurate_methods(monkeypatch):
    from types import SimpleNamespace

    from rssqa.tasks.sqa import pixel_rows

    wrong = {"a": [0.5, 0.1], "b": [0.2, 0.6], "c": [0.3, 0.3]}  # per method, the share wrong in images 10 and 11

    def blocks(data, source, methods, chosen, agreement, block, quality=None, power=0.0):
        per_method = []
        for m in methods:
            t = torch.zeros(2, 10, 10, dtype=torch.uint8)
            for b, share in enumerate(wrong[m]):
                t[b].view(-1)[: int(share * 100)] = 1
            t[:, 0, 0] = 255  # an unlabelled pixel is not counted
            per_method.append((torch.zeros(2, 8, 10, 10), t))
        yield [10, 11], per_method

    monkeypatch.setattr(pixel_rows, "methods_of", lambda data: {"s": ["a", "b", "c"]})
    monkeypatch.setattr(pixel_rows, "seam_blocks", blocks)
    data = SimpleNamespace(methods=["a", "b", "c"])
    plan = {"s": [(0, 10), (1, 11)]}
    rows = pixel_rows.collect_rows(data, plan, "train", True, 32, top=2)
    assert sorted(zip(rows.image, rows.method, strict=True)) == [(10, 1), (10, 2), (11, 0), (11, 2)]
    assert len(pixel_rows.collect_rows(data, plan, "train", True, 32).x) == 6  # top 0: every method


def test_val_partition_is_disjoint_seeded_and_sized(monkeypatch):
    from types import SimpleNamespace

    from rssqa.tasks.sqa import pixel_rows

    keys = [(r, 100 + r) for r in range(20)]
    monkeypatch.setattr(pixel_rows, "choose_images", lambda data, source, split, n, seed: keys if split == "val" else [])
    data = SimpleNamespace(sqed=SimpleNamespace(folder="f"))
    train, select = pixel_rows.partition_val(data, "s", 8, 4, 0)
    assert len(train) == 8 and len(select) == 4 and not set(train) & set(select)
    assert (train, select) == pixel_rows.partition_val(data, "s", 8, 4, 0)
    assert train != sorted(set(keys) - set(select))[:8]  # drawn from the rest, not its first images
    everything, quarter = pixel_rows.partition_val(data, "s", 0, 0, 0)  # 0: a quarter to choose, the rest to train
    assert len(quarter) == 5 and len(everything) == 15 and sorted(everything + quarter) == keys
    assert len(pixel_rows.partition_val(data, "s", 0, 50, 0)[0]) == 1  # at least one image left to train on
    monkeypatch.setattr(pixel_rows, "choose_images", lambda data, source, split, n, seed: keys[:1])
    with pytest.raises(RSSQAError, match="f: s has 1 val-split images"):
        pixel_rows.partition_val(data, "s", 0, 0, 0)


def test_training_plans_fall_back_without_enough_val_images(monkeypatch, capsys):
    from types import SimpleNamespace

    from rssqa.tasks.sqa import pixel, pixel_rows

    n_val = {"a": 8, "b": 1}

    def choose(data, source, split, n, seed):
        return [(r, r) for r in range(n_val[source] if split == "val" else 6)]

    monkeypatch.setattr(pixel, "choose_images", choose)
    monkeypatch.setattr(pixel_rows, "choose_images", choose)
    data = SimpleNamespace(sqed=SimpleNamespace(folder="f"))
    cfg = PixelConfig(train_images=0, val_images=2)
    weighted, plans = pixel.training_plans(data, {"a": ["m"]}, cfg, 0, True)
    assert weighted and len(plans["train"]["a"]) == 6 and len(plans["val"]["a"]) == 2  # both from val
    weighted, plans = pixel.training_plans(data, {"a": ["m"], "b": ["m"]}, cfg, 0, True)
    assert not weighted and len(plans["train"]["b"]) == 6 and len(plans["val"]["b"]) == 1  # train and val
    assert "fewer than 2 val-split images in b: the head trains without quality weights" in capsys.readouterr().err
    assert not pixel.training_plans(data, {"a": ["m"]}, cfg, 0, False)[0]
    # with out-of-fold scores on the train split: its images join the val images the head trains on
    weighted, plans = pixel.training_plans(data, {"a": ["m"]}, cfg, 0, True, crossfit=True)
    assert weighted and len(plans["train"]["a"]) == 6 + 6 and len(plans["val"]["a"]) == 2


def test_crossfit_splits_hold_out_each_train_group_once():
    from types import SimpleNamespace

    import numpy as np

    from rssqa.tasks.sqa.folds import crossfit_splits

    split = ["train"] * 7 + ["val", "val", "test", "seg"]
    group = ["g0", "g0", "g1", "g2", "g3", "g3", "g4", "v", "v", "t", "s"]
    rows = [{"source": "a", "group": g, "split": sp} for g, sp in zip(group, split, strict=True)]
    data = SimpleNamespace(sqed=SimpleNamespace(rows=rows), split_of=np.array(split))
    folds = crossfit_splits(data, 3)
    assert len(folds) == 3
    held = np.stack([f == "test" for f in folds])
    assert (held[:, :7].sum(0) == 1).all() and not held[:, 7:].any()  # every train row out of fold once
    assert all(f[0] == f[1] and f[4] == f[5] for f in folds)  # a group stays together
    for f in folds:
        assert list(f[7:]) == ["val", "val", "unused", "unused"]
        assert set(f[:7]) <= {"train", "test"} and (f[:7] == "train").any()
    with pytest.raises(RSSQAError, match="at least 2"):
        crossfit_splits(data, 1)
    assert len(crossfit_splits(data, 6)) == 5  # one fold per group where there are fewer
    data.sqed.rows = [{**r, "group": "one"} for r in rows]
    assert crossfit_splits(data, 3) == []  # a single group: no out-of-fold scores
