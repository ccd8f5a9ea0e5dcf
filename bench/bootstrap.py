"""The sqa stage's comparison tables: many paired bootstraps on one test set, pair by pair against one
set of draws for every pair (``rssqa.metrics.PairedBootstrap``), interleaved in one process.

A demo-sized test split (192 images x 8 methods) and 16 scores; as the sqa stage does, three of them
(RS-SQA, the agreement model, the error map) are each compared with every other score, SRCC and PLCC
with 1000 draws over images. The reference bootstraps each pair from scratch (``paired_bootstrap``: the
draws, then both scores' correlations over them); the contender draws once and computes each score's
correlations once. Both give the same numbers, checked here and in ``tests/test_metrics.py``; the
table gives seconds per comparison table and their ratio (about 6 minutes with three repeats here).

Usage: ``python -m bench.bootstrap --out runs/bench/bootstrap.json [--threads 1] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from bench.common import median, time_runs, write_report
from rssqa import metrics

IMAGES, METHODS, SCORES, REFERENCES = 192, 8, 16, 3


def _pairs() -> list[tuple[int, int]]:
    return [(r, k) for r in range(REFERENCES) for k in range(SCORES) if k != r]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/bootstrap.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(IMAGES), METHODS)
    oa = rng.uniform(0.2, 0.9, len(images))
    scores = [oa + rng.normal(0, s, len(oa)) for s in np.linspace(0.05, 0.4, SCORES)]
    pairs = _pairs()

    def per_pair() -> list[dict]:
        return [metrics.paired_bootstrap(scores[a], scores[b], oa, images) for a, b in pairs]

    def one_set() -> list[dict]:
        boot = metrics.PairedBootstrap(oa, images)
        return [boot.compare(scores[a], scores[b]) for a, b in pairs]

    if per_pair() != one_set():
        raise SystemExit("bench.bootstrap: the two computations disagree")
    rates = time_runs({"per_pair": lambda: len(per_pair()), "one_set": lambda: len(one_set())}, args.repeats)  # pairs/s
    seconds = {k: [len(pairs) / r for r in v] for k, v in rates.items()}  # seconds per comparison table
    ratio = statistics.median(seconds["per_pair"]) / statistics.median(seconds["one_set"])
    write_report(
        args.out, "bootstrap",
        {"pairs": len(pairs), "rows": len(oa), "threads": args.threads, "repeats": args.repeats,
         "seconds_per_table": seconds, "ratio": round(ratio, 2)},
        [("pair by pair", f"{median(seconds['per_pair'])} s", f"per table ({len(pairs)} pairs, {len(oa)} rows, 1000 draws)"),
         ("one set of draws", f"{median(seconds['one_set'])} s", "per table (the same numbers)"),
         ("ratio", f"{ratio:.2f}x", f"median of {args.repeats}, interleaved, {args.threads} thread(s)")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
