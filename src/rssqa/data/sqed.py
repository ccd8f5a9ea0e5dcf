"""RS-SQED on disk: the table of (image, method, OA), the label shards, the pool images, the splits.

Folder (``runs/<profile>/sqed/``)::

    table.csv                        one row per (image, method): TABLE_COLUMNS
    pool/<source>/images.npy         N×H×W×3 uint8, the images that were labelled (row = image_row)
    pool/<source>/masks.npy          N×H×W uint8 ground truth (255 = ignore)
    pool/<source>/samples.json       per image: image_id, group, split, file, window; the class names;
                                     how the files were resampled on read (``read``, when they were)
    features/<source>/<method>.safetensors   one label shard: per-image arrays, row = feature_row
    methods/<source>/<method>/final.ckpt     the trained method (Lightning checkpoint, weights only)
    splits.json, summary.json, oa_distributions.png

A label shard holds, for the N pool images of one source labelled by one method (row order =
``samples.json``): ``oa`` (N, float32, OA in [0, 1]), ``n_labelled`` (N, int64 pixels),
``msp``/``entropy``/``margin`` (N), ``hist_conf``/``hist_certainty``/``hist_margin`` (N×K),
``class_share``/``mean_prob`` (N×C) in float32; ``maps`` (N×3×g×g) and ``feat/<layer>``
(N×C_l×g×g) in float16. Its safetensors metadata ``"rssqa"`` is a JSON object: source, method,
image_ids, fingerprint, classes, grid, hist_bins, map_names, feature_shapes.

Rows are keyed by ``key = "<source>/<image_id>"``: image ids are unique within a source only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.errors import RSSQAError
from rssqa.runs import atomic_write_bytes

TABLE = "table.csv"
AGREEMENT = "agreement.safetensors"  # features/<source>/: agreement between the source's methods
TABLE_COLUMNS = (
    "key",
    "image_id",
    "source",
    "method",
    "oa",
    "split",
    "group",
    "n_labelled",
    "msp",
    "entropy",
    "margin",
    "feature_file",
    "feature_row",
    "image_file",
    "image_row",
)
# written when the stage computed them (agreement between at least three methods of a source)
OPTIONAL_COLUMNS = ("agreement", "consensus")
_FLOATS = {"oa", "msp", "entropy", "margin", *OPTIONAL_COLUMNS}
_INTS = {"n_labelled", "feature_row", "image_row"}
HALF = ("maps", "feat/")  # shard arrays stored as float16: the bulky ones
SPLITS = ("seg", "train", "val", "test")
# Two OA values are a tie when they differ by rounding only (OA is a ratio of pixel counts).
_TIE = 1e-9


# ------------------------------------------------------------------------------------------ splits
def assign_splits(
    groups: Mapping[str, Sequence[str]], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, dict[str, str]]:
    """Assign every group of every source to a split, stratified by source, seeded.

    Within a source the groups are sorted, shuffled by ``default_rng([seed, crc32(source)])`` and
    cut by ``fractions`` (largest remainder), so a source's assignment does not depend on the other
    sources nor on the order the groups are listed in.

    Args:
        groups: source -> its groups (an image, or the images that must stay together).
        fractions: split name -> share; positive, summing to 1.
        seed: the seed.

    Returns:
        source -> {group: split}.
    """
    names = list(fractions)
    f = np.array([fractions[n] for n in names], float)
    if (f < 0).any() or not math.isclose(f.sum(), 1.0, abs_tol=1e-6):
        raise RSSQAError(f"splits: fractions {dict(fractions)} must be non-negative and sum to 1")
    out: dict[str, dict[str, str]] = {}
    for source, gs in groups.items():
        unique = sorted(set(gs))
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        order = [unique[i] for i in rng.permutation(len(unique))]
        counts = split_counts(len(unique), f)
        out[source] = {}
        start = 0
        for name, k in zip(names, counts, strict=True):
            out[source].update(dict.fromkeys(order[start : start + k], name))
            start += k
    return out


def split_counts(n: int, fractions: Sequence[float] | np.ndarray) -> list[int]:
    """Cut ``n`` items by ``fractions`` with the largest-remainder rule (ties to the earlier split)."""
    raw = np.asarray(fractions, float) * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[:rest]:
        counts[i] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------ label shards
def write_label_shard(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> int:
    """Write one label shard atomically (bulky arrays as float16, the rest float32 / int64).

    Args:
        path: ``features/<source>/<method>.safetensors``.
        arrays: name -> array with the image on axis 0.
        meta: JSON-able description (stored as safetensors metadata ``"rssqa"``).

    Returns:
        Bytes written.
    """
    from safetensors.numpy import save

    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise RSSQAError(f"{path}: arrays disagree on the number of images: {sorted(n)}")
    tensors = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        if k.startswith(HALF):
            a = a.astype(np.float16)
        elif np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        elif np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.int64)
        tensors[k] = np.ascontiguousarray(a)
    data = save(tensors, metadata={"rssqa": json.dumps(dict(meta), sort_keys=True)})
    atomic_write_bytes(path, data)
    return len(data)


def read_shard_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``"rssqa"`` metadata of a label shard (header only, no arrays read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("rssqa", "{}"))
    except FileNotFoundError:
        raise RSSQAError(f"{path}: label shard not found") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is one user error
        raise RSSQAError(f"{path}: not a readable label shard ({e})") from None


def shard_matches(path: str | os.PathLike, fingerprint: str) -> bool:
    """Whether ``path`` is a shard written for ``fingerprint`` (a missing, foreign or torn file is not)."""
    if not Path(path).is_file():
        return False
    try:
        return read_shard_meta(path).get("fingerprint") == fingerprint
    except RSSQAError:
        return False


def read_label_shard(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (float16 ones widened to float32) and metadata of a label shard."""
    from safetensors.numpy import load_file

    meta = read_shard_meta(path)
    arrays = load_file(str(path))
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}, meta


# ------------------------------------------------------------------------------------------- table
def write_table(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the RS-SQED table as CSV (columns :data:`TABLE_COLUMNS`, then those of
    :data:`OPTIONAL_COLUMNS` that any row has; empty where a row has none), atomically."""
    columns = [*TABLE_COLUMNS, *(k for k in OPTIONAL_COLUMNS if any(k in r for r in rows))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if k not in r else f"{r[k]:.8g}" if k in _FLOATS else r[k]) for k in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def _parse(column: str, value: str) -> Any:
    if column in OPTIONAL_COLUMNS and value == "":
        return math.nan
    return float(value) if column in _FLOATS else int(value) if column in _INTS else value


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the RS-SQED table: a list of row dicts with numbers as numbers."""
    path = Path(path)
    if not path.is_file():
        raise RSSQAError(f"{path}: RS-SQED table not found; run the sqed stage first")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = set(TABLE_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise RSSQAError(f"{path}: columns {sorted(missing)} missing")
        rows = []
        for line, r in enumerate(reader, start=2):
            try:
                rows.append(
                    {k: _parse(k, v) for k, v in r.items() if k}
                )
            except ValueError as e:
                raise RSSQAError(f"{path}: line {line}: {e}") from None
    return rows


# ----------------------------------------------------------------------------------------- summary
def winners(rows: Sequence[Mapping[str, Any]]) -> tuple[Counter, int]:
    """Per method, the number of images on which it has the best OA (ties count for each).

    Returns:
        (method -> images won, number of images).
    """
    by_image: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_image[r["key"]][r["method"]] = float(r["oa"])
    wins: Counter = Counter()
    for oas in by_image.values():
        best = max(oas.values())
        wins.update(m for m, v in oas.items() if v >= best - _TIE)
    return wins, len(by_image)


def oa_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The RS-SQED figures of shared/DESIGN.md from table rows.

    Returns:
        n_images, n_methods, n_rows, oa_mean, oa_std (population, over rows), per_method_oa,
        per_source_oa, best_method (the most frequent winner), best_method_share (share of images on
        which it is best), wins (images won per method), n_images_per_split.
    """
    if not rows:
        raise RSSQAError("RS-SQED: no rows")
    oa = np.array([r["oa"] for r in rows], float)
    by = lambda col: {  # noqa: E731
        k: float(np.mean([r["oa"] for r in rows if r[col] == k])) for k in sorted({r[col] for r in rows})
    }
    wins, n_images = winners(rows)
    best, n_best = max(sorted(wins.items()), key=lambda kv: kv[1])
    split_images = Counter(split for _, split in {(r["key"], r["split"]) for r in rows})
    return {
        "n_images": n_images,
        "n_methods": len({r["method"] for r in rows}),
        "n_rows": len(rows),
        "oa_mean": float(oa.mean()),
        "oa_std": float(oa.std()),
        "per_method_oa": by("method"),
        "per_source_oa": by("source"),
        "best_method": best,
        "best_method_share": n_best / n_images,
        "wins": dict(sorted(wins.items())),
        "n_images_per_split": dict(sorted(split_images.items())),
    }


def plot_oa(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Box plots of OA per method and per source, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for ax, col in zip(axes, ("method", "source"), strict=True):
        keys = sorted({r[col] for r in rows})
        data = [[r["oa"] for r in rows if r[col] == k] for k in keys]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(keys) + 1), keys, rotation=30, ha="right")
        ax.set_ylabel("OA per image")
        ax.set_title(f"OA by {col} ({len(rows)} rows; box: quartiles, triangle: mean)")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ reader
class SQED:
    """Read access to a finished RS-SQED folder.

    Args:
        folder: the sqed run folder (holding ``table.csv``).

    Attributes:
        rows: table rows (dicts with :data:`TABLE_COLUMNS`).
        sources: source names, sorted.
        methods: method names, sorted.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.rows = read_table(self.folder / TABLE)
        self.sources = sorted({r["source"] for r in self.rows})
        self.methods = sorted({r["method"] for r in self.rows})
        self._shards: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        self._images: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """One table column as an array (for ``rows``, default all)."""
        idx = range(len(self.rows)) if rows is None else rows
        return np.array([self.rows[i][name] for i in idx])

    def split(self, name: str) -> list[int]:
        """Row indices of split ``name`` (``train``, ``val``, ``test``)."""
        return [i for i, r in enumerate(self.rows) if r["split"] == name]

    def shard(self, source: str, method: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metadata of one label shard (read once, then kept)."""
        rel = f"features/{source}/{method}.safetensors"
        if rel not in self._shards:
            self._shards[rel] = read_label_shard(self.folder / rel)
        return self._shards[rel]

    def agreement(self, source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Arrays and metadata of the agreement between ``source``'s methods (``<method>/agree_maps``,
        ``<method>/agree_global`` in pool row order), or ``None`` where the stage computed none."""
        rel = f"features/{source}/{AGREEMENT}"
        if rel not in self._shards:
            if not (self.folder / rel).is_file():
                return None
            self._shards[rel] = read_label_shard(self.folder / rel)
        return self._shards[rel]

    def features(self, row: int) -> dict[str, np.ndarray]:
        """Every cached array of one row (one image labelled by one method)."""
        r = self.rows[row]
        arrays, _ = self.shard(r["source"], r["method"])
        return {k: v[r["feature_row"]] for k, v in arrays.items()}

    def gather(self, rows: Sequence[int], name: str) -> np.ndarray:
        """Array ``name`` for many rows, stacked (shapes must agree: e.g. ``hist_conf``, ``maps``)."""
        out = []
        for i in rows:
            r = self.rows[i]
            out.append(self.shard(r["source"], r["method"])[0][name][r["feature_row"]])
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise RSSQAError(f"RS-SQED: {name!r} has shapes {sorted(shapes)} across rows; gather per method")
        return np.stack(out) if out else np.empty((0,))

    def _pool_array(self, source: str, name: str) -> np.ndarray:
        key = f"{source}/{name}"
        if key not in self._images:
            path = self.folder / "pool" / source / f"{name}.npy"
            if not path.is_file():
                raise RSSQAError(f"{path}: pool {name} not found")
            self._images[key] = np.load(path, mmap_mode="r")
        return self._images[key]

    def images(self, source: str) -> np.ndarray:
        """The pool images of ``source``, ``N×H×W×3`` uint8 (memory-mapped)."""
        return self._pool_array(source, "images")

    def masks(self, source: str) -> np.ndarray:
        """The ground truth of the pool images of ``source``, ``N×H×W`` uint8, 255 = ignore (memory-mapped)."""
        return self._pool_array(source, "masks")

    def image(self, row: int) -> np.ndarray:
        """The image of one row, ``H×W×3`` uint8."""
        r = self.rows[row]
        return np.asarray(self.images(r["source"])[r["image_row"]])

    def mask(self, row: int) -> np.ndarray:
        """The ground-truth mask of one row's image, ``H×W`` uint8 (255 = ignore)."""
        r = self.rows[row]
        return np.asarray(self.masks(r["source"])[r["image_row"]])

    def pool(self, source: str) -> dict[str, Any]:
        """``pool/<source>/samples.json``: image ids, groups, splits, files and windows, class names, and
        ``read`` (``{"scale": factor}``, ``"gsd"`` as read where known) for files resampled on read."""
        path = self.folder / "pool" / source / "samples.json"
        if not path.is_file():
            raise RSSQAError(f"{path}: not found")
        return json.loads(path.read_text())

    def checkpoint(self, source: str, method: str) -> Path:
        """The trained method's checkpoint (load with ``rssqa.tasks.sqed.load_segmenter``)."""
        path = self.folder / "methods" / source / method / "final.ckpt"
        if not path.is_file():
            raise RSSQAError(f"{path}: checkpoint not found")
        return path
