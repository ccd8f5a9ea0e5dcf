"""The price of quality assessment: ``rssqa recommend`` over eight methods against the eight segmenters alone.

Both contenders run in one process, interleaved, on the same images with the same batch size. The
reference segments every image with every method (forward, softmax, argmax: what a user runs
anyway); ``recommend`` does that through :meth:`Segmenter.describe` (statistics and pooled
features), plus CLIP-RS once per image and the quality head per method, then ranks. The ratio of
their times is the overhead (aim: at most 1.3x).

``--whole SIDE`` also times whole images larger than the tiles, one at a time, each as one input
(``rssqa recommend --whole a.jpg``): the scorer's forward batch for their size (:meth:`Scorer.rows_for`)
against the fixed batch of ``chunk`` rows padded with blank copies that it used before, beside the
segmenters alone on one image.

By default the models are untrained stand-ins of the demo profile's sizes (the eight methods at tiny
size, ``rs-tiny`` CLIP, the demo head): a trained model costs the same. ``--scorer`` times a trained
scorer folder on its own RS-SQED pool images instead.

Usage: ``python -m bench.score --out runs/bench/score.json [--scorer runs/demo/sqa/scorer]``
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from bench.common import median, time_runs, write_report
from rssqa.scorer import Scorer

TARGET = 1.3


def stand_in(size: int, chunk: int) -> tuple[Scorer, str]:
    """An untrained scorer with the demo profile's shapes (weights do not change the cost)."""
    from rssqa.models.clip import create_clip
    from rssqa.models.quality_inputs import segmentation_input_dims
    from rssqa.models.segmenters import build_segmenter, list_methods
    from rssqa.models.sqa import RSSQA

    torch.manual_seed(0)
    segmenters = {m: build_segmenter(m, num_classes=6, grid=4, hist_bins=20).eval() for m in list_methods()}
    clip, *_ = create_clip("rs-tiny")
    layers = ("encoder", "decoder")
    shapes = {m: s.feature_shapes(size) for m, s in segmenters.items()}
    feat_dim = max(sum(sh[f"feat/{k}"][0] for k in layers) for sh in shapes.values())
    cells, glob = segmentation_input_dims(layers, 20, 8)
    kw = dict(grid=4, width=64, hidden=64, methods=list(segmenters), feat_dim=feat_dim)
    head, agree = RSSQA(128, 128, cells, glob, **kw), RSSQA(128, 128, cells, glob, agreement=True, agreement_skip=True, **kw)
    scorer = Scorer.from_parts(head, clip, segmenters, layers, chunk=chunk, source="world", agreement_model=agree, tile=size)
    return scorer, "world"


def pool_images(scorer: Scorer, source: str, n: int) -> np.ndarray:
    """``n`` pool images of ``source`` from the RS-SQED a trained scorer was made from (cycled if fewer)."""
    ckpt = scorer.folder / scorer.config["checkpoints"][source][scorer.methods(source)[0]]
    pool = np.load(ckpt.parents[3] / "pool" / source / "images.npy", mmap_mode="r")  # sqed/methods/<s>/<m>/final.ckpt
    return np.ascontiguousarray(pool[np.arange(n) % len(pool)])


@torch.no_grad()
def segment_alone(segmenters: list, images: np.ndarray, chunk: int) -> int:
    """Every method segments every image (forward, softmax, argmax), ``chunk`` images at a time."""
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start : start + chunk]).permute(0, 3, 1, 2).float().div_(255.0)
        for seg in segmenters:
            seg(x).softmax(1).argmax(1)
    return len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/score.json")
    ap.add_argument("--scorer", default=None, help="a trained scorer folder (default: untrained stand-ins)")
    ap.add_argument("--source", default=None, help="with --scorer: whose methods (default: the first)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=96, help="stand-in tile side in pixels (the demo profile's)")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole", type=int, default=384, help="side of the whole images also timed one at a time (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.scorer:
        scorer = Scorer.load(args.scorer, chunk=args.chunk)
        source = args.source or scorer.sources[0]
        images = pool_images(scorer, source, args.images)
    else:
        from rssqa.world import sample_scenes

        scorer, source = stand_in(args.size, args.chunk)
        images = sample_scenes(args.images, args.size, seed=0)[0]
    methods = scorer.methods(source)
    segmenters = [scorer.method(m, source).segmenter for m in methods]
    # with an agreement head (and >= 3 methods) recommend ranks by it: agreement between all methods
    recommend = lambda: len(scorer.recommend(list(images), methods, source))  # noqa: E731
    paper = lambda: len(scorer.score(list(images), methods, source, agreement=False))  # noqa: E731
    alone = lambda: segment_alone(segmenters, images, scorer.chunk)  # noqa: E731
    recommend(), paper(), alone()  # warm-up: lazy initialisation, allocator
    rates = time_runs({"segmenters_alone": alone, "recommend": recommend, "paper_head": paper}, args.repeats)
    if args.whole:
        whole, whole_diff = whole_images(scorer, source, methods, segmenters, args.whole, args.repeats)
        rates.update(whole)
    med = {k: median(v) for k, v in rates.items()}
    ratio = round(med["segmenters_alone"] / med["recommend"], 3)
    results = {
        "images_per_s": med,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "n_images": len(images),
        "image_size": list(images.shape[1:3]),
        "methods": methods,
        "chunk": scorer.chunk,
        "agreement_head": scorer.agreement_model is not None,
        "paper_head_ratio": round(med["segmenters_alone"] / med["paper_head"], 3),
        "scorer": args.scorer or "untrained stand-ins (demo shapes)",
        "runs": rates,
    }
    rows = []
    exact = {k: statistics.median(v) for k, v in rates.items()}  # the ratios of slow rates, unrounded
    if args.whole:
        results["whole"] = {
            "side": args.whole, "rows": scorer.rows_for((args.whole, args.whole)),
            "speedup_over_padded": round(exact["whole_recommend"] / exact["whole_recommend_padded"], 2),
            "ratio": round(exact["whole_segmenters_alone"] / exact["whole_recommend"], 3),
            "max_score_difference": whole_diff,  # the two ways' scores of the same images
        }  # fmt: skip
        rows = [
            (f"whole {args.whole} px images, one at a time: segmenters alone", f"{exact['whole_segmenters_alone']:.3f} img/s", ""),
            ("rssqa recommend, forward batch for their size", f"{exact['whole_recommend']:.3f} img/s",
             f"{results['whole']['ratio']:.2f}x the segmenters alone"),
            (f"rssqa recommend, padded to {scorer.chunk} rows (before)", f"{exact['whole_recommend_padded']:.3f} img/s",
             f"{results['whole']['speedup_over_padded']:.1f}x slower than the above"),
        ]
    write_report(
        args.out,
        f"rssqa recommend vs the {len(methods)} segmenters alone, {images.shape[1]} px, one core (median of {args.repeats})",
        results,
        [
            ("segmenters alone", f"{med['segmenters_alone']:.1f} img/s", f"{len(methods)} methods: forward, softmax, argmax"),
            ("rssqa recommend", f"{med['recommend']:.1f} img/s",
             "the same + statistics, agreement between the methods, CLIP-RS once per image, head, ranking"),
            ("paper head (score, no agreement)", f"{med['paper_head']:.1f} img/s",
             f"{results['paper_head_ratio']:.2f}x the segmenters alone"),
            ("ratio", f"{ratio:.2f}x", f"time of recommend / segmenters alone (target <= {TARGET}x)"),
            *rows,
        ],
    )


def whole_images(
    scorer: Scorer, source: str, methods: list[str], segmenters: list, side: int, repeats: int
) -> tuple[dict[str, list[float]], float]:
    """Images per second on two whole ``side`` px images, one call each: the segmenters alone, ``recommend``
    with the forward batch for their size, and ``recommend`` padded to ``chunk`` rows; and the largest
    difference between the two ways' scores."""
    import dataclasses

    from rssqa.world import sample_scenes

    big = sample_scenes(2, side, seed=1)[0]
    sized = scorer.quality_inputs
    padded = dataclasses.replace(sized, tile_pixels=None)  # no pixel budget: every batch padded to chunk rows

    def run(inputs, fn):
        scorer.quality_inputs = inputs
        try:
            return [fn(im) for im in big]
        finally:
            scorer.quality_inputs = sized

    def score(im):
        return scorer.score([im], methods, source, tiles=False)

    diff = max(float(np.abs(a - b).max()) for a, b in zip(*(run(q, score) for q in (sized, padded)), strict=True))
    rates = time_runs({
        "whole_segmenters_alone": lambda: sum(segment_alone(segmenters, im[None], 1) for im in big),
        "whole_recommend": lambda: len(run(sized, lambda im: scorer.recommend([im], methods, source, tiles=False))),
        "whole_recommend_padded": lambda: len(run(padded, lambda im: scorer.recommend([im], methods, source, tiles=False))),
    }, repeats)  # fmt: skip
    return rates, diff


if __name__ == "__main__":
    main()
