"""Stage sqed: OA, splits, label shards, the table, and the whole build on the tiny world (resume and ranks
included)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rssqa.data.segsets import IGNORE_INDEX, build_source
from rssqa.data.sqed import (
    SQED,
    TABLE,
    TABLE_COLUMNS,
    assign_splits,
    oa_summary,
    read_label_shard,
    read_shard_meta,
    read_table,
    split_counts,
    winners,
    write_label_shard,
    write_table,
)
from rssqa.errors import RSSQAError
from rssqa.runs import read_summary
from rssqa.tasks import sqed as sqed_task
from rssqa.tasks.sqed import (
    LabelConfig,
    Ranks,
    SourceConfig,
    SQEDConfig,
    TrainConfig,
    assign_units,
    build_sqed,
    load_segmenter,
    per_image_oa,
    random_dihedral,
)
from tests.conftest import stage_env

ROOT = Path(__file__).resolve().parents[2]
DESIGN_KEYS = ("n_images", "n_methods", "n_rows", "oa_mean", "oa_std", "per_method_oa", "best_method_share")


# --------------------------------------------------------------------------------------------- OA
def test_per_image_oa_excludes_the_ignore_index():
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]], [[IGNORE_INDEX] * 2] * 2, [[1, 1], [1, 1]]])
    pred = torch.tensor([[[0, 1], [0, 2]], [[0, 0], [0, 0]], [[1, 0], [1, 1]]])
    oa, n = per_image_oa(pred, target, num_classes=3)
    assert n.tolist() == [3, 0, 4]
    assert oa[0].item() == pytest.approx(2 / 3) and torch.isnan(oa[1]) and oa[2].item() == pytest.approx(0.75)


def test_per_image_oa_matches_a_direct_count():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (5, 9, 7), generator=g)
    target[torch.rand(5, 9, 7, generator=g) < 0.3] = IGNORE_INDEX
    pred = torch.randint(0, 4, (5, 9, 7), generator=g)
    oa, _ = per_image_oa(pred, target, 4)
    for i in range(5):
        valid = target[i] != IGNORE_INDEX
        assert oa[i].item() == pytest.approx(
            ((pred[i] == target[i]) & valid).sum().item() / valid.sum().item()
        )


def test_random_dihedral_moves_masks_with_images():
    torch.manual_seed(0)
    masks = torch.randint(0, 5, (16, 8, 8))
    images = masks[:, None].float().expand(-1, 3, -1, -1) / 255
    xs, ys = random_dihedral(images, masks)
    assert torch.equal((xs[:, 0] * 255).round().long(), ys)
    assert not torch.equal(ys, masks)  # something moved
    rect = torch.randint(0, 5, (8, 4, 6))
    xr, yr = random_dihedral(rect[:, None].float().expand(-1, 3, -1, -1), rect)
    assert yr.shape == rect.shape and torch.equal(xr[:, 0].long(), yr)


# ----------------------------------------------------------------------------------------- splits
def test_split_counts_largest_remainder():
    assert split_counts(10, [0.4, 0.36, 0.12, 0.12]) == [4, 4, 1, 1]
    assert sum(split_counts(97, [0.4, 0.36, 0.12, 0.12])) == 97
    assert split_counts(0, [0.5, 0.5]) == [0, 0]


def test_assign_splits_stratified_seeded_order_free():
    groups = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(20)]}
    fr = {"seg": 0.4, "train": 0.36, "val": 0.12, "test": 0.12}
    s1 = assign_splits(groups, fr, seed=3)
    s2 = assign_splits({"b": groups["b"][::-1], "a": groups["a"][::-1]}, fr, seed=3)
    assert s1 == s2
    for src, gs in groups.items():
        counts = [list(s1[src].values()).count(k) for k in fr]
        assert counts == split_counts(len(gs), list(fr.values()))
    assert s1 != assign_splits(groups, fr, seed=4)
    # a source's assignment does not depend on the other sources
    assert assign_splits({"a": groups["a"]}, fr, seed=3)["a"] == s1["a"]
    with pytest.raises(RSSQAError, match="sum to 1"):
        assign_splits(groups, {"seg": 0.5, "train": 0.6}, 0)


# ---------------------------------------------------------------------------------- shards / table
def test_label_shard_round_trip(tmp_path):
    arrays = {
        "oa": np.array([0.5, 0.25]),
        "n_labelled": np.array([10, 20]),
        "maps": np.random.default_rng(0).random((2, 3, 2, 2)),
        "feat/encoder": np.ones((2, 4, 2, 2)),
    }
    nbytes = write_label_shard(
        tmp_path / "s.safetensors", arrays, {"image_ids": ["x", "y"], "fingerprint": "f"}
    )
    assert nbytes == (tmp_path / "s.safetensors").stat().st_size
    back, meta = read_label_shard(tmp_path / "s.safetensors")
    assert (
        meta == {"image_ids": ["x", "y"], "fingerprint": "f"} == read_shard_meta(tmp_path / "s.safetensors")
    )
    np.testing.assert_array_equal(back["oa"], arrays["oa"].astype(np.float32))
    assert back["n_labelled"].dtype == np.int64
    np.testing.assert_allclose(back["maps"], arrays["maps"], atol=1e-3)  # stored as float16
    with pytest.raises(RSSQAError, match="disagree on the number of images"):
        write_label_shard(tmp_path / "t.safetensors", {"a": np.zeros(2), "b": np.zeros(3)}, {})
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(RSSQAError, match=r"torn\.safetensors: not a readable label shard"):
        read_shard_meta(tmp_path / "torn.safetensors")


def _row(key, method, oa, split="train"):
    src, image = key.split("/")
    return {"key": key, "image_id": image, "source": src, "method": method, "oa": oa, "split": split, "group": image,
            "n_labelled": 4, "msp": 0.5, "entropy": 0.5, "margin": 0.5, "feature_file": "f", "feature_row": 0,
            "image_file": "i", "image_row": 0}  # fmt: skip


def test_table_round_trip_and_errors(tmp_path):
    rows = [_row("s/1", "a", 0.125), _row("s/1", "b", 0.5)]
    write_table(tmp_path / TABLE, rows)
    assert read_table(tmp_path / TABLE) == rows
    (tmp_path / "bad.csv").write_text("key,oa\n")
    with pytest.raises(RSSQAError, match=r"bad\.csv: columns .* missing"):
        read_table(tmp_path / "bad.csv")
    with pytest.raises(RSSQAError, match="not found; run the sqed stage"):
        read_table(tmp_path / "none.csv")


def test_summary_on_known_rows():
    rows = [
        _row("s/1", "a", 0.9), _row("s/1", "b", 0.5),
        _row("s/2", "a", 0.4), _row("s/2", "b", 0.6, "test"),
        _row("t/1", "a", 0.7, "val"), _row("t/1", "b", 0.7, "val"),  # a tie: both are best
    ]  # fmt: skip
    rows[3]["split"] = rows[2]["split"] = "test"
    wins, n = winners(rows)
    assert n == 3 and wins == {"a": 2, "b": 2}
    s = oa_summary(rows)
    assert {k: s[k] for k in ("n_images", "n_methods", "n_rows")} == {
        "n_images": 3,
        "n_methods": 2,
        "n_rows": 6,
    }
    assert s["oa_mean"] == pytest.approx(np.mean([r["oa"] for r in rows]))
    assert s["oa_std"] == pytest.approx(np.std([r["oa"] for r in rows]))
    assert s["per_method_oa"] == pytest.approx({"a": 2.0 / 3, "b": 1.8 / 3})
    assert s["best_method_share"] == pytest.approx(2 / 3) and s["best_method"] == "a"
    assert s["n_images_per_split"] == {"train": 1, "test": 1, "val": 1}


# ---------------------------------------------------------------------------------- the whole build
def tiny_config(world: Path, **kw) -> SQEDConfig:
    """The real stage config shrunk: two sources, two fast methods, one epoch, no W&B."""
    cfg = SQEDConfig(
        sources=[
            SourceConfig("vaihingen", str(world / "sources" / "vaihingen")),
            SourceConfig("loveda", str(world / "sources" / "loveda")),
        ],
        methods=["pspnet", "linknet"],
        train=TrainConfig(epochs=2, batch_size=4),
        label=LabelConfig(grid=2, hist_bins=8, batch_size=8),
        wandb="disabled",
        threads=1,
    )
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sqed")
    summary = build_sqed(tiny_config(tiny_world), out)
    return out, summary


def test_build_writes_the_table_and_summary(built, tiny_world):
    out, summary = built
    assert read_summary(out) == json.loads(json.dumps(summary))
    for k in DESIGN_KEYS:
        assert k in summary
    rows = read_table(out / TABLE)
    keys = {r["key"] for r in rows}
    assert summary["n_rows"] == len(rows) == summary["n_images"] * 2 == len(keys) * 2
    # every image has every method, in one split only; the seg images are not in the table
    by_key: dict[str, set] = {}
    for r in rows:
        by_key.setdefault(r["key"], set()).add((r["method"], r["split"]))
    assert all(len(v) == 2 and len({s for _, s in v}) == 1 for v in by_key.values())
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    seg = json.loads((out / "splits.json").read_text())["_seg"]
    assert not any(f"{src}/{i}" in keys for src, ids in seg.items() for i in ids)
    assert summary["sources"]["vaihingen"]["n_pool"] + summary["sources"]["vaihingen"]["n_seg_train"] <= 16
    assert all(0.0 <= r["oa"] <= 1.0 for r in rows)
    assert (out / "oa_distributions.png").stat().st_size > 1000
    assert (out / "logs" / "vaihingen" / "pspnet" / "metrics.csv").is_file()
    assert summary["rows_labelled_per_s"] > 0 and summary["train_images_per_s"] > 0
    assert 0 < summary["feature_bytes_per_row"] < 50_000


def test_table_agrees_with_shards_pool_and_sources(built, tiny_world):
    out, _ = built
    db = SQED(out)
    assert db.sources == ["loveda", "vaihingen"] and db.methods == ["linknet", "pspnet"]
    src = build_source("vaihingen", tiny_world / "sources" / "vaihingen")
    by_id = {src.samples[i].image_id: i for i in range(len(src))}
    for i, r in enumerate(db.rows):
        f = db.features(i)
        assert f["oa"] == pytest.approx(r["oa"]) and f["msp"] == pytest.approx(r["msp"], rel=1e-6)
        if r["source"] == "vaihingen":
            image, mask = src.read(by_id[r["image_id"]])
            np.testing.assert_array_equal(db.image(i), image)
            assert int((mask != IGNORE_INDEX).sum()) == r["n_labelled"]
    train = db.split("train")
    assert db.gather(train, "hist_conf").shape == (len(train), 8)
    assert db.gather(train, "maps").shape == (len(train), 3, 2, 2)
    meta = db.shard("loveda", "pspnet")[1]
    assert meta["classes"][0] == "background" and meta["feature_shapes"]["maps"] == [3, 2, 2]
    assert db.pool("loveda")["classes"] == meta["classes"]


def test_checkpoint_reproduces_the_cached_labels(built):
    out, _ = built
    db = SQED(out)
    seg = load_segmenter(db.checkpoint("vaihingen", "linknet"))
    rows = [i for i, r in enumerate(db.rows) if r["source"] == "vaihingen" and r["method"] == "linknet"][:4]
    images = torch.stack([torch.from_numpy(db.image(i).copy()).permute(2, 0, 1).float() / 255 for i in rows])
    out_now = seg.describe(images)
    masks = torch.from_numpy(np.stack([db.mask(i) for i in rows])).long()
    oa, _ = per_image_oa(out_now["logits"].argmax(1), masks, seg.num_classes)
    np.testing.assert_allclose(oa.numpy(), [db.rows[i]["oa"] for i in rows], rtol=1e-6)
    cached = db.gather(rows, "feat/encoder")
    np.testing.assert_allclose(out_now["feat/encoder"].numpy(), cached, rtol=2e-3, atol=2e-3)


def test_the_seam_reads_a_checkpoint_once_per_process(built, tmp_path, monkeypatch):
    """The pixel seam keeps the methods it loaded for its next pass: the same module again without reading
    the file; a checkpoint written again since is read again; over the byte budget the oldest is let go."""
    import os
    import shutil
    from collections import OrderedDict

    from rssqa.tasks.sqa import pixel_rows

    out, _ = built
    db = SQED(out)
    ckpt = tmp_path / "linknet.ckpt"
    shutil.copy(db.checkpoint("vaihingen", "linknet"), ckpt)
    reads = []

    def counted(path, map_location):
        reads.append(Path(path).name)
        return load_segmenter(path, map_location=map_location)

    monkeypatch.setattr(pixel_rows, "load_segmenter", counted)
    monkeypatch.setattr(pixel_rows, "_loaded", OrderedDict())
    cpu = torch.device("cpu")
    first = pixel_rows.loaded_segmenter(ckpt, cpu)
    assert pixel_rows.loaded_segmenter(ckpt, cpu) is first and reads == ["linknet.ckpt"] and not first.training
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written again
    again = pixel_rows.loaded_segmenter(ckpt, cpu)
    assert again is not first and reads == ["linknet.ckpt"] * 2
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(again(x), first(x), rtol=0, atol=0)
    monkeypatch.setattr(pixel_rows, "KEEP_BYTES", 1)  # room for one model: the newest stays
    other = pixel_rows.loaded_segmenter(db.checkpoint("loveda", "pspnet"), cpu)
    assert [seg for seg, _ in pixel_rows._loaded.values()] == [other]
    pixel_rows.loaded_segmenter(ckpt, cpu)
    assert reads == ["linknet.ckpt", "linknet.ckpt", "final.ckpt", "linknet.ckpt"]
    with pytest.raises(RSSQAError, match=r"gone\.ckpt: segmenter checkpoint not found"):
        pixel_rows.loaded_segmenter(tmp_path / "gone.ckpt", cpu)


def test_load_segmenter_rejects_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"junk")
    with pytest.raises(RSSQAError, match=r"x\.ckpt: not a sqed segmenter checkpoint"):
        load_segmenter(tmp_path / "x.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "y.ckpt")
    with pytest.raises(RSSQAError, match=r"y\.ckpt: not a sqed segmenter checkpoint"):
        load_segmenter(tmp_path / "y.ckpt")
    with pytest.raises(RSSQAError, match=r"z\.ckpt: segmenter checkpoint not found"):
        load_segmenter(tmp_path / "z.ckpt")


def test_checkpoint_does_not_need_the_initial_encoder_weights(tmp_path):
    import lightning as L
    from safetensors.torch import save_file

    from rssqa.data.segsets import SegArrays, SegDataModule
    from rssqa.models.segmenters import build_segmenter, resolve_method
    from rssqa.tasks.sqed import SegmentationTask

    save_file(build_segmenter("pspnet", 3).model.encoder.state_dict(), str(tmp_path / "enc.safetensors"))
    spec = resolve_method("pspnet", overrides={"encoder_weights_path": str(tmp_path / "enc.safetensors")})
    task = SegmentationTask(spec.as_dict(), 3)
    rng = np.random.default_rng(0)
    data = SegArrays(
        rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, (4, 32, 32), dtype=np.uint8)
    )
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, datamodule=SegDataModule(train=data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    (tmp_path / "enc.safetensors").unlink()
    seg = load_segmenter(tmp_path / "m.ckpt")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(seg(x), task.eval().segmenter(x))


def test_rerun_reuses_and_is_deterministic(built, tiny_world, tmp_path):
    out, first = built
    table = (out / TABLE).read_bytes()
    again = build_sqed(tiny_config(tiny_world), out)
    assert again["trained"] == again["labelled"] == 0 and again["reused_shards"] == 4
    # throughput is what was recorded when the parts were made, not the (instant) reuse
    assert again["rows_labelled_per_s"] == first["rows_labelled_per_s"]
    assert (out / TABLE).read_bytes() == table
    # a lost shard is relabelled alone
    (out / "features" / "loveda" / "linknet.safetensors").unlink()
    partial = build_sqed(tiny_config(tiny_world), out)
    assert (partial["trained"], partial["labelled"]) == (0, 1) and (out / TABLE).read_bytes() == table
    # a fresh folder, same seed: the same numbers, bit for bit
    fresh = build_sqed(tiny_config(tiny_world), tmp_path / "fresh")
    assert fresh["trained"] == 4 and (tmp_path / "fresh" / TABLE).read_bytes() == table


def test_changed_config_retrains(built, tiny_world, tmp_path):
    out, _ = built
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    s = build_sqed(
        tiny_config(tiny_world, methods=["pspnet"], method_overrides={"pspnet": {"lr": 0.01}}), copy
    )
    assert s["trained"] == 2 and s["reused_checkpoints"] == 0 and s["n_methods"] == 1


def test_regenerated_data_is_not_served_from_the_cache(tiny_world, tmp_path):
    """Files rewritten under the same names (a regenerated world) invalidate what was built from them."""
    import os
    import shutil

    shutil.copytree(tiny_world / "sources" / "potsdam", tmp_path / "potsdam")
    cfg = tiny_config(
        tiny_world, sources=[SourceConfig("potsdam", str(tmp_path / "potsdam"))], methods=["pspnet"]
    )
    build_sqed(cfg, tmp_path / "out")
    pool = json.loads((tmp_path / "out" / "pool" / "potsdam" / "samples.json").read_text())
    pool_image = Path(pool["samples"][0]["file"])
    os.utime(pool_image, ns=(pool_image.stat().st_atime_ns, pool_image.stat().st_mtime_ns + 10**9))
    s = build_sqed(cfg, tmp_path / "out")
    assert (s["trained"], s["labelled"]) == (0, 1)
    seg_id = json.loads((tmp_path / "out" / "splits.json").read_text())["_seg"]["potsdam"][0]
    seg_image = tmp_path / "potsdam" / "2_Ortho_RGB" / f"{seg_id}_RGB.tif"
    os.utime(seg_image, ns=(seg_image.stat().st_atime_ns, seg_image.stat().st_mtime_ns + 10**9))
    s = build_sqed(cfg, tmp_path / "out")
    assert (s["trained"], s["labelled"]) == (1, 1)


# ------------------------------------------------------------------------------------------ ranks
def test_ranks_from_the_launchers_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "rssqa-sqed"}
    assert Ranks.from_env(slurm) == Ranks(9, 16, 1)
    # torchrun inside a SLURM job: torchrun's variables win
    assert Ranks.from_env({**slurm, "RANK": "3", "WORLD_SIZE": "4"}) == Ranks(3, 4, 0)
    # a shell in an allocation, or one holding only the task count, is one process
    assert Ranks.from_env({**slurm, "SLURM_JOB_NAME": "interactive"}) == Ranks()
    assert Ranks.from_env({"SLURM_NTASKS": "8"}) == Ranks()
    with pytest.raises(RSSQAError, match=r"^RANK: 2 is not a rank of WORLD_SIZE=2 processes"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(RSSQAError, match=r"^WORLD_SIZE: not set"):
        Ranks.from_env({"RANK": "0"})
    with pytest.raises(RSSQAError, match=r"^SLURM_NTASKS: 'x' is not an integer"):
        Ranks.from_env({**slurm, "SLURM_NTASKS": "x"})


def test_assign_units_gives_every_unit_one_rank():
    sources, methods = ["a", "b", "c", "d"], [f"m{i}" for i in range(8)]
    every = [(s, m) for s in sources for m in methods]
    assert assign_units(sources, methods, Ranks()) == every  # one process: the table's order
    for w in (2, 3, 4, 5, 8, 16, 40):
        shares = [assign_units(sources, methods, Ranks(r, w)) for r in range(w)]
        assert sorted(u for share in shares for u in share) == sorted(every)  # each unit exactly once
        for share in shares:  # source by source, methods in config order
            assert share == sorted(share, key=lambda u: (sources.index(u[0]), methods.index(u[1])))
    # a world size that is a multiple of the number of sources gives each rank one source
    for r in range(8):
        assert {s for s, _ in assign_units(sources, methods, Ranks(r, 8))} == {sources[r % 4]}


def test_each_rank_trains_on_its_own_gpu(monkeypatch):
    devices = sqed_task._devices
    assert devices("cpu", 3) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices("auto", 3) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert devices("gpu", 3) == devices("cuda", 3) == devices("auto", 3) == [3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher bound one GPU to the task
    assert devices("gpu", 3) == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RSSQAError, match=r"^LOCAL_RANK: 3, but this process sees 2 GPUs"):
        devices("gpu", 3)


def test_resume_point_takes_the_furthest_matching_checkpoint(tmp_path):
    def ckpt(name, fp, step):
        torch.save({"global_step": step, "hyper_parameters": {"fingerprint": fp}}, tmp_path / name)

    ckpt("last.ckpt", "a", 3)
    ckpt("hpc_ckpt_1.ckpt", "a", 5)
    ckpt("hpc_ckpt_2.ckpt", "b", 9)
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"torn")
    assert sqed_task._resume_point(tmp_path, "a") == str(tmp_path / "hpc_ckpt_1.ckpt")
    # HPC checkpoints of another configuration or torn are gone: Lightning would resume them unasked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_1.ckpt", "last.ckpt"]
    ckpt("hpc_ckpt_1.ckpt", "a", 2)
    assert sqed_task._resume_point(tmp_path, "a") == str(tmp_path / "last.ckpt")
    assert sqed_task._resume_point(tmp_path, "c") is None
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_two_ranks_share_the_units_and_rank_0_waits_for_the_other(built, tiny_world, tmp_path, monkeypatch):
    """Ranks run one after the other in this process: rank 0 alone times out naming rank 1's units;
    after rank 1 ran, rank 0 writes the one-process table."""
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "summary.json").unlink()
    for shard in (copy / "features" / "loveda").iterdir():  # rank 1 of 2 owns loveda's units
        shard.unlink()
    vaihingen = {p.name: p.stat().st_mtime_ns for p in (copy / "features" / "vaihingen").iterdir()}
    monkeypatch.setattr(sqed_task.build, "POLL_S", 0.05)
    cfg = tiny_config(tiny_world)
    with pytest.raises(RSSQAError) as e:
        build_sqed(cfg, copy, ranks=Ranks(0, 2), wait_s=0.3)
    assert str(e.value) == (
        f"{copy}: no unit of the other ranks finished in 0.3 s; missing loveda/pspnet (rank 1), "
        "loveda/linknet (rank 1) (are all WORLD_SIZE=2 ranks running?)"
    )
    shutil.rmtree(copy / "pool" / "loveda")  # as if rank 1 started first
    report = build_sqed(cfg, copy, ranks=Ranks(1, 2))
    assert report["rank"] == 1 and report["world_size"] == 2
    assert report["units"] == {
        u: {"trained": False, "labelled": True} for u in ("loveda/pspnet", "loveda/linknet")
    }
    # only rank 0 writes the shared files
    assert not (copy / "summary.json").exists() and not (copy / "pool" / "loveda").exists()
    summary = build_sqed(cfg, copy, ranks=Ranks(0, 2), wait_s=0.3)
    assert summary["world_size"] == 2 and (summary["labelled"], summary["reused_shards"]) == (0, 2)
    assert set(summary["units"]) == {"vaihingen/pspnet", "vaihingen/linknet"}
    assert (copy / TABLE).read_bytes() == (out / TABLE).read_bytes()
    assert read_summary(copy)["n_rows"] == summary["n_rows"]
    for name in ("images.npy", "masks.npy", "samples.json"):
        assert (copy / "pool" / "loveda" / name).read_bytes() == (out / "pool" / "loveda" / name).read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "features" / "vaihingen").iterdir()} == vaihingen


# --------------------------------------------------------------------------------------- bad input
def test_bad_configs_fail_with_one_line(tiny_world, tmp_path):
    with pytest.raises(RSSQAError, match="method 'nope' unknown"):
        build_sqed(tiny_config(tiny_world, methods=["nope"]), tmp_path)
    with pytest.raises(RSSQAError, match="splits: keys must be among"):
        build_sqed(tiny_config(tiny_world, splits={"train": 1.0}), tmp_path)
    with pytest.raises(RSSQAError, match="distinct names"):
        build_sqed(
            tiny_config(tiny_world, sources=[SourceConfig("a", "x"), SourceConfig("a", "y")]), tmp_path
        )
    with pytest.raises(RSSQAError, match="method_overrides"):
        build_sqed(tiny_config(tiny_world, method_overrides={"unet": {}}), tmp_path)
    few = SourceConfig("vaihingen", str(tiny_world / "sources" / "vaihingen"), options={"max_images": 1})
    with pytest.raises(RSSQAError, match="vaihingen: 1 usable images give"):
        build_sqed(tiny_config(tiny_world, sources=[few]), tmp_path)


def test_bad_files_skip_and_count_or_stop(tiny_world, tmp_path):
    import shutil

    root = tmp_path / "sources" / "deepglobe"
    shutil.copytree(tiny_world / "sources" / "deepglobe", root)
    victim = sorted((root / "train").glob("*_mask.png"))[0]
    victim.unlink()
    src = SourceConfig("deepglobe", str(root))
    with pytest.raises(RSSQAError, match=rf"{victim.name.replace('_mask.png', '_sat')}\.jpg: no mask"):
        build_sqed(tiny_config(tiny_world, sources=[src], on_bad="error"), tmp_path / "a")
    s = build_sqed(tiny_config(tiny_world, sources=[src], on_bad="skip", methods=["pspnet"]), tmp_path / "b")
    assert s["n_bad"] == 1 and "no mask" in s["sources"]["deepglobe"]["bad"][0]
    assert s["sources"]["deepglobe"]["n_seg_train"] + s["sources"]["deepglobe"]["n_pool"] == 15


@pytest.mark.slow  # a stage process
def test_stage_cli_reports_a_bad_config_in_one_line(tmp_path, stage_python):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sqed:\n  sources:\n    - {name: vaihingen, root: nowhere}\n  wandb: disabled\n")
    r = subprocess.run(
        [*stage_python, str(ROOT / "stages" / "sqed.py"), "--config", str(cfg), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=stage_env(),
    )  # fmt: skip
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1].startswith("error: ")
        and "nowhere/top: image folder not found" in r.stderr
    )
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_stage_cli_runs_the_smoke_config(tiny_world, tmp_path, stage_python):
    """The real conf/smoke/sqed.yaml through stages/sqed.py, shrunk from the command line."""
    (tmp_path / "world").symlink_to(tiny_world)
    r = subprocess.run(
        [*stage_python, str(ROOT / "stages" / "sqed.py"), "--config", str(ROOT / "conf" / "smoke" / "sqed.yaml"),
         "--out", str(tmp_path / "sqed"), "--sqed.methods", "[pspnet, fpn]", "--sqed.train.epochs", "1",
         "--sqed.wandb", "offline"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env=stage_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    s = read_summary(tmp_path / "sqed")
    assert s["n_methods"] == 2 and s["n_rows"] == 2 * s["n_images"] and set(s["sources"]) == {
        "vaihingen", "potsdam", "loveda", "deepglobe"}  # fmt: skip
    assert list((tmp_path / "sqed" / "wandb").glob("offline-run-*"))
    assert "already built with this configuration" in subprocess.run(
        [*stage_python, str(ROOT / "stages" / "sqed.py"), "--config", str(ROOT / "conf" / "smoke" / "sqed.yaml"),
         "--out", str(tmp_path / "sqed"), "--sqed.methods", "[pspnet, fpn]", "--sqed.train.epochs", "1",
         "--sqed.wandb", "offline"], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=stage_env()).stdout  # fmt: skip


def test_table_columns_are_the_documented_ones():
    assert TABLE_COLUMNS[:6] == ("key", "image_id", "source", "method", "oa", "split")


def dry_run_plan(profile: str, data_root: Path, capsys) -> dict:
    """``conf/<profile>/sqed.yaml`` through the stage's own entry point as a dry run (no data read): its plan."""
    import importlib.util

    from jsonargparse import CLI

    spec = importlib.util.spec_from_file_location("sqed_stage", ROOT / "stages" / "sqed.py")
    stage = importlib.util.module_from_spec(spec)
    sys.modules["sqed_stage"] = stage  # so that its string annotations resolve
    spec.loader.exec_module(stage)
    args = ["--config", str(ROOT / "conf" / profile / "sqed.yaml"), "--data_root", str(data_root), "--dry_run", "true"]
    CLI(stage.main, args=args, as_positional=False)
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_profile_configs_parse_and_plan(profile, tmp_path, capsys):
    """Each profile's config through the stage's own entry point, as a dry run (no data read)."""
    plan = dry_run_plan(profile, tmp_path, capsys)
    assert len(plan["methods"]) == 8 and set(plan["sources"]) == {
        "vaihingen",
        "potsdam",
        "loveda",
        "deepglobe",
    }
    assert all(m["epochs"] >= 1 for m in plan["methods"].values())
    if profile != "paper":
        assert all(s["root"] == str(tmp_path / "world" / "sources" / n) for n, s in plan["sources"].items())
