"""``quicklook.png``: a scene and its four layers side by side."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.data.segsets.rasters import to_8bit
from rssqa.scene.common import METHOD_COLOURS, _rasterio


def _small(path: Path, side: int, bands: Any = 1, nearest: bool = True) -> np.ndarray:
    """``path``'s ``bands`` read at about ``side`` px on the longer side (from its overviews, where it has them)."""
    from rasterio.enums import Resampling

    with _rasterio().open(path) as d:
        f = max(d.width, d.height) / side
        shape = (max(1, round(d.height / f)), max(1, round(d.width / f)))
        return d.read(bands, out_shape=shape if isinstance(bands, int) else (len(bands), *shape),
                      resampling=Resampling.nearest if nearest else Resampling.average)  # fmt: skip


def scene_rgb(scene: Path, bands: Sequence[int] | None = None, rescale: tuple[float, float] | None = None, side: int = 512) -> np.ndarray:
    """The scene panel, ``h×w×3`` uint8: the bands the methods read (``bands``, 1-based red, green, blue;
    default the first three), converted to 8 bits as they are (``rescale``), at about ``side`` px."""
    with _rasterio().open(scene) as d:
        chosen = list(bands) if bands else [1, 2, 3] if d.count >= 3 else [1] * 3
    pixels = _small(scene, side, chosen)
    return to_8bit(pixels, rescale).astype(np.uint8, copy=False).transpose(1, 2, 0)


def quicklook(
    folder: Path, scene: Path, methods: Sequence[str], bands: Sequence[int] | None = None,
    rescale: tuple[float, float] | None = None, side: int = 512,
) -> str:
    """``quicklook.png``: the scene (its ``bands``, 8-bit by ``rescale``, as the methods read it) and the
    four layers side by side, read from their overviews."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rasterio = _rasterio()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    with contextlib.suppress(Exception):  # the scene panel is a courtesy: the layers are what matters
        axes[0].imshow(scene_rgb(scene, bands, rescale, side))
    axes[0].set_title("scene")
    q = np.ma.masked_less(_small(folder / "quality.tif", side, nearest=False), 0)
    im = axes[1].imshow(q, cmap="RdYlGn", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title("predicted OA (recommended method)")
    b = np.ma.masked_equal(_small(folder / "best_method.tif", side), 255)
    cmap = ListedColormap([np.array(c) / 255 for c in METHOD_COLOURS[: len(methods)]])
    axes[2].imshow(b, cmap=cmap, vmin=-0.5, vmax=len(methods) - 0.5, interpolation="nearest")
    axes[2].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=np.array(METHOD_COLOURS[i]) / 255) for i in range(len(methods))],
                   labels=list(methods), fontsize=6, loc="lower left")  # fmt: skip
    axes[2].set_title("recommended method")
    with rasterio.open(folder / "fused.tif") as d:
        try:
            cm = d.colormap(1)
            colours = ListedColormap([np.array(cm[i][:3]) / 255 for i in range(max(cm) + 1)]) if cm else "tab10"
            vmax = max(cm) if cm else 9
        except ValueError:
            colours, vmax = "tab10", 9
    axes[3].imshow(np.ma.masked_equal(_small(folder / "fused.tif", side), 255), cmap=colours, vmin=0, vmax=vmax, interpolation="nearest")
    axes[3].set_title("fused segmentation")
    e = np.ma.masked_less(_small(folder / "error.tif", side, nearest=False), 0)
    im = axes[4].imshow(e, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[4], fraction=0.046)
    axes[4].set_title("predicted error probability")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = folder / ".quicklook.png.tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, folder / "quicklook.png")
    return "quicklook.png"
