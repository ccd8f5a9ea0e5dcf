"""Shard reading: the rssqa pipeline (decode off) against plain tar iteration over the same shards.

Aim: the pipeline reads at >= 0.8 of plain tar speed. Both read every member's bytes; the pipeline
also groups members into samples, checks for faults and splits by node and worker.
Usage: ``python bench/shards.py --out runs/bench/shards.json``
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path

import webdataset as wds

from bench.common import median, time_runs, write_report
from rssqa.data.shards import ShardWriter, list_shards, shard_pipeline
from rssqa.world import CorpusConfig, make_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/shards.json")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CorpusConfig(image_size=args.size)
        sample = make_pair(0, "coarse", 0, cfg)
        with ShardWriter(tmp, maxcount=500) as w:  # one rendered sample, re-keyed: reading cost is all we time
            for i in range(args.n):
                w.write({**sample, "__key__": f"c{i:08d}"})
        urls = list_shards(tmp)
        nbytes = sum(Path(u).stat().st_size for u in urls)

        def plain() -> int:
            n = 0
            for url in urls:
                with tarfile.open(url, mode="r|") as tar:
                    for m in tar:
                        tar.extractfile(m).read()
                        n += 1
            return n // 3

        def pipeline() -> int:
            return sum(1 for _ in shard_pipeline(urls, decode=False))

        def webdataset() -> int:
            return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))

        rates = time_runs({"plain_tar": plain, "rssqa_pipeline": pipeline, "webdataset": webdataset}, args.repeats)
    med = {k: median(v) for k, v in rates.items()}
    ratio = round(med["rssqa_pipeline"] / med["plain_tar"], 3)
    results = {"n_samples": args.n, "bytes": nbytes, "samples_per_s": med, "runs": rates,
               "pipeline_over_plain": ratio, "target": 0.8, "meets_target": ratio >= 0.8}  # fmt: skip
    write_report(
        args.out,
        f"shard reading, decode off, {args.n} samples of {args.size} px (median of {args.repeats})",
        results,
        [(k, f"{v:.0f}/s", "") for k, v in med.items()] + [("pipeline / plain tar", f"{ratio:.2f}", "aim >= 0.8")],
    )


if __name__ == "__main__":
    main()
