"""The sqa stage's comparison tables: many paired bootstraps on one test set (``rssqa.metrics.PairedBootstrap``:
one set of draws for every pair, each score's correlations over them computed once), with each score's SRCC
over the draws from torchmetrics' ``spearman_corrcoef`` (which ranks the draws column by column, the
target's again for every score) against the same SRCC from ranks made in one pass per score (the target's
once), interleaved in one process.

A demo-sized test split (192 images x 8 methods) and 16 scores, two of them tied (one score per image, as
``image_only`` gives, and a rounded one); as the sqa stage does, three of them (RS-SQA, the agreement model,
the error map) are each compared with every other score, SRCC and PLCC with 1000 draws over images. Both
give the same numbers to the last bit, checked here and in ``tests/test_metrics.py``; the table gives
seconds per comparison table and their ratio.

Usage: ``python -m bench.bootstrap --out runs/bench/bootstrap.json [--threads 1] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torchmetrics.functional import spearman_corrcoef

from bench.common import median, time_runs, write_report
from rssqa import metrics

IMAGES, METHODS, SCORES, REFERENCES = 192, 8, 16, 3


def _pairs() -> list[tuple[int, int]]:
    return [(r, k) for r in range(REFERENCES) for k in range(SCORES) if k != r]


class _ColumnByColumn(metrics.PairedBootstrap):
    """The reference: each score's SRCC over the draws from torchmetrics' ``spearman_corrcoef``."""

    def _spearman(self, drawn: np.ndarray) -> torch.Tensor:
        return spearman_corrcoef(torch.from_numpy(drawn), self._tt)


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
    scores = [oa + rng.normal(0, s, len(oa)) for s in np.linspace(0.05, 0.4, SCORES - 2)]
    scores += [np.repeat(rng.uniform(size=IMAGES), METHODS), np.round(scores[3], 1)]  # tied scores
    pairs = _pairs()

    def table(kind: type[metrics.PairedBootstrap]) -> list[dict]:
        boot = kind(oa, images)
        return [boot.compare(scores[a], scores[b]) for a, b in pairs]

    if table(_ColumnByColumn) != table(metrics.PairedBootstrap):
        raise SystemExit("bench.bootstrap: the two computations disagree")
    runs = {"column_by_column": lambda: len(table(_ColumnByColumn)), "one_pass": lambda: len(table(metrics.PairedBootstrap))}
    rates = time_runs(runs, args.repeats)  # pairs/s
    seconds = {k: [len(pairs) / r for r in v] for k, v in rates.items()}  # seconds per comparison table
    ratio = statistics.median(seconds["column_by_column"]) / statistics.median(seconds["one_pass"])
    write_report(
        args.out, "bootstrap",
        {"pairs": len(pairs), "rows": len(oa), "threads": args.threads, "repeats": args.repeats,
         "seconds_per_table": seconds, "ratio": round(ratio, 2)},
        [("SRCC ranked column by column (torchmetrics)", f"{median(seconds['column_by_column'])} s",
          f"per table ({len(pairs)} pairs, {len(oa)} rows, 1000 draws)"),
         ("SRCC ranked in one pass", f"{median(seconds['one_pass'])} s", "per table (the same numbers)"),
         ("ratio", f"{ratio:.2f}x", f"median of {args.repeats}, interleaved, {args.threads} thread(s)")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
