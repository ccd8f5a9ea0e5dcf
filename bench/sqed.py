"""RS-SQED labelling speed and cache size: labelled (image, method) rows per second, bytes per row.

Times the stage's own labelling path (``rssqa.tasks.sqed.label_method``: segment, OA against the
mask, statistics, pooled features, label shard written to disk) for each method over one source of
a freshly generated world tile set, on one core. The models are untrained: a trained model costs
the same. With ``--sqed`` it also reports what a finished sqed run recorded.

Usage: ``python -m bench.sqed --out runs/bench/sqed.json [--sqed runs/smoke/sqed]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import median, time_runs, write_report
from rssqa.models.segmenters import list_methods, resolve_method
from rssqa.runs import is_done, read_summary
from rssqa.tasks.sqed import (
    LabelConfig,
    SegmentationTask,
    SourceConfig,
    SQEDConfig,
    TrainConfig,
    label_method,
    prepare_source,
)
from rssqa.tracking import quiet_lightning
from rssqa.world import SourcesConfig
from rssqa.world.export import export_sources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/sqed.json")
    ap.add_argument("--images", type=int, default=64, help="pool images labelled per method and run")
    ap.add_argument("--size", type=int, default=64, help="tile side in pixels")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sqed", default=None, help="a finished sqed run folder to report as well")
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    methods = args.methods or list_methods()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_sources(
            SourcesConfig(image_size=args.size, n_images=args.images + 2, names=["potsdam"]), 0, tmp / "w"
        )
        cfg = SQEDConfig(
            sources=[SourceConfig("potsdam", str(tmp / "w" / "potsdam"))],
            methods=methods,
            splits={"seg": 2 / (args.images + 2), "test": args.images / (args.images + 2)},
            train=TrainConfig(in_memory=True),
            label=LabelConfig(grid=args.grid),
            wandb="disabled",
        )
        prep = prepare_source(cfg.sources[0], cfg, tmp / "sqed", None)
        n = len(prep.pool)
        tasks = {}
        for m in methods:
            torch.manual_seed(0)
            tasks[m] = SegmentationTask(
                resolve_method(m, cfg.size).as_dict(), prep.source.num_classes, grid=args.grid
            )
            tasks[m].eval().segmenter.describe(torch.rand(2, 3, args.size, args.size))  # warm up
        sizes: dict[str, float] = {}

        def labeller(m: str):
            def run() -> int:
                path = tmp / "sqed" / "features" / "potsdam" / f"{m}.safetensors"
                path.unlink(missing_ok=True)  # no reuse: time the work
                label_method(prep, m, tasks[m], cfg, tmp / "sqed")
                sizes[m] = path.stat().st_size / n
                return n

            return run

        rates = time_runs({m: labeller(m) for m in methods}, args.repeats)
    med = {m: median(v) for m, v in rates.items()}
    per_row_s = sum(1 / v for v in med.values()) / len(med)
    results = {
        "image_size": args.size,
        "images_per_method": n,
        "grid": args.grid,
        "threads": 1,
        "rows_per_s": {m: med[m] for m in methods},
        "rows_per_s_all_methods": round(1 / per_row_s, 2),
        "feature_bytes_per_row": {m: round(sizes[m], 1) for m in methods},
        "feature_bytes_per_row_mean": round(sum(sizes.values()) / len(sizes), 1),
        "runs": rates,
    }
    table = [(m, f"{med[m]:.1f} rows/s", f"{sizes[m] / 1024:.1f} KiB/row") for m in methods]
    table.append(("all methods", f"{results['rows_per_s_all_methods']:.1f} rows/s",
                  f"{results['feature_bytes_per_row_mean'] / 1024:.1f} KiB/row (mean)"))  # fmt: skip
    if args.sqed and is_done(args.sqed):
        s = read_summary(args.sqed)
        results["from_run"] = {k: s.get(k) for k in ("rows_labelled_per_s", "feature_bytes_per_row", "n_rows", "seconds",
                                                     "train_s", "label_s")}  # fmt: skip
        table.append((f"run {args.sqed}", f"{s.get('rows_labelled_per_s') or 0:.1f} rows/s",
                      f"{(s.get('feature_bytes_per_row') or 0) / 1024:.1f} KiB/row, {s.get('seconds')} s in all"))  # fmt: skip
    write_report(
        args.out,
        f"RS-SQED labelling, {args.size} px, {n} images per method, one core (median of {args.repeats})",
        results,
        table,
    )


if __name__ == "__main__":
    main()
