"""Shard I/O: round trip, reproducible bytes, splitting, and bad input skipped and counted."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

from rssqa.data.shards import (
    BadSampleLog,
    ShardWriter,
    iter_shard,
    list_shards,
    read_sizes,
    shard_pipeline,
    write_shard,
)
from rssqa.errors import RSSQAError


def _samples(n: int, start: int = 0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        yield {
            "__key__": f"k{i:05d}",
            "png": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
            "txt": f"caption {i}",
            "json": {"i": i},
        }


def _keys(pipeline) -> list[str]:
    return [s["__key__"] for s in pipeline]


@pytest.fixture()
def shards(tmp_path):
    with ShardWriter(tmp_path, maxcount=10) as w:
        for s in _samples(35):
            w.write(s)
    return tmp_path


def test_round_trip_and_sizes(shards):
    assert read_sizes(shards) == {f"shard-{i:06d}.tar": n for i, n in enumerate([10, 10, 10, 5])}
    got = list(shard_pipeline(shards))
    assert [s["__key__"] for s in got] == [f"k{i:05d}" for i in range(35)]
    ref = list(_samples(35))
    for s, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(s["image"], r["png"])  # png is lossless
        assert s["txt"] == r["txt"] and s["json"] == r["json"]


def test_writing_is_byte_reproducible(tmp_path):
    digests = []
    for name in ("a.tar", "b.tar"):
        write_shard(tmp_path / name, _samples(5))
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_no_partial_shard_on_failure(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "x.tar", broken())
    assert list(tmp_path.iterdir()) == []


def test_list_shards_patterns(shards):
    assert len(list_shards(shards)) == 4
    assert len(list_shards(str(shards / "shard-{000000..000002}.tar"))) == 3
    assert len(list_shards(str(shards / "shard-*.tar"))) == 4
    with pytest.raises(RSSQAError, match="no shards found"):
        list_shards(str(shards / "nothing-*.tar"))


def test_split_by_node_covers_every_sample_once(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen += _keys(shard_pipeline(shards, shuffle=8, seed=3))
    assert sorted(seen) == [f"k{i:05d}" for i in range(35)]


def test_dataloader_workers_cover_every_sample_once(shards):
    loader = torch.utils.data.DataLoader(shard_pipeline(shards), num_workers=2, batch_size=None)
    assert sorted(s["__key__"] for s in loader) == [f"k{i:05d}" for i in range(35)]


def test_shuffle_is_deterministic_and_changes_with_epoch(shards):
    a = _keys(shard_pipeline(shards, shuffle=16, seed=1, epoch=0))
    b = _keys(shard_pipeline(shards, shuffle=16, seed=1, epoch=0))
    c = _keys(shard_pipeline(shards, shuffle=16, seed=1, epoch=1))
    assert a == b and a != c and sorted(a) == sorted(c)


def test_resampled_draws_forever(shards):
    it = iter(shard_pipeline(shards, resampled=True, seed=0))
    assert len([next(it) for _ in range(100)]) == 100


def _raw_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    good = _png()
    _raw_tar(
        tmp_path / "a.tar",
        [
            ("ok1.png", good), ("ok1.txt", b"fine"),
            ("corrupt.png", b"not an image"), ("corrupt.txt", b"x"),
            ("latin.png", good), ("latin.txt", "caf\xe9".encode("latin-1")),
            ("nocap.png", good),
            ("ok2.png", good), ("ok2.txt", b"also fine"), ("ok2.json", b"{}"),
            ("badjson.png", good), ("badjson.txt", b"x"), ("badjson.json", b"{nope"),
        ],
    )  # fmt: skip
    log = BadSampleLog()
    got = list(shard_pipeline(tmp_path / "a.tar", bad_log=log))
    assert [s["__key__"] for s in got] == ["ok1", "ok2"]
    assert log.total == 4
    reasons = {k: r for k, _, r in log.examples}
    assert set(reasons) == {"corrupt", "latin", "nocap", "badjson"}
    assert "undecodable image" in reasons["corrupt"]
    assert "not UTF-8" in reasons["latin"]
    assert "missing caption" in reasons["nocap"]
    assert all(url.endswith("a.tar") for _, url, _ in log.examples)


def _cut_at(tmp_path, name: str, extra: int):
    """Write 20 samples, then a copy cut ``extra`` bytes after the header of member ``name``."""
    write_shard(tmp_path / "full.tar", _samples(20))
    with tarfile.open(tmp_path / "full.tar") as tar:
        offset = tar.getmember(name).offset
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[: offset + extra])
    write_shard(tmp_path / "next.tar", _samples(3, start=100))
    log = BadSampleLog()
    out = list(shard_pipeline([str(tmp_path / "cut.tar"), str(tmp_path / "next.tar")], on_bad="mark", bad_log=log))
    return [s["__key__"] for s in out if "__bad__" not in s], [s for s in out if "__bad__" in s], log


def test_truncated_shard_inside_a_sample(tmp_path):
    good, bad, log = _cut_at(tmp_path, "k00012.png", 512 + 40)  # inside the 13th sample's image data
    assert good == [f"k{i:05d}" for i in range(12)] + ["k00100", "k00101", "k00102"]
    assert [b["__key__"] for b in bad] == ["k00012"] and "unreadable tar" in bad[0]["__bad__"]
    assert bad[0]["__url__"].endswith("cut.tar") and log.total == 1


def test_truncated_shard_between_samples(tmp_path):
    good, bad, log = _cut_at(tmp_path, "k00012.json", 100)  # inside the header of the 13th sample
    assert good == [f"k{i:05d}" for i in range(12)] + ["k00100", "k00101", "k00102"]
    assert [b["__key__"] for b in bad] == ["<after k00011>"] and log.total == 1


def test_missing_shard_is_counted_not_fatal(tmp_path):
    write_shard(tmp_path / "ok.tar", _samples(3))
    log = BadSampleLog()
    got = _keys(shard_pipeline([str(tmp_path / "gone.tar"), str(tmp_path / "ok.tar")], bad_log=log))
    assert got == ["k00000", "k00001", "k00002"] and log.total == 1


def test_iter_shard_in_order(shards):
    assert [s["__key__"] for s in iter_shard(str(shards / "shard-000001.tar"))] == [f"k{i:05d}" for i in range(10, 20)]
