"""Benchmark: ``rssqa recommend`` over the eight methods against running the eight segmenters alone.

    python bench/score.py --scorer runs/smoke/sqa/scorer --source vaihingen --images 64

Both sides run in one process on the same images with the same batch size: the baseline segments
every image with every method (forward, softmax, argmax: what a user does anyway); the scorer does
that too, plus CLIP-RS once per image, the per-method statistics and the quality head. The ratio is
the price of quality assessment on top of segmentation (aim: at most 1.3x). Writes
``runs/bench/score.json`` and ``runs/bench/score.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _images(scorer, source: str, n: int) -> np.ndarray:
    """``n`` pool images of ``source`` from the RS-SQED the scorer was trained on (cycled if fewer)."""
    ckpt = Path(scorer.folder) / scorer.config["checkpoints"][source][scorer.methods(source)[0]]
    sqed = ckpt.parents[3]  # .../sqed/methods/<source>/<method>/final.ckpt
    pool = np.load(sqed / "pool" / source / "images.npy", mmap_mode="r")
    idx = np.arange(n) % len(pool)
    return np.ascontiguousarray(pool[idx])


@torch.no_grad()
def segment_alone(segmenters: list, images: np.ndarray, chunk: int) -> None:
    """Every method segments every image (forward + softmax + argmax), in batches of ``chunk``."""
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start : start + chunk]).permute(0, 3, 1, 2).float().div_(255.0)
        for seg in segmenters:
            seg(x).softmax(1).argmax(1)


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: lazy init, allocator, first-call dispatch
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scorer", default="runs/smoke/sqa/scorer")
    p.add_argument("--source", default=None, help="default: the scorer's first source")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rssqa.scorer import Scorer

    scorer = Scorer.load(args.scorer)
    source = args.source or scorer.sources[0]
    methods = scorer.methods(source)
    images = _images(scorer, source, args.images)
    segmenters = [scorer.method(m, source).segmenter for m in methods]
    chunk = scorer.chunk

    seg_times = _time(lambda: segment_alone(segmenters, images, chunk), args.repeats)
    rec_times = _time(lambda: scorer.recommend(list(images), methods, source), args.repeats)
    t_seg, t_rec = statistics.median(seg_times), statistics.median(rec_times)
    result = {
        "scorer": str(args.scorer),
        "source": source,
        "methods": methods,
        "n_images": len(images),
        "image_size": list(images.shape[1:3]),
        "chunk": chunk,
        "threads": args.threads,
        "repeats": args.repeats,
        "segmenters_alone_s": t_seg,
        "recommend_s": t_rec,
        "ratio": t_rec / t_seg,
        "segmenters_alone_images_per_s": len(images) / t_seg,
        "recommend_images_per_s": len(images) / t_rec,
        "all_times": {"segmenters_alone": seg_times, "recommend": rec_times},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"| what | seconds (median of {args.repeats}) | images/s |\n|---|---|---|\n"
        + f"| 8 segmenters alone | {t_seg:.3f} | {len(images) / t_seg:.1f} |\n"
        + f"| rssqa recommend (8 methods) | {t_rec:.3f} | {len(images) / t_rec:.1f} |\n"
        + f"\nratio recommend / segmenters alone: **{t_rec / t_seg:.2f}x** "
        + f"({len(images)} images of {images.shape[1]}x{images.shape[2]} px, {source}, chunk {chunk}, {args.threads} thread(s))\n"
    )
    (out / "score.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - one line for a benchmark run by make
        from rssqa.errors import RSSQAError

        if isinstance(e, RSSQAError):
            sys.exit(f"error: {e}")
        raise
