"""Score whole scenes with a scorer and measure the maps against their truth: the embedded world's
scenes (``--index``), or the whole images of an RS-SQED split of real labelled data (``--sqed``).

``python stages/scenes.py --scorer runs/demo/sqa/scorer --index runs/demo/world/scenes/scenes.json --out runs/demo/scenes``
``python stages/scenes.py --scorer runs/dubai/sqa/scorer --sqed runs/dubai/sqed --data ../shared/data/dubai-aerial --out runs/dubai/scenes``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from rssqa.errors import RSSQAError
from rssqa.report_format import diff_text
from rssqa.runs import is_done, write_summary
from rssqa.scene import export_split_scenes, score_scene_index
from rssqa.scene.common import trained_tile
from rssqa.scorer import Scorer
from rssqa.scorer_folder import read_config


def _largest_tile(scorer: str) -> int:
    """The largest window a scorer folder reads over its sources (``scorer.json``; what a scene must hold)."""
    config = read_config(scorer)
    return max(trained_tile(config, s) or 1 for s in list(config.get("image_sizes") or {}) or [None])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scorer", required=True)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="scenes.json of the world (or any scene index of that form)")
    where.add_argument("--sqed", help="an RS-SQED folder: score the whole images of its --split (written under OUT/inputs)")
    ap.add_argument("--data", default=None, help="with --sqed: the base of its relative source roots (the sqed stage's)")
    ap.add_argument("--split", default="test", help="with --sqed: which split's images (default test)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (one process)")
    ap.add_argument("--workers", type=int, default=1, help="scenes side by side, one one-thread process each")
    ap.add_argument("--force", action="store_true", help="rerun even when --out holds a finished run")
    args = ap.parse_args(argv)
    if is_done(args.out) and not args.force:
        print(f"{args.out}: already done (summary.json present); pass --force to rerun")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        index, exported = args.index, None
        if args.sqed:
            tile = _largest_tile(args.scorer)
            data = args.data if args.data is not None else str(Path(args.sqed).parent)
            index, exported = export_split_scenes(args.sqed, data, Path(args.out) / "inputs", args.split, min_side=tile)
            print(f"scenes: {exported['scenes']} whole {args.split} images of {args.sqed} as scenes "
                  f"({len(exported['skipped'])} skipped)", flush=True)  # fmt: skip
        scorer = args.scorer if args.workers > 1 else Scorer.load(args.scorer)
        result = score_scene_index(scorer, index, args.out, progress=True, workers=args.workers)
        if exported is not None:
            result["inputs"] = {"sqed": args.sqed, "split": args.split, **exported}
    except RSSQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_summary(args.out, result)
    ov = result["overall"]
    print(f"scenes -> {args.out}: {ov['n_scenes']} scenes in {result['seconds']} s; fused map vs the best single method: "
          f"{ov.get('fused_ahead', 0)} ahead, {ov.get('fused_tie', 0)} tie, {ov.get('fused_behind', 0)} behind")  # fmt: skip
    pooled = ov.get("pooled") or {}
    for what, d in (("fused minus each scene's best single method, mean", pooled.get("fused_minus_best_single")),
                    ("error map AUROC minus the best per-pixel baseline, all pixels", pooled.get("error_auroc_margin"))):  # fmt: skip
        if d:
            print(f"  {what}: {diff_text(d)}")
    cov = ov.get("mean_interval_coverage")
    if cov:
        print(f"  a scene's true OA inside the band of its mean predicted OA: {cov['inside']} of {cov['of']} (scene, method) pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
