"""Real pixels: the Dubai aerial set through the dubai profile's ``folder`` source, then a tiny sqed + sqa on it.

The set is found through ``RSSQA_REAL_DATA`` (default ``<repo>/../shared/data/dubai-aerial``, the folder
holding ``images/tileN_00K.jpg`` and ``masks/tileN_00K.png``); without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rssqa.data.segsets import IGNORE_INDEX, build_source
from rssqa.data.segsets.source import resampled_size
from rssqa.data.sqed import TABLE, read_table
from rssqa.runs import read_summary
from tests.tasks.test_sqed import dry_run_plan

ROOT = Path(__file__).resolve().parents[2]
REAL = Path(
    os.environ.get("RSSQA_REAL_DATA") or ROOT.parent / "shared" / "data" / "dubai-aerial"
).expanduser()
CLASSES = ("building", "land", "road", "vegetation", "water")  # "unlabeled" goes to the ignore index
NO_LABEL = ((0, 0, 0), (155, 155, 155))

needs_real = pytest.mark.skipif(
    not (REAL / "images").is_dir() or not (REAL / "masks").is_dir(),
    reason=f"real imagery not found at {REAL}: put the Dubai aerial set there (images/tileN_00K.jpg, "
    "masks/tileN_00K.png) or set RSSQA_REAL_DATA to its folder",
)


def profile_source() -> dict:
    """The one source of conf/dubai/sqed.yaml: ``{"name", "root", "layout", "options"}``."""
    cfg = yaml.safe_load((ROOT / "conf" / "dubai" / "sqed.yaml").read_text())
    (source,) = cfg["sqed"]["sources"]
    return source


def open_real(**overrides):
    """The profile's source over the real files, with some options replaced."""
    s = profile_source()
    return build_source(s["layout"], REAL / s["root"], name=s["name"], **{**s["options"], **overrides})


def test_profile_config_parses_and_plans(tmp_path, capsys):
    """conf/dubai/sqed.yaml through the stage's own entry point, as make runs it (a dry run: no data read)."""
    plan = dry_run_plan("dubai", tmp_path, capsys)
    assert len(plan["methods"]) == 8 and plan["sources"] == {
        "dubai": {"layout": "folder", "root": str(tmp_path), "exists": True}
    }
    assert profile_source()["options"]["ignore_classes"] == ["unlabeled"]


@needs_real
def test_profile_reads_real_files_as_its_config_says():
    """Six parts of three areas (two of them palette-mode mask PNGs) through the profile's options."""
    src = open_real(image_glob="tile[346]_00[56].jpg")
    ids = sorted({s.pair.image_id for s in src.samples})
    assert ids == ["tile3_005", "tile3_006", "tile4_005", "tile4_006", "tile6_005", "tile6_006"]
    assert src.classes == CLASSES and src.read_options() == {"resample": 0.25}
    assert all(s.group == s.pair.image_id.split("_")[0] for s in src.samples)  # split groups = areas
    assert all(s.window[2:] == (128, 128) for s in src.samples)
    good = src.check()
    assert good == list(range(len(src))) and not src.bad
    counts = np.zeros(256, np.int64)
    for i in good:
        image, mask = src.read(i)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and mask.shape == (128, 128)
        counts += np.bincount(mask.ravel(), minlength=256)
    assert (
        counts[len(CLASSES) : IGNORE_INDEX].sum() == 0
        and counts[IGNORE_INDEX:].sum() == counts[IGNORE_INDEX] > 0
    )
    shares = counts[: len(CLASSES)] / counts[: len(CLASSES)].sum()
    assert (shares > 0.001).all() and shares.sum() == pytest.approx(1.0)  # every class present
    assert shares.argmax() == CLASSES.index("water")  # these parts are mostly sea (areas 3 and 6)


# tile3_006: black and "unlabeled" pixels; tile4_005: a palette-mode PNG without either; tile6_005: black ones
@needs_real
@pytest.mark.parametrize(
    ("part", "has_no_label"), [("tile3_006", True), ("tile4_005", False), ("tile6_005", True)]
)
def test_real_masks_decode_and_resample(part, has_no_label):
    """Ignore pixels are exactly the black and the "unlabeled" ones; a quarter size is round(side / 4)."""
    raw = np.asarray(Image.open(REAL / "masks" / f"{part}.png").convert("RGB"))
    full = open_real(image_glob=f"{part}.jpg", scale=None, patch_size=None)
    image, mask = full.read(0)
    assert image.shape[:2] == mask.shape == raw.shape[:2]
    no_label = np.zeros(raw.shape[:2], bool)
    for colour in NO_LABEL:
        no_label |= (raw == colour).all(-1)
    assert no_label.any() == has_no_label and np.array_equal(mask == IGNORE_INDEX, no_label)
    quarter = open_real(image_glob=f"{part}.jpg", patch_size=None)
    q_image, q_mask = quarter.read(0)
    h, w = raw.shape[:2]
    assert (
        q_image.shape
        == (resampled_size(h, 0.25), resampled_size(w, 0.25), 3)
        == (int(h / 4 + 0.5), int(w / 4 + 0.5), 3)
    )
    expected = np.asarray(Image.fromarray(mask).resize(q_mask.shape[::-1], Image.Resampling.NEAREST))
    assert np.array_equal(q_mask, expected)
    # bilinear with antialiasing: the quarter image's mean colour is the full image's
    assert np.abs(q_image.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0)).max() < 2.0


def _sqa_main():
    spec = importlib.util.spec_from_file_location("sqa_stage", ROOT / "stages" / "sqa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@needs_real
def test_tiny_sqed_and_sqa_on_real_patches(tmp_path, capsys):
    """One part of each of four areas, 64 px patches, two methods, one epoch; then sqa with the profile's
    config (two epochs) on two tiny rs-tiny CLIPs taking 64 px. Every split holds whole areas. About 10 s."""
    from rssqa.models.clip import create_clip, export_clip
    from rssqa.tasks.sqed import LabelConfig, SourceConfig, SQEDConfig, TrainConfig, build_sqed

    s = profile_source()
    options = {**s["options"], "image_glob": "tile[1346]_001.jpg", "patch_size": 64}
    cfg = SQEDConfig(
        sources=[SourceConfig(s["name"], s["root"], s["layout"], options)],
        methods=["pspnet", "linknet"],
        splits={"seg": 0.25, "train": 0.25, "val": 0.25, "test": 0.25},
        on_bad="skip",
        train=TrainConfig(epochs=1, batch_size=8),
        label=LabelConfig(grid=4, hist_bins=10, batch_size=32),
        wandb="disabled",
        threads=1,
    )
    sqed = tmp_path / "sqed"
    summary = build_sqed(
        cfg, sqed, data_root=REAL
    )  # the root "." resolves against the data root, as make does
    assert summary["n_methods"] == 2 and summary["n_rows"] == 2 * summary["n_images"]

    rows = read_table(sqed / TABLE)
    split_of: dict[str, set[str]] = {}
    for r in rows:
        assert r["group"] == r["image_id"].split("_")[0]
        split_of.setdefault(r["group"], set()).add(r["split"])
    seg_ids = json.loads((sqed / "splits.json").read_text())["_seg"]["dubai"]
    seg_areas = {i.split("_")[0] for i in seg_ids}
    assert all(len(v) == 1 for v in split_of.values())  # an area sits in one split
    assert len(seg_areas) == 1 and not seg_areas & set(split_of)
    per_split = {sp: sorted(g for g, v in split_of.items() if sp in v) for sp in ("train", "val", "test")}
    assert all(len(v) == 1 for v in per_split.values()), per_split

    for name, seed in (("clip_rs", 1), ("clip_raw", 2)):
        torch.manual_seed(seed)
        model, *_ = create_clip("rs-tiny", force_image_size=64)  # the patch size
        export_clip(model, "rs-tiny", tmp_path / name)
    args = [
        "--config", str(ROOT / "conf" / "dubai" / "sqa.yaml"),
        "--out", str(tmp_path / "sqa"),
        "--data.sqed", str(sqed),
        "--data.clip", str(tmp_path / "clip_rs"),
        "--data.generic_clip", str(tmp_path / "clip_raw"),
        "--trainer.max_epochs", "2",
        "--threads", "1",
        "--wandb", "false",
        "--group_folds", "3",  # the profile's 5 folds need 5 areas outside the seg split; these patches have 3
    ]  # fmt: skip
    _sqa_main()(args)
    a = read_summary(tmp_path / "sqa")
    n_test = sum(1 for r in rows if r["split"] == "test" and r["method"] == "pspnet")
    assert a["test"]["n_rows"] == 2 * n_test and a["recommend"]["n_images"] == n_test
    assert np.isfinite(a["test"]["srcc"])
    assert set(a["baselines"]) >= {"msp", "entropy", "image_only", "generic_clip"}
    # cross-validation over the areas: each of the three non-seg areas is the test split once
    cv = a["group_folds"]
    assert sorted(g for f in cv["folds"] for g in f["groups"]) == sorted(f"dubai/{g}" for v in per_split.values() for g in v)
    assert cv["pooled"]["n_images"] == sum(1 for r in rows if r["split"] != "seg" and r["method"] == "pspnet")

    # a file of the set, scored by its path: read as the source read it (the profile's scale), as the scorer records
    from rssqa.cli import main as rssqa_main
    from rssqa.data.segsets import read_image, resample_by

    scorer_dir = tmp_path / "sqa" / "scorer"
    assert json.loads((scorer_dir / "scorer.json").read_text())["read"] == {"dubai": {"scale": s["options"]["scale"]}}
    file = REAL / "images" / f"{per_split['test'][0]}_001.jpg"
    quarter = tmp_path / "quarter.png"
    Image.fromarray(resample_by(read_image(file), s["options"]["scale"])).save(quarter)
    scores, _ = [], capsys.readouterr()  # (the stages' own output so far)
    for path, extra in ((file, []), (quarter, ["--scale", "1"])):
        assert rssqa_main(["score", str(path), "--scorer", str(scorer_dir), "--method", "pspnet", "--json", *extra]) == 0
        scores.append(json.loads(capsys.readouterr().out)[0]["score"])
    assert scores[0] == scores[1]

    # the test area's whole images, as the source reads them, scored as scenes against their masks
    spec = importlib.util.spec_from_file_location("scenes_stage", ROOT / "stages" / "scenes.py")
    scenes_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenes_stage)
    scenes_args = ["--scorer", str(tmp_path / "sqa" / "scorer"), "--sqed", str(sqed), "--data", str(REAL), "--out", str(tmp_path / "scenes")]
    assert scenes_stage.main(scenes_args) == 0
    sc = read_summary(tmp_path / "scenes")
    assert sc["inputs"]["scenes"] == len(sc["scenes"]) == 1 and sc["inputs"]["split"] == "test"
    (scene,) = sc["scenes"]
    assert scene["id"] == f"{per_split['test'][0]}_001" and 0 <= scene["evaluation"]["fused_oa"] <= 1
    assert (tmp_path / "scenes" / scene["folder"] / "fused.tif").is_file()

    # the report of a profile without world, purify and pretrain: its stages, and the CLIP it used
    from rssqa.report import build_report

    md = build_report(tmp_path.parent, tmp_path.name, wandb=False).read_text()
    assert "Stages finished: sqed, sqa, scenes." in md and "Not run in this profile: world, purify, pretrain." in md
    assert "The whole images of RS-SQED's test split" in md and "## Cross-validation over areas" in md
    assert str(tmp_path / "clip_rs") in md and "## RS-SQED" in md and "## Method recommendation" in md
