"""Score the embedded world's scenes with a scorer and measure the maps against their truth.

``python stages/scenes.py --scorer runs/demo/sqa/scorer --index runs/demo/world/scenes/scenes.json --out runs/demo/scenes``
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rssqa.errors import RSSQAError
from rssqa.runs import is_done, write_summary
from rssqa.scene import score_scene_index
from rssqa.scorer import Scorer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scorer", required=True)
    ap.add_argument("--index", required=True, help="scenes.json of the world (or any scene index of that form)")
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
        scorer = args.scorer if args.workers > 1 else Scorer.load(args.scorer)
        result = score_scene_index(scorer, args.index, args.out, progress=True, workers=args.workers)
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
            print(f"  {what}: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
