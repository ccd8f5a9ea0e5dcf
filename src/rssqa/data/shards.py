"""WebDataset shard I/O: atomic, deterministic writing and a reading pipeline that counts bad samples.

Shards are plain tar files in WebDataset layout: the members of one sample share a key
(``s00000042.jpg``, ``s00000042.txt``, ``s00000042.json``). Writing is byte-reproducible (fixed
mtime, owner and member order) and atomic (a shard appears under its final name only when complete).

Reading builds on webdataset's shard lists, node/worker splitting, resampling and shuffling. The tar
expansion is our own so that a fault is pinned to the sample and shard it hit: a truncated tar, an
undecodable image, a missing or non-UTF-8 caption skips that sample, counts it in a
:class:`BadSampleLog` and logs its key and shard; every good sample still arrives.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from rssqa.errors import BadSample, RSSQAError
from rssqa.runs import atomic_write_json

log = logging.getLogger(__name__)

SIZES = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")
REQUIRED = ("image", "txt")


# ----------------------------------------------------------------------------------------------- writing
def encode_value(ext: str, value: Any, jpeg_quality: int = 90) -> bytes:
    """Encode one field of a sample by its extension.

    Args:
        ext: member extension, e.g. ``"jpg"``, ``"png"``, ``"txt"``, ``"json"``, ``"npy"``.
        value: bytes (stored as is), ``str``, a JSON-able object, or an ``H×W×3`` / ``H×W`` uint8 array.
        jpeg_quality: quality for arrays stored as ``jpg``.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if ext == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray) and ext in IMAGE_EXTS:
        buf = io.BytesIO()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, ext.upper())
        kw = {"quality": jpeg_quality} if fmt == "JPEG" else {}
        Image.fromarray(value).save(buf, format=fmt, **kw)
        return buf.getvalue()
    if isinstance(value, np.ndarray) and ext == "npy":
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise TypeError(f"cannot encode field {ext!r} of type {type(value).__name__}")


def _encode_sample(sample: dict[str, Any], jpeg_quality: int) -> dict[str, Any]:
    if "__key__" not in sample:
        raise RSSQAError(f"sample without __key__ (fields: {sorted(sample)})")
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for k, v in sample.items():
        if not k.startswith("__"):
            out[k] = encode_value(k, v, jpeg_quality)
    return out


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]], jpeg_quality: int = 90) -> int:
    """Write ``samples`` to one tar shard at ``path``, atomically and reproducibly.

    Returns:
        The number of samples written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, user="", group="", mtime=0.0, encoder=False)
            try:
                for sample in samples:
                    writer.write(_encode_sample(sample, jpeg_quality))
                    n += 1
            finally:
                writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


class ShardWriter:
    """Write samples into numbered shards ``<out_dir>/<prefix>-000000.tar`` of ``maxcount`` samples.

    Each shard is written atomically when full (or at :meth:`close`); ``sizes.json`` (shard name ->
    sample count, merged with any existing entries) is written at close.

    Example:
        >>> with ShardWriter("out", maxcount=2) as w:   # doctest: +SKIP
        ...     w.write({"__key__": "a", "jpg": img, "txt": "a road", "json": {}})
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        maxcount: int = 1000,
        start_index: int = 0,
        jpeg_quality: int = 90,
    ):
        if maxcount < 1:
            raise RSSQAError(f"ShardWriter: maxcount must be >= 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.prefix, self.maxcount, self.index = prefix, maxcount, start_index
        self.jpeg_quality = jpeg_quality
        self.sizes: dict[str, int] = {}
        self._buffer: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any]) -> None:
        """Queue one sample (encoded now, so a bad field fails at its own sample)."""
        self._buffer.append(_encode_sample(sample, self.jpeg_quality))
        if len(self._buffer) >= self.maxcount:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.prefix}-{self.index:06d}.tar"
        self.sizes[name] = write_shard(self.out_dir / name, self._buffer)
        self._buffer, self.index = [], self.index + 1

    def close(self) -> dict[str, int]:
        """Flush the last shard, write ``sizes.json`` and return this writer's shard sizes."""
        self._flush()
        write_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_sizes(out_dir: str | os.PathLike, sizes: dict[str, int]) -> Path:
    """Merge ``sizes`` into ``out_dir/sizes.json`` (atomically)."""
    merged = {**read_sizes(out_dir, missing_ok=True), **sizes}
    return atomic_write_json(Path(out_dir) / SIZES, dict(sorted(merged.items())))


def read_sizes(out_dir: str | os.PathLike, missing_ok: bool = False) -> dict[str, int]:
    """Read ``out_dir/sizes.json`` (shard file name -> number of samples)."""
    path = Path(out_dir) / SIZES
    if not path.is_file():
        if missing_ok:
            return {}
        raise RSSQAError(f"{path}: not found")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------- listing
def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into a sorted list of paths or URLs.

    Args:
        spec: a directory (its ``*.tar``), a glob, a brace pattern (``a/shard-{000000..000009}.tar``),
            ``::``-separated patterns, or a list of any of these.

    Raises:
        RSSQAError: when the spec matches nothing.
    """
    if isinstance(spec, str | os.PathLike):
        spec = [os.fspath(spec)]
    urls: list[str] = []
    for item in spec:
        item = os.fspath(item)
        if os.path.isdir(item):
            urls += sorted(glob.glob(os.path.join(item, "*.tar")))
        elif any(c in item for c in "*?[") and "{" not in item:
            urls += sorted(glob.glob(item))
        else:
            urls += wds.shardlists.expand_urls(item)
    if not urls:
        raise RSSQAError(f"{os.pathsep.join(os.fspath(s) for s in spec)}: no shards found")
    return urls


# ----------------------------------------------------------------------------------------------- reading
class BadSampleLog:
    """Counts and logs the samples a pipeline skipped, by reason, with key and shard.

    One instance lives in each process (DataLoader workers have their own copy); consumers that
    need an exact count across workers and ranks use ``on_bad="mark"`` instead and count the marks.
    """

    def __init__(self, max_logged: int = 100):
        self.counts: Counter[str] = Counter()
        self.examples: list[tuple[str, str, str]] = []
        self.max_logged = max_logged

    def add(self, key: str, url: str, reason: str) -> None:
        """Record one bad sample."""
        self.counts[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_logged:
            self.examples.append((key, url, reason))
            log.warning("skipped sample %r in %s: %s", key, url, reason)

    @property
    def total(self) -> int:
        """Number of bad samples seen."""
        return sum(self.counts.values())


def _split_name(fname: str) -> tuple[str, str]:
    # key = path up to the first dot of the base name (webdataset convention)
    head, _, base = fname.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _Counting(io.RawIOBase):
    """A read-only stream wrapper that counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.n_read = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.n_read += len(data)
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def _open(url: str):
    if "://" in url or url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    return open(url, "rb")


def tar_samples(urls: Iterable[str | dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Expand shards into raw samples ``{"__key__", "__url__", ext: bytes, ...}``.

    A shard that cannot be opened or is cut short ends with one raw sample carrying ``"__bad__"``
    for the sample that was being read (its key, or the shard itself when no member was read);
    the samples completed before the fault are yielded normally.
    """
    for item in urls:
        url = item["url"] if isinstance(item, dict) else item
        current: dict[str, Any] | None = None
        try:
            with _open(url) as raw, _Counting(raw) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = _split_name(member.name)
                    if current is not None and key != current["__key__"]:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if ext in current:
                        raise tarfile.ReadError(f"duplicate member {member.name}")
                    current[ext] = data
                stream.drain()
                # tarfile stops quietly at a header cut short; a whole archive ends with two zero blocks
                if stream.n_read < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"truncated at byte {stream.n_read} (no end-of-archive marker)")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            reason = f"unreadable tar: {e}"
            if current is None:
                yield {"__key__": "<shard>", "__url__": url, "__bad__": reason}
            elif _is_whole(current):  # the fault came after this sample: keep it, flag what follows
                yield current
                yield {"__key__": f"<after {current['__key__']}>", "__url__": url, "__bad__": reason}
            else:
                yield {"__key__": current["__key__"], "__url__": url, "__bad__": reason}
            continue
        if current is not None:
            yield current


def _is_whole(raw: dict[str, Any]) -> bool:
    return "txt" in raw and any(e in raw for e in IMAGE_EXTS)


def decode_sample(raw: dict[str, Any], decode_images: bool = True) -> dict[str, Any]:
    """Decode one raw sample to ``{"__key__", "__url__", "image", "txt", "json", ...}``.

    ``image`` is an ``H×W×3`` uint8 array (or the encoded bytes when ``decode_images`` is False),
    ``txt`` a str, ``json`` a dict (``{}`` when absent). Other members are passed through as bytes.

    Raises:
        BadSample: missing image or caption, an undecodable image, a non-UTF-8 caption, bad JSON.
    """
    key, url = raw["__key__"], raw["__url__"]
    if "__bad__" in raw:
        raise BadSample(key, url, raw["__bad__"])
    out: dict[str, Any] = {"__key__": key, "__url__": url}
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        raise BadSample(key, url, f"missing image (members: {sorted(k for k in raw if not k.startswith('__'))})")
    if "txt" not in raw:
        raise BadSample(key, url, "missing caption (no .txt member)")
    for ext, value in raw.items():
        if ext.startswith("__") or ext == image_ext:
            continue
        if ext == "txt":
            try:
                out["txt"] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadSample(key, url, f"caption is not UTF-8 ({e.reason} at byte {e.start})") from None
        elif ext == "json":
            try:
                out["json"] = json.loads(value)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSample(key, url, f"meta is not valid JSON ({e})") from None
        else:
            out[ext] = value
    out.setdefault("json", {})
    out["image"] = decode_image(raw[image_ext], key, url) if decode_images else raw[image_ext]
    return out


def decode_image(data: bytes, key: str = "?", url: str = "?") -> np.ndarray:
    """Decode encoded image bytes to an ``H×W×3`` uint8 RGB array, or raise :class:`BadSample`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(key, url, f"undecodable image ({type(e).__name__}: {e})") from None


def _decode_stage(
    data: Iterable[dict[str, Any]], decode_images: bool, on_bad: str, bad_log: BadSampleLog | None
) -> Iterator[dict[str, Any]]:
    for raw in data:
        try:
            yield decode_sample(raw, decode_images)
        except BadSample as e:
            if bad_log is not None:
                bad_log.add(e.key, e.source, e.reason)
            if on_bad == "mark":
                yield {"__key__": e.key, "__url__": e.source, "__bad__": e.reason}
            elif on_bad == "raise":
                raise


def shard_pipeline(
    urls: str | Sequence[str],
    *,
    decode: bool = True,
    shuffle: int = 0,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    on_bad: str = "skip",
    bad_log: BadSampleLog | None = None,
    map_fn: Callable[[dict[str, Any]], Any] | None = None,
) -> wds.DataPipeline:
    """Build the reading pipeline over shards.

    Args:
        urls: anything :func:`list_shards` accepts.
        decode: decode images to uint8 arrays (False keeps the encoded bytes, for speed tests or copying).
        shuffle: sample shuffle buffer size (0 = keep order); shards are shuffled too when > 0.
        seed, epoch: shuffling is a pure function of (seed, epoch, rank, worker): reproducible.
        resampled: draw shards with replacement forever (training with a set number of samples per epoch).
        split_by_node: give each distributed rank its own shards.
        split_by_worker: give each DataLoader worker its own shards.
        on_bad: ``"skip"`` (count and drop), ``"mark"`` (yield ``{"__key__", "__url__", "__bad__"}``)
            or ``"raise"``.
        bad_log: where skipped samples are counted (a fresh log is made when None; see ``.bad_log``).
        map_fn: applied to each good sample last (e.g. a transform to tensors).

    Returns:
        A ``webdataset.DataPipeline`` (an ``IterableDataset``) with a ``bad_log`` attribute.
    """
    if on_bad not in ("skip", "mark", "raise"):
        raise RSSQAError(f"on_bad must be 'skip', 'mark' or 'raise', got {on_bad!r}")
    shard_list = list_shards(urls)
    bad_log = bad_log if bad_log is not None else BadSampleLog()
    stages: list[Any] = []
    if resampled:
        stages.append(wds.ResampledShards(shard_list, seed=seed, deterministic=True))
    else:
        stages.append(wds.SimpleShardList(shard_list))
        if shuffle:
            # every rank draws the same shard order (same seed), then takes its own slice of it
            stages.append(wds.detshuffle(len(shard_list), len(shard_list), seed=seed, epoch=epoch - 1))
        if split_by_node:
            stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages.append(tar_samples)
    if shuffle:
        stages.append(wds.detshuffle(shuffle, min(shuffle, 100), seed=seed, epoch=epoch - 1))
    stages.append(lambda src: _decode_stage(src, decode, on_bad, bad_log))
    if map_fn is not None:
        stages.append(wds.map(lambda s: s if "__bad__" in s else map_fn(s)))
    pipeline = wds.DataPipeline(*stages)
    pipeline.bad_log = bad_log
    return pipeline


def iter_shard(url: str, decode: bool = True, bad_log: BadSampleLog | None = None) -> Iterator[dict[str, Any]]:
    """Iterate the good samples of one shard in order (no splitting, no shuffling)."""
    yield from _decode_stage(tar_samples([url]), decode, "skip", bad_log)
