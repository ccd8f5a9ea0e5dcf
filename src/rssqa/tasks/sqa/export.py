"""Export the trained quality head as a scorer folder (the format :mod:`rssqa.scorer` reads)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import PixelErrorHead
from rssqa.scorer_folder import AGREEMENT_WEIGHTS, CONFIG, FORMAT, PIXEL_WEIGHTS, RANKING_WEIGHTS, WEIGHTS
from rssqa.tasks.sqa.data import SQADataModule
from rssqa.tasks.sqa.task import SQATask


def _weights(task: SQATask) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in task.model.state_dict().items()}


def _rel(path: str | os.PathLike, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start.resolve())


def _image_sizes(data: SQADataModule) -> dict[str, Any]:
    """``image_sizes`` (source -> ``[H, W]`` of its RS-SQED pool images, the tiles the heads were trained
    on) and ``image_size``, that size where every source has the same (else ``None``)."""
    sizes = {s: [int(v) for v in data.sqed.images(s).shape[1:3]] for s in sorted(set(data.source_of.tolist()))}
    one = {tuple(v) for v in sizes.values()}
    return {"image_size": list(one.pop()) if len(one) == 1 else None, "image_sizes": sizes}


def _pool_records(data: SQADataModule) -> dict[str, dict[str, Any]]:
    """From each source's pool metadata (``samples.json``, read once): ``classes``, the class names of its
    masks (``rssqa scene`` names the fused map's classes with them), and ``read``, for the sources whose files
    the sqed stage did not read as three 8-bit bands as they are, how (``"scale"``, ``"gsd"`` as read where
    known, ``"bands"``, ``"rescale"``; :meth:`rssqa.data.segsets.SegSource.reading`), so that ``rssqa score``
    / ``recommend`` / ``scene`` read new images the same way. An RS-SQED without pool metadata: classes unnamed, nothing on reading."""
    classes, read = {}, {}
    for s in sorted(set(data.source_of.tolist())):
        try:
            pool = data.sqed.pool(s)
        except RSSQAError:
            pool = {}
        classes[s] = {"names": list(pool.get("classes") or [])}
        if pool.get("read"):
            read[s] = {k: v if isinstance(v, list) else float(v) for k, v in pool["read"].items()}
    return {"classes": classes, "read": read}


def export_scorer(
    task: SQATask,
    data: SQADataModule,
    out_dir: str | os.PathLike,
    best_fixed: str | None = None,
    agreement: SQATask | None = None,
    ranking: SQATask | None = None,
    pixel: PixelErrorHead | None = None,
    policy: dict[str, Any] | None = None,
    intervals: dict[str, Any] | None = None,
) -> Path:
    """Write the trained head and everything needed to run it as a scorer folder, atomically.

    Args:
        task: the trained (best validation) RS-SQA task.
        data: its data module (CLIP path and fingerprint, layers, RS-SQED folder, methods).
        out_dir: the scorer folder; replaced if it exists.
        best_fixed: the method best on the train split (recorded for reports).
        agreement: the trained RS-SQA with agreement between methods, exported beside the paper's
            head (``agreement_model`` in ``scorer.json``, weights in ``scorer_agreement.safetensors``).
        ranking: the agreement model trained for recommendation (``ranking_model``,
            ``scorer_ranking.safetensors``).
        pixel: the trained pixel error head (``pixel_model`` in ``scorer.json``, its weights, input
            standardisation included, in ``scorer_pixel.safetensors``).
        policy: what ``rssqa recommend`` does (``recommend_policy``: ``policy`` ``model`` or ``fixed``, the
            recommending ``model``, the fixed ``method``, ``val_vs_best_fixed``; :mod:`rssqa.recommend`).
        intervals: per head (``model``, ``agreement_model``, ``ranking_model``), the interval offsets of its
            predicted OA measured on the val split (:func:`rssqa.intervals.fit`).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sem = data.sem["clip_rs"]
    checkpoints: dict[str, dict[str, str]] = {}
    for source in sorted(set(data.source_of.tolist())):
        checkpoints[source] = {}
        for method in data.methods:
            path = data.sqed.folder / "methods" / source / method / "final.ckpt"
            if path.is_file():
                checkpoints[source][method] = _rel(path, out_dir)
    config = {
        "format": FORMAT,
        "model": task.model_kwargs(),
        "layers": list(data.hparams.layers),
        "max_classes": data.hparams.max_classes,
        "grid": data.grid,
        "hist_bins": data.hist_bins,
        "clip": {
            "path": _rel(sem["path"], out_dir),
            "fingerprint": sem["fingerprint"],
            "embed_dim": int(sem["embed"].shape[1]),
            "token_dim": int(sem["tokens"].shape[1]),
        },
        "chunk": data.hparams.clip_chunk,
        "seg_chunk": data.seg_chunk,
        "methods": list(data.methods),
        "checkpoints": checkpoints,
        "best_fixed_method": best_fixed,
        **({"recommend_policy": policy} if policy else {}),
        **({"intervals": intervals} if intervals else {}),
        **_image_sizes(data),
        **_pool_records(data),
    }
    if agreement is not None:
        config["agreement_model"] = agreement.model_kwargs()
        save_file(_weights(agreement), str(tmp / AGREEMENT_WEIGHTS))
    if ranking is not None:
        config["ranking_model"] = ranking.model_kwargs()
        save_file(_weights(ranking), str(tmp / RANKING_WEIGHTS))
    if pixel is not None:
        config["pixel_model"] = pixel.kwargs
        save_file({k: v.detach().cpu().contiguous() for k, v in pixel.state_dict().items()}, str(tmp / PIXEL_WEIGHTS))
    save_file(_weights(task), str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
