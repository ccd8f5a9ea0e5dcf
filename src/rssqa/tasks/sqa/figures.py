"""Figures of the sqa stage: predicted against true OA, the CLIP-RS embedding, the comparison."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rssqa import metrics
from rssqa.runs import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_scatter(pred: np.ndarray, oa: np.ndarray, groups: Sequence[str], path: Path, title: str = "") -> Path:
    """Predicted score against true OA, one colour per group (method), with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    groups = np.asarray(groups)
    for g in sorted(set(groups.tolist())):
        m = groups == g
        ax.scatter(oa[m], pred[m], s=10, alpha=0.7, label=g)
    lo, hi = float(min(oa.min(), pred.min())), float(max(oa.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel("true OA")
    ax.set_ylabel("predicted quality")
    ax.set_title(f"{title}: SRCC {metrics.srcc(pred, oa):.3f}, PLCC {metrics.plcc(pred, oa):.3f}")
    ax.legend(fontsize=7, markerscale=1.5, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` (``N×D``) on their first two principal axes (exact SVD, sign-fixed)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2, :1] + 1e-12)  # a deterministic orientation
    return x @ axes.T


def plot_embedding(embed: np.ndarray, oa: np.ndarray, path: Path, groups: Sequence[str] | None = None) -> Path:
    """2-D PCA of CLIP-RS image embeddings coloured by mean OA over methods (one marker per source)."""
    plt = _pyplot()
    xy = pca_2d(embed)
    fig, ax = plt.subplots(figsize=(6, 5))
    groups = np.asarray(groups if groups is not None else ["images"] * len(xy))
    markers = "osD^v<>p*h"
    sc = None
    for i, g in enumerate(sorted(set(groups.tolist()))):
        m = groups == g
        sc = ax.scatter(xy[m, 0], xy[m, 1], c=oa[m], cmap="viridis", vmin=float(oa.min()), vmax=float(oa.max()),
                        s=14, marker=markers[i % len(markers)], label=g)
    fig.colorbar(sc, ax=ax, label="mean OA over methods")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("CLIP-RS image features")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(table: dict[str, Any], test: dict[str, Any], path: Path) -> Path:
    """Bar chart of test SRCC and PLCC: RS-SQA against every baseline and ablation."""
    plt = _pyplot()
    entries = {"RS-SQA": test, **{k: v for k, v in table.items() if v}}
    names = list(entries)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 4))
    x = np.arange(len(names))
    for j, key in enumerate(("srcc", "plcc")):
        vals = [entries[n][key] if entries[n][key] is not None else 0.0 for n in names]
        ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, label=key.upper())
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("correlation with OA (test)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
