"""World generation speed on one core: 128 px image + mask + caption per second (aim: >= 200).

Usage: ``python bench/world.py --out runs/bench/world.json``
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import median, time_runs, write_report
from rssqa.data.shards import encode_value
from rssqa.world import SOURCES, CorpusConfig, make_pair, make_tile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/world.json")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = CorpusConfig(image_size=args.size)
    spec = SOURCES["loveda"]
    state = {"i": 0}

    def pairs() -> int:  # image + mask (the scene's label map) + caption
        for _ in range(args.n):
            make_pair(0, "coarse", state["i"], cfg)
            state["i"] += 1
        return args.n

    def tiles() -> int:  # image + mask in a source's schema
        for _ in range(args.n):
            make_tile(0, spec, 2, state["i"], args.size)
            state["i"] += 1
        return args.n

    def encoded() -> int:  # pair generation plus encoding as written to shards
        for _ in range(args.n):
            s = make_pair(0, "coarse", state["i"], cfg)
            encode_value("jpg", s["jpg"]), encode_value("json", s["json"]), encode_value("txt", s["txt"])
            state["i"] += 1
        return args.n

    rates = time_runs({"pairs": pairs, "tiles": tiles, "pairs+encode": encoded}, args.repeats)
    med = {k: median(v) for k, v in rates.items()}
    results = {"image_size": args.size, "samples_per_s_per_core": med, "runs": rates, "target": 200,
               "meets_target": bool(med["pairs"] >= 200 and med["tiles"] >= 200)}  # fmt: skip
    write_report(
        args.out,
        f"world generation, {args.size} px, one core (median of {args.repeats})",
        results,
        [(k, f"{v:.1f}/s", "aim >= 200/s" if k != "pairs+encode" else "as written to shards") for k, v in med.items()],
    )
    np.testing.assert_(all(v > 0 for v in med.values()))


if __name__ == "__main__":
    main()
