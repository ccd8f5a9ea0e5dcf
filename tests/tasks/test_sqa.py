"""Stage sqa end to end on a tiny RS-SQED written in the real on-disk format.

The fixture writes what the sqed stage writes (table, pool images, label shards from real
``Segmenter.describe`` outputs, Lightning checkpoints of the methods) and two tiny CLIP exports; the
test then runs the real ``stages/sqa.py`` main on it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rssqa import intervals
from rssqa.data.sqed import TABLE, write_label_shard, write_table
from rssqa.errors import RSSQAError
from rssqa.runs import is_done, read_summary

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"alpha": 5, "beta": 4}  # source -> classes
METHODS = ("pspnet", "fpn", "upernet")
N_IMAGES = 12
SIZE = 64  # rs-tiny takes 64 px
GRID, BINS = 4, 10


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocky two-colour scenes with noise: enough structure for features to differ."""
    base = rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8).repeat(16, 1).repeat(16, 2)
    noise = rng.integers(0, 40, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)


def make_fake_sqed(root: Path, seed: int = 0) -> Path:
    """A tiny RS-SQED under ``root/sqed`` plus ``root/clip_rs`` and ``root/clip_raw``."""
    from rssqa.agreement import agreement_statistics
    from rssqa.models.clip import create_clip, export_clip
    from rssqa.models.segmenters import resolve_method
    from rssqa.tasks.sqed import SegmentationTask, per_image_oa

    out = root / "sqed"
    rng = np.random.default_rng(seed)
    rows = []
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    for source, n_classes in SOURCES.items():
        images = _images(rng, N_IMAGES)
        (out / "pool" / source).mkdir(parents=True)
        np.save(out / "pool" / source / "images.npy", images)
        ids = [f"{source}_{i:03d}" for i in range(N_IMAGES)]
        corruption = rng.uniform(0.05, 0.6, N_IMAGES)  # how wrong the "truth" makes each image
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        probs, first_row, described = [], len(rows), []
        for m, method in enumerate(METHODS):
            L.seed_everything(seed + m)
            task = SegmentationTask(resolve_method(method).as_dict(), n_classes, grid=GRID, hist_bins=BINS).eval()
            ckpt = out / "methods" / source / method / "final.ckpt"
            ckpt.parent.mkdir(parents=True)
            torch.save(
                {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "pytorch-lightning_version": L.__version__},
                ckpt,
            )
            stats = task.segmenter.describe(x)
            logits = stats.pop("logits")
            probs.append(logits.softmax(1))
            described.append((method, stats, logits.argmax(1)))
        # one truth per image: the methods' majority vote, corrupted at the image's rate, a strip unlabelled
        votes = torch.stack([F.one_hot(p, n_classes) for _, _, p in described]).sum(0)
        flip = torch.from_numpy(rng.uniform(size=votes.shape[:3]) < corruption[:, None, None])
        truth = torch.where(flip, torch.from_numpy(rng.integers(0, n_classes, votes.shape[:3])), votes.argmax(-1))
        truth[:, :, :4] = 255
        np.save(out / "pool" / source / "masks.npy", truth.numpy().astype(np.uint8))
        for method, stats, pred in described:
            oa, n = per_image_oa(pred, truth, n_classes)
            arrays = {"oa": oa.numpy(), "n_labelled": n.numpy(), **{k: v.float().numpy() for k, v in stats.items()}}
            rel = f"features/{source}/{method}.safetensors"
            meta = {"source": source, "method": method, "image_ids": ids, "grid": GRID, "hist_bins": BINS,
                    "feature_shapes": {k: list(v.shape[1:]) for k, v in arrays.items()}}
            write_label_shard(out / rel, arrays, meta)
            for i, image_id in enumerate(ids):
                rows.append({
                    "key": f"{source}/{image_id}", "image_id": image_id, "source": source, "method": method,
                    "oa": float(oa[i]), "split": splits[i], "group": image_id, "n_labelled": int(n[i]),
                    "msp": float(stats["msp"][i]), "entropy": float(stats["entropy"][i]),
                    "margin": float(stats["margin"][i]), "feature_file": rel, "feature_row": i,
                    "image_file": f"pool/{source}/images.npy", "image_row": i,
                })  # fmt: skip
        # agreement between the source's methods, as the sqed stage writes it
        agree = agreement_statistics(probs, GRID)
        write_label_shard(
            out / "features" / source / "agreement.safetensors",
            {f"{meth}/{k}": a[k].numpy() for meth, a in zip(METHODS, agree, strict=True) for k in ("agree_maps", "agree_global")},
            {"source": source, "methods": list(METHODS), "image_ids": ids, "grid": GRID},
        )
        for r in rows[first_row:]:
            a = agree[METHODS.index(r["method"])]
            r.update(agreement=float(a["agreement"][r["feature_row"]]), consensus=float(a["consensus"][r["feature_row"]]))
    write_table(out / TABLE, rows)
    for name, s in (("clip_rs", 1), ("clip_raw", 2)):
        torch.manual_seed(s)
        model, *_ = create_clip("rs-tiny")
        export_clip(model, "rs-tiny", root / name)
    return out


def _stage_main():
    spec = importlib.util.spec_from_file_location("sqa_stage", ROOT / "stages" / "sqa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def stage_args(root: Path, out: Path, epochs: int = 2) -> list[str]:
    return [
        "--config", str(ROOT / "conf" / "smoke" / "sqa.yaml"),
        "--out", str(out),
        "--data.sqed", str(root / "sqed"),
        "--data.clip", str(root / "clip_rs"),
        "--data.generic_clip", str(root / "clip_raw"),
        "--trainer.max_epochs", str(epochs),
        "--wandb", "false",
        "--loso", "true",
        "--group_folds", "3",
        "--pixel.quality_folds", "3",  # the pixel head's out-of-fold weights (the demo's setting; smoke: off)
    ]  # fmt: skip


def trained_run(tmp_path_factory) -> Path:
    """Fixture data + one stage run, built once per test session (shared with tests/test_cli.py)."""
    root = tmp_path_factory.getbasetemp() / "sqa_e2e"
    out = root / "sqa"
    if not is_done(out):
        if not (root / "sqed" / TABLE).is_file():
            root.mkdir(exist_ok=True)
            make_fake_sqed(root)
        torch.set_num_threads(1)
        _stage_main()(stage_args(root, out))
    return root


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def test_stage_writes_the_whole_comparison(run_root):
    out = run_root / "sqa"
    s = read_summary(out)
    assert set(s["test"]) >= {"srcc", "plcc", "krcc", "rmse"}
    assert set(s["baselines"]) == {"msp", "entropy", "margin", "atc", "agreement", "consensus", "image_only", "seg_only",
                                   "generic_clip", "no_gating", "with_agreement", "with_agreement_ranking", "error_map"}  # fmt: skip
    for name, m in s["baselines"].items():
        assert set(m) >= {"srcc", "plcc", "krcc", "rmse"}, name
        assert m["rmse"] is not None and 0 <= m["rmse"] <= 1, name
    assert set(s["recommend"]) >= {"top1", "regret", "chosen_oa", "best_fixed_oa", "oracle_oa"}
    r = s["recommend"]
    assert r["regret"] == pytest.approx(r["oracle_oa"] - r["chosen_oa"])
    assert r["chosen_oa"] <= r["oracle_oa"] + 1e-12 and r["best_fixed_oa"] <= r["oracle_oa"] + 1e-12
    assert r["n_images"] == 2 * 3  # 3 test images per source
    assert set(s["test_per_source"]) == set(SOURCES) and set(s["test_per_method"]) == set(METHODS)
    assert s["n_rows"] == {"train": 2 * 6 * 3, "val": 2 * 3 * 3, "test": 2 * 3 * 3}
    for fig in ("scatter_test.png", "clip_embedding.png", "comparison.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    # the loss terms once an epoch (their means over the epoch's rows), beside each validation
    with open(out / "logs" / "rs_sqa" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    train = [r for r in logged if r.get("train_loss")]
    assert [int(r["epoch"]) for r in train] == list(range(len(train))) and len(train) >= 2
    assert all(float(r["train_loss"]) >= 0 and r.get("train_mse") for r in train)
    assert (out / "scorer" / "scorer.json").is_file()
    head = s["recommend_headroom"]
    assert set(head["within_image_error"]) == {"rs_sqa", "image_only", "seg_only", "generic_clip", "no_gating", "with_agreement",
                                               "with_agreement_ranking"}  # fmt: skip
    assert 0 <= r["top1"] <= r["top1_within"] <= 1
    assert set(s["vs_rs_sqa"]) == set(s["baselines"])
    for name, v in s["vs_rs_sqa"].items():
        assert v["srcc"]["diff"] == pytest.approx(s["test"]["srcc"] - s["baselines"][name]["srcc"], abs=1e-5), name
        assert v["srcc"]["low"] <= v["srcc"]["high"], name
        assert v["srcc"]["verdict"] == ("ahead" if v["srcc"]["low"] > 0 else "behind" if v["srcc"]["high"] < 0 else "tie")
    # RS-SQA with agreement: trained, compared with every other score, exported beside the paper's head
    assert set(s["vs_with_agreement"]) == {"rs_sqa", *s["baselines"]} - {"with_agreement"}
    agree = s["vs_with_agreement"]["consensus"]["srcc"]
    assert agree["diff"] == pytest.approx(s["baselines"]["with_agreement"]["srcc"] - s["baselines"]["consensus"]["srcc"], abs=1e-5)
    assert (out / "scorer" / "scorer_agreement.safetensors").is_file()
    config = json.loads((out / "scorer" / "scorer.json").read_text())
    assert config["agreement_model"]["agreement"] is True and config["ranking_model"]["agreement"] is True
    # the smoke profile's agreement_overrides reach both agreement heads, and their exported arguments
    assert s["agreement_hparams"] == {"agreement_skip": True, "variant": "seg_only", "agreement": True}
    assert s["ranking_hparams"] == {"agreement_skip": True, "variant": "full", "w_rank_image": 4.0, "w_list": 2.0, "agreement": True}
    assert config["agreement_model"]["agreement_skip"] is True and config["ranking_model"]["agreement_skip"] is True
    # the agreement model reads no CLIP-RS branch, the ranking model does (their variants in the profile)
    assert config["agreement_model"]["variant"] == "seg_only" and config["ranking_model"]["variant"] == "full"
    # each exported head's predicted OA with its interval: offsets from the val rows, in the scorer under the
    # head's key, and how they did on the test rows (recomputed here from the test predictions)
    iv, preds = s["intervals"], json.loads((out / "predictions.json").read_text())
    oa = np.array([row["oa"] for row in preds["rows"]])
    assert set(iv) == {"rs_sqa", "with_agreement", "with_agreement_ranking"}
    for name, key in (("rs_sqa", "model"), ("with_agreement", "agreement_model"), ("with_agreement_ranking", "ranking_model")):
        assert config["intervals"][key] == {k: v for k, v in iv[name].items() if k != "test"}, name
        assert iv[name]["level"] == 0.9 and sum(iv[name]["n"]) == s["n_rows"]["val"], name
        got = intervals.coverage(np.array(preds["scores"][name]), oa, config["intervals"][key])
        assert got == pytest.approx(iv[name]["test"], abs=1e-5) and got["n"] == s["n_rows"]["test"], name
    loso = s["leave_one_source_out"]
    assert set(loso) == set(SOURCES)
    for held, fold in loso.items():
        assert fold["n_images"] == 3, held  # the held-out source's test images only
        assert set(fold) >= {"rs_sqa", "with_agreement", "consensus", "agreement", "msp", "atc", "best_label_free"}
        assert fold["best_label_free"] != "consensus" and -1 <= fold["rs_sqa"]["srcc"] <= 1
        v = fold["with_agreement"]["vs_consensus"]
        assert v["diff"] == pytest.approx(fold["with_agreement"]["srcc"] - fold["consensus"]["srcc"], abs=1e-5)
        assert v["verdict"] == ("ahead" if v["low"] > 0 else "behind" if v["high"] < 0 else "tie")
    assert set(s["loso_above_consensus"]) == set(s["loso_ahead_of_consensus"]) == {"rs_sqa", "with_agreement"}
    assert all(s["loso_ahead_of_consensus"][m] <= s["loso_above_consensus"][m] for m in ("rs_sqa", "with_agreement"))
    assert (out / "checkpoints" / "loso_alpha_with_agreement" / "best.ckpt").is_file()
    # cross-validation over the split groups (here each image is its own group): every non-seg image tested once
    cv = s["group_folds"]
    assert cv["k"] == 3 and cv["pooled"]["n_images"] == 2 * 12 and sum(f["n_images"] for f in cv["folds"]) == 2 * 12
    # the error map's OA out of fold too: a pixel head trained per fold, compared like the models
    assert set(cv["pooled"]["vs_consensus"]) == {"rs_sqa", "with_agreement", "with_agreement_ranking", "error_map"}
    assert cv["pooled"]["models"][-1] == "error_map" and all("error_map" in f["scores"] for f in cv["folds"])
    v = cv["pooled"]["recommend"]["error_map"]["vs_best_fixed"]
    assert v["diff"] == pytest.approx(cv["pooled"]["recommend"]["error_map"]["chosen_oa"] - cv["pooled"]["recommend"]["error_map"]["best_fixed_oa"])
    assert cv["pooled"]["recommender"] == "with_agreement_ranking"
    # the models' intervals, each fold's from its own val rows, tried on its test rows and pooled
    assert set(cv["pooled"]["intervals"]) == {"rs_sqa", "with_agreement", "with_agreement_ranking"}
    for name, got in cv["pooled"]["intervals"].items():
        folds = [f["scores"][name]["interval"] for f in cv["folds"]]
        assert got["n"] == cv["pooled"]["n_rows"] == sum(f["n"] for f in folds), name
        assert got["coverage"] == pytest.approx(sum(f["coverage"] * f["n"] for f in folds) / got["n"]), name
    assert (out / "checkpoints" / "fold2_with_agreement_ranking" / "best.ckpt").is_file()
    rec = s["recommend_baselines"]["with_agreement"]
    gap = r["oracle_oa"] - r["best_fixed_oa"]
    if gap > 0:
        assert rec["gap_closed"] == pytest.approx((rec["chosen_oa"] - r["best_fixed_oa"]) / gap)
    else:  # the best fixed method is the oracle on this tiny test set: nothing to close
        assert rec["gap_closed"] is None
    # how sure each choice is: the chosen minus the best fixed method's OA, averaged over the test images
    for v in (s["recommend"]["vs_best_fixed"], rec["vs_best_fixed"], s["recommend_baselines"]["error_map"]["vs_best_fixed"]):
        assert v["low"] <= v["high"] and v["verdict"] == ("ahead" if v["low"] > 0 else "behind" if v["high"] < 0 else "tie")
    assert rec["vs_best_fixed"]["diff"] == pytest.approx(rec["chosen_oa"] - r["best_fixed_oa"])
    # what rssqa recommend does: rank by the recommender only where val says ahead of the best fixed method
    pol = s["recommend_policy"]
    assert pol["model"] == "with_agreement_ranking" and pol["method"] == r["best_fixed_method"]
    assert pol["policy"] == ("model" if pol["val"]["vs_best_fixed"]["verdict"] == "ahead" else "fixed")
    if pol["policy"] == "model":
        assert pol["test"]["chosen_oa"] == pytest.approx(s["recommend_baselines"]["with_agreement_ranking"]["chosen_oa"])
    else:
        assert pol["test"]["chosen_oa"] == pytest.approx(r["best_fixed_oa"]) and pol["test"]["vs_best_fixed"]["diff"] == 0
    assert config["recommend_policy"] == {"policy": pol["policy"], "model": pol["model"], "method": pol["method"],
                                          "val_vs_best_fixed": pol["val"]["vs_best_fixed"]}  # fmt: skip
    # and each group fold decides the same way on its own val split
    cvp = cv["pooled"]["policy"]
    assert len(cvp["per_fold"]) == 3 and set(cvp["per_fold"]) <= {"model", "fixed"}
    assert [f["policy"] for f in cv["folds"]] == cvp["per_fold"]
    if set(cvp["per_fold"]) == {"fixed"}:
        assert cvp["chosen_oa"] == pytest.approx(cvp["best_fixed_oa"])
    if set(cvp["per_fold"]) == {"model"}:
        assert cvp["chosen_oa"] == pytest.approx(cv["pooled"]["recommend"]["with_agreement_ranking"]["chosen_oa"])


def test_scorer_holds_the_averaged_weights(run_root):
    """With ema_decay (0.9 in the smoke config) validation, the best checkpoint and the scorer all
    hold the moving average of the weights, not the last raw step."""
    from safetensors.torch import load_file

    out = run_root / "sqa"
    ckpt = torch.load(out / "checkpoints" / "rs_sqa" / "best.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt  # the raw weights, kept beside the average
    exported = load_file(str(out / "scorer" / "scorer.safetensors"))
    averaged = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    raw = {k.removeprefix("model."): v for k, v in ckpt["current_model_state"].items()}
    assert set(exported) == set(averaged)
    assert all(torch.equal(exported[k], averaged[k]) for k in exported)
    assert not all(torch.equal(exported[k], raw[k]) for k in exported)


def test_ema_decay_must_be_a_fraction():
    from rssqa.tasks.sqa import SQATask

    with pytest.raises(RSSQAError, match="ema_decay"):
        SQATask(ema_decay=1.0)


def test_baselines_in_summary_are_recomputable(run_root):
    """The msp row of the table equals metrics recomputed from predictions.json."""
    from rssqa import metrics

    out = run_root / "sqa"
    preds = json.loads((out / "predictions.json").read_text())
    oa = [r["oa"] for r in preds["rows"]]
    s = read_summary(out)
    for name in ("msp", "rs_sqa"):
        got = s["test"] if name == "rs_sqa" else s["baselines"][name]
        assert got["srcc"] == pytest.approx(metrics.srcc(preds["scores"][name], oa), abs=1e-4)
        assert got["rmse"] == pytest.approx(metrics.rmse(preds["scores"][name], oa), abs=1e-4)


def test_rerun_is_a_no_op(run_root, capsys):
    out = run_root / "sqa"
    before = (out / "summary.json").stat().st_mtime_ns
    assert _stage_main()(stage_args(run_root, out)) is None
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_same_seed_same_numbers(run_root, tmp_path):
    """A second run from scratch (no cache), its heads trained by two worker processes instead of this
    one, reproduces the first run's figures exactly: RS-SQA, the agreement models, leave-one-source-out."""
    torch.set_num_threads(1)
    args = [*stage_args(run_root, tmp_path / "again"), "--ablations", "[]", "--pixel.enabled", "false", "--fit_workers", "2"]
    summary = _stage_main()(args)
    first = read_summary(run_root / "sqa")
    assert summary["test"]["srcc"] == first["test"]["srcc"]
    assert summary["recommend"]["top1"] == first["recommend"]["top1"]
    for name in ("with_agreement", "with_agreement_ranking"):
        assert summary["baselines"][name] == first["baselines"][name], name
    assert summary["leave_one_source_out"] == first["leave_one_source_out"]
    assert (tmp_path / "again" / "checkpoints" / "loso_beta_rs_sqa" / "best.ckpt").is_file()
    assert (tmp_path / "again" / "config.yaml").is_file()
    # the pixel error head switched off: none in the summary, none in the scorer
    assert summary["pixel_error"] is None and not (tmp_path / "again" / "scorer" / "scorer_pixel.safetensors").exists()


def test_fold_pixel_heads_in_the_fit_workers_give_what_this_process_gives(run_root, tmp_path, monkeypatch):
    """The group folds' pixel error heads are queued to the fit workers (Fits.call): with the same thread
    count a worker's error map is this process's to the last bit, forked (the workers start with this
    process's data module) or spawned (each builds its own), and the data module is left as it was."""
    from rssqa.processes import START_METHOD_ENV
    from rssqa.tasks.sqa import SQADataModule
    from rssqa.tasks.sqa.fits import Fits, TrainerRecipe
    from rssqa.tasks.sqa.folds import fold_splits
    from rssqa.tasks.sqa.pixel import PixelConfig
    from rssqa.tasks.sqa.run import fold_error_map

    torch.set_num_threads(1)
    dm = SQADataModule(str(run_root / "sqed"), str(run_root / "clip_rs"), cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    before = dm.split_of.copy()
    split = fold_splits(dm, 3)[1]
    rng = np.random.default_rng(0)  # stand-in predicted OA of the fold's recommender: the agreement's weights
    quality = {s: {(int(dm.image_idx[r]), str(dm.method_of[r])): float(rng.uniform()) for r in np.flatnonzero(split == s)}
               for s in ("val", "test")}  # fmt: skip
    pixel = PixelConfig(epochs=1, hidden=8, pixels_per_row=64)
    got = {}
    for workers, start in ((1, None), (2, "fork"), (2, "spawn")):
        monkeypatch.setenv(START_METHOD_ENV, start or "")
        with Fits(dm, TrainerRecipe(str(tmp_path / f"w{workers}{start}"), wandb=False), workers, threads=1) as fits:
            fits.call("pixel_fold1", fold_error_map, split, pixel, 0, quality)
            with pytest.raises(RSSQAError, match="two fits named 'pixel_fold1'"):
                fits.call("pixel_fold1", fold_error_map, split, pixel, 0, quality)
            got[start] = fits.call_result("pixel_fold1")["error_map"]
            assert fits.call_result("pixel_fold1")["error_map"] is got[start]  # asked again: run once
            with pytest.raises(RSSQAError, match="no work named 'pixel_fold2'"):
                fits.call_result("pixel_fold2")
    assert len(got[None]) == int((split == "test").sum()) and np.all((got[None] >= 0) & (got[None] <= 1))
    np.testing.assert_array_equal(got[None], got["fork"])
    np.testing.assert_array_equal(got[None], got["spawn"])
    np.testing.assert_array_equal(dm.split_of, before)


def test_datamodule_batches_whole_images(run_root):
    from rssqa.tasks.sqa import SQADataModule

    dm = SQADataModule(str(run_root / "sqed"), str(run_root / "clip_rs"), images_per_batch=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    for b in batches:
        imgs, counts = torch.unique(b["image_idx"], return_counts=True)
        assert len(imgs) <= 2 and torch.all(counts == len(METHODS))
    assert sum(len(b["oa"]) for b in batches) == len(dm.rows("train"))
    again = [b["row"] for b in loader]
    assert not all(torch.equal(a, b["row"]) for a, b in zip(again, batches, strict=True))  # reshuffled per epoch
    assert dm.dims["embed_dim"] == 128 and dm.dims["grid"] == GRID
    # each image's CLIP features are its own (sources are encoded in groups, then put back in order)
    from rssqa.tasks.sqa import clip_features_for

    for row in (0, len(dm.sqed.rows) - 1):
        alone = clip_features_for(run_root / "clip_rs", [dm.sqed.image(row)[None]], dm.hparams.clip_chunk)
        assert torch.equal(alone["embed"][0], dm.sem["clip_rs"]["embed"][dm.image_idx[row]])


def test_networks_without_training_rows_get_no_adapter(run_root):
    """A held-out source's methods are networks no per-method adapter was trained on: the shared path alone."""
    from rssqa.tasks.sqa import SQADataModule
    from rssqa.tasks.sqa.loso import held_out_splits

    dm = SQADataModule(str(run_root / "sqed"), str(run_root / "clip_rs"))
    dm.setup("fit")
    rows = torch.arange(len(dm.split_of))
    assert torch.equal(dm.adapter_index(rows), dm.method_idx)  # every network has train rows
    original = dm.split_of
    dm.split_of = held_out_splits(dm)["alpha"]
    held = torch.from_numpy(dm.source_of == "alpha")
    idx = dm.adapter_index(rows)
    assert (idx[held] == -1).all() and torch.equal(idx[~held], dm.method_idx[~held])
    assert torch.equal(dm.batch(rows[held][:3])["method_idx"], torch.full((3,), -1))
    dm.split_of = original
    assert torch.equal(dm.adapter_index(rows), dm.method_idx)


def test_missing_inputs_are_one_line_errors(run_root, tmp_path):
    from rssqa.tasks.sqa import SQADataModule

    with pytest.raises(RSSQAError, match="table.csv: RS-SQED table not found"):
        SQADataModule(str(tmp_path), str(run_root / "clip_rs")).setup("fit")
    with pytest.raises(RSSQAError, match="CLIP model folder not found"):
        SQADataModule(str(run_root / "sqed"), str(tmp_path / "nope")).setup("fit")
    with pytest.raises(RSSQAError, match="ablations"):
        _stage_main()([*stage_args(run_root, tmp_path / "x"), "--ablations", "[bogus]"])


def test_stage_on_a_real_sqed_build(tiny_world, tmp_path):
    """Upstream for real: the sqed stage on the tiny world, then this stage and the CLI on a source file."""
    from rssqa.cli import main as cli
    from rssqa.models.clip import create_clip, export_clip
    from rssqa.tasks.sqed import LabelConfig, SourceConfig, SQEDConfig, TrainConfig, build_sqed

    torch.set_num_threads(1)
    cfg = SQEDConfig(
        sources=[SourceConfig("vaihingen", str(tiny_world / "sources" / "vaihingen")),
                 SourceConfig("loveda", str(tiny_world / "sources" / "loveda"))],
        methods=["pspnet", "fpn"],
        splits={"seg": 0.25, "train": 0.25, "val": 0.25, "test": 0.25},
        on_bad="skip", train=TrainConfig(epochs=1, batch_size=8), label=LabelConfig(grid=4, hist_bins=10), wandb="disabled",
    )  # fmt: skip
    build_sqed(cfg, tmp_path / "sqed")
    torch.manual_seed(0)
    model, *_ = create_clip("rs-tiny", force_image_size=32)  # the tiny world's tiles are 32 px
    export_clip(model, "rs-tiny", tmp_path / "clip_rs")
    args = [*stage_args(tmp_path, tmp_path / "sqa"), "--data.generic_clip", "null", "--ablations", "[seg_only]"]
    summary = _stage_main()(args)
    assert summary["baselines"]["generic_clip"] is None and summary["baselines"]["seg_only"] is not None
    # two methods: the pixel error head reads each method's own softmax only, no disagreement baseline
    px = summary["pixel_error"]
    assert px["agreement"] is False and px["model"]["agreement"] is False and px["baselines"]["disagreement"] is None
    assert px["quality_weighted"] is False and "quality_power" not in px["model"]  # no agreement, nothing to weigh
    assert 0 <= px["auroc"] <= 1 and px["best_baseline"] in ("max_prob", "entropy")
    assert summary["recommend"]["n_images"] == summary["n_rows"]["test"] // 2
    tile = sorted((tiny_world / "sources" / "vaihingen" / "top").glob("*.tif"))[0]
    assert cli(["recommend", str(tile), "--scorer", str(tmp_path / "sqa" / "scorer"), "--source", "vaihingen"]) == 0
