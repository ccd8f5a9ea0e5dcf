"""The ``rssqa`` console script.

Subcommands:
    rssqa score IMAGE_OR_FOLDER... --method unet [--source vaihingen] [--json]
    rssqa score IMAGE_OR_FOLDER... --segmenter path/to/final.ckpt
    rssqa recommend IMAGE_OR_FOLDER... [--methods unet fpn ...] [--source vaihingen] [--json]

A bad image among several (unreadable, wrong channel count, smaller than the model takes: a mask or a
thumbnail in the folder) is skipped: one line ``skipped: <file>: <problem>`` on stderr, the other images
scored and printed, a count at the end and exit status 1 (``--on-bad error`` stops at the first one
instead). Any other bad input (a scorer that does not match its CLIP, an unknown method, no image usable)
ends with one line ``error: <file>: <problem>`` on stderr and exit status 2; ``--debug`` shows the
traceback instead.

Adding a subcommand: write ``_add_<name>(subparsers)`` that registers a parser with
``set_defaults(func=<handler>)`` and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rssqa.cli_inputs import (
    PLAIN_8BIT,
    blocks,
    collect_images,
    inputs_for,
    range_for,
    read_pixels,
    read_scale,
)
from rssqa.errors import RSSQAError

DEFAULT_SCORER = os.environ.get("RSSQA_SCORER", "runs/demo/sqa/scorer")


def _load_scorer(args: argparse.Namespace):
    import torch

    from rssqa.scorer import Scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    return Scorer.load(args.scorer, clip=args.clip, chunk=args.chunk)


# -------------------------------------------------------------------------------------- commands
def cmd_score(args: argparse.Namespace) -> int:
    """``rssqa score``: predicted OA of a method's segmentation of each image."""
    files, folder = collect_images(args.inputs)
    scorer = _load_scorer(args)
    if not args.method and not args.segmenter:
        raise RSSQAError("score: name a --method (see --list) or a --segmenter checkpoint")
    methods = args.method or None
    others = [m for part in args.with_methods for m in part.split(",") if m]
    names = scorer.method_names(methods, args.source, args.segmenter)
    if args.error_map and (args.segmenter or scorer.pixel_model is None):
        raise RSSQAError("score --error-map: needs registered --method names and a scorer with a pixel error head")
    agreement = scorer.use_agreement(names, others)  # a one-line error before any image is read
    # the OA the head predicts comes with the interval its val rows gave (none for the error map's)
    fitted = None if args.error_map else scorer.interval(scorer.agreement_model if agreement else scorer.model)
    inputs, results = inputs_for(scorer, args, len(files)), []
    for block in blocks(files, folder and not args.quiet):
        block, images = inputs.read(block)
        if not images:
            continue
        if args.error_map:  # the OA the pixel error head's map predicts
            scores = scorer.error_map_quality(images, methods, args.source, others, names=[str(f) for f in block])
        else:  # with the interval: an image scored window by window gets the means of its windows' bounds
            scores = scorer.score(images, methods, args.source, args.segmenter, names=[str(f) for f in block],
                                  with_methods=others, tiles=not args.whole, interval=fitted)  # fmt: skip
        scores, low, high = scores if fitted else (scores, None, None)
        for i, f in enumerate(block):
            for j, m in enumerate(names):
                row = {"image": str(f), "method": m, "score": float(scores[i, j])}
                results.append({**row, "low": float(low[i, j]), "high": float(high[i, j])} if fitted else row)
    status = inputs.finish()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        extra = [f"{fitted['level']:.0%} interval"] if fitted else []
        _table(["image", "method", "score", *extra], [
            [r["image"], r["method"], f"{r['score']:.4f}", *([f"{r['low']:.3f} - {r['high']:.3f}"] if fitted else [])] for r in results
        ])  # fmt: skip
    return status


def _fixed_note(scorer: Any) -> None:
    """One line on stderr: why the scorer's best fixed method comes first (its ``recommend_policy``)."""
    p = scorer.config["recommend_policy"]
    v = p.get("val_vs_best_fixed") or {}
    gain = f" ({v['diff']:+.3f} OA [{v['low']:+.3f}, {v['high']:+.3f}])" if "diff" in v else ""
    print(f"rssqa: on validation, choosing per image by {p.get('model')} was not ahead of always running {p['method']}{gain}; "
          f"{p['method']} comes first, the others follow by predicted OA (--by-score: rank by it alone)", file=sys.stderr)


def cmd_recommend(args: argparse.Namespace) -> int:
    """``rssqa recommend``: the methods ranked by predicted OA for each image."""
    files, folder = collect_images(args.inputs)
    scorer = _load_scorer(args)
    methods = args.methods or None
    labels = scorer.method_names(methods, args.source)
    fixed = None if args.by_score else scorer.fixed_first(labels)
    fitted = scorer.interval(scorer.recommend_head(len(labels)))
    if fixed is not None:
        _fixed_note(scorer)
    inputs, results = inputs_for(scorer, args, len(files)), []
    for block in blocks(files, folder and not args.quiet):
        block, images = inputs.read(block)
        if not images:
            continue
        ranked = scorer.recommend(images, methods, args.source, names=[str(f) for f in block], tiles=not args.whole,
                                  policy=not args.by_score, interval=fitted)  # fmt: skip
        for f, ranking in zip(block, ranked, strict=True):
            results.append({
                "image": str(f), "recommended": ranking[0][0], "by": "fixed" if fixed is not None else "score",
                "ranking": [dict(zip(("method", "score", "low", "high"), entry, strict=False)) for entry in ranking],
            })  # fmt: skip
    status = inputs.finish()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        top = args.top or None
        _table(
            ["image", "recommended", "ranking (predicted OA)"],
            [
                [r["image"], r["recommended"], "  ".join(f"{x['method']} {x['score']:.3f}" for x in r["ranking"][:top])]
                for r in results
            ],
        )
    return status


def cmd_methods(args: argparse.Namespace) -> int:
    """``rssqa methods``: sources and methods a scorer knows."""
    from rssqa.runs import read_json
    from rssqa.scorer_folder import CONFIG

    config = read_json(Path(args.scorer) / CONFIG, "scorer config not found", "not a scorer config")
    for source, methods in sorted(config.get("checkpoints", {}).items()):
        print(f"{source}: {' '.join(sorted(methods))}{_reading_words((config.get('read') or {}).get(source) or {})}")
    return 0


def _reading_words(reading: dict[str, Any]) -> str:
    """How a scorer reads a source's new images, in words (``""``: three 8-bit bands as they are)."""
    words = []
    if reading.get("scale", 1) != 1:
        words.append(f"resampled by {reading['scale']:g}")
    if reading.get("gsd"):
        words.append(f"{reading['gsd']:g} m pixels as trained")
    if reading.get("bands"):
        words.append("bands " + ",".join(str(int(b) + 1) for b in reading["bands"]))
    if reading.get("rescale"):
        of = f" of {'/'.join(reading['pixels'])} pixels" if reading.get("pixels") else ""
        words.append(f"values {reading['rescale'][0]:g}..{reading['rescale'][1]:g}{of} mapped to 0-255")
    return f" (images read: {', '.join(words)})" if words else ""


def cmd_scene(args: argparse.Namespace) -> int:
    """``rssqa scene``: quality, best-method, fused and error maps of a whole (Geo)TIFF scene."""
    from rssqa.data.segsets.rasters import ground_sample_distance, header
    from rssqa.scene import SceneOptions, score_scene_file

    scorer = _load_scorer(args)
    bands, rescale, plain_8bit = read_pixels(scorer, args)
    bands = [b + 1 for b in bands] if bands else None  # the scene reads GDAL's 1-based band numbers
    if plain_8bit:  # the header read only then: a file that is no raster gets the scene job's own error
        rescale = range_for(header(Path(args.scene), "scene")[3], rescale, plain_8bit, f"an 8-bit scene read as it is, {PLAIN_8BIT}")
    options = SceneOptions(
        source=args.source, methods=args.methods, tile=args.tile, overlap=args.overlap, bands=bands, rescale=rescale, truth=args.truth,
        progress=not args.quiet, resume=not args.restart, by_score=args.by_score, scale=read_scale(scorer, args, "the scene and its maps", ground_sample_distance(Path(args.scene))),
    )
    summary = score_scene_file(scorer, args.scene, args.out, options)
    if summary.get("recommended_by", "score") != "score":
        _fixed_note(scorer)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    win = summary["windows"]
    print(f"{args.scene}: {win['scored']} windows scored ({win['skipped_nodata']} all nodata), "
          f"{summary['timings']['total_s']:.1f} s; outputs in {args.out}")  # fmt: skip
    band = summary.get("mean_predicted_oa_interval")
    _table(
        ["method", "mean predicted OA", *([f"{band['level']:.0%} band of the windows' intervals"] if band else []), "recommended share"],
        [[m, f"{summary['mean_predicted_oa'][m]:.3f}", *([f"{band['low'][m]:.3f} - {band['high'][m]:.3f}"] if band else []),
          f"{summary['chosen_share'][m]:.1%}"] for m in summary["methods"]],
    )  # fmt: skip
    ev = summary.get("evaluation")
    if ev:
        print(f"fused OA {ev['fused_oa']:.4f}, best single method {ev['best_single_method']} {ev['best_single_oa']:.4f}, "
              f"oracle {ev['oracle_oa']:.4f}")  # fmt: skip
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------------------- parsers
def _pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based band numbers of red, green, blue (default: as the scorer's source was read, else bands 1-3)")
    p.add_argument("--rescale", default=None, metavar="LOW,HIGH",
                   help="pixels that are not 8-bit (e.g. uint16) mapped linearly from LOW..HIGH to 0..255 "
                   "(default: as the scorer's source was read)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--scorer", default=DEFAULT_SCORER, help="scorer folder written by the sqa stage (default: %(default)s)")
    p.add_argument("--clip", default=None, help="CLIP-RS folder, if not where the scorer recorded it")
    p.add_argument("--source", default=None, help="which source's method checkpoints to use")
    p.add_argument("--chunk", type=int, default=None, help="forward batch size (default: the scorer's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--whole", action="store_true",
        help="score an image larger than the training tiles as one input (default: window by window, the scores "
        "averaged by the pixels each window owns)",
    )
    p.add_argument(
        "--scale", type=float, default=None, metavar="F",
        help="resample each image by F when read (bilinear; 0.25: a quarter of each side). Default: as the scorer's "
        "source was read for training (its sqed scale / target_gsd; said on stderr when not 1), and a GeoTIFF in a CRS "
        "in metres to the ground sample distance the methods were trained at where the scorer records it; 1: as they are",
    )
    _pixels(p)
    p.add_argument(
        "--on-bad", choices=("skip", "error"), default="skip",
        help="an unusable image among the inputs: skip it (said on stderr, exit status 1) or stop (default: %(default)s)",
    )  # fmt: skip
    _debug(p)


def _debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not undo ``rssqa --debug <command>``
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="predicted OA of a method's segmentation of each image")
    _common(p)
    p.add_argument("--method", action="append", default=[], help="registered method name (repeatable)")
    p.add_argument("--segmenter", action="append", default=[], help="segmenter checkpoint (repeatable)")
    p.add_argument(
        "--with", dest="with_methods", action="append", default=[], metavar="A,B,C",
        help="other registered methods to run for their agreement with the scored one: the scorer's agreement "
        "head then scores (at least three methods in all); without it, the paper's inputs",
    )
    p.add_argument(
        "--error-map", action="store_true",
        help="score by the pixel error head instead: 1 - the mean probability that a pixel is wrong (with --with: "
        "at least three methods in all; the most accurate score of the demo and of the Dubai set)",
    )  # fmt: skip
    p.set_defaults(func=cmd_score)


def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="rank the methods by predicted OA for each image")
    _common(p)
    p.add_argument("--methods", nargs="+", default=None, help="methods to rank (default: all of the source)")
    p.add_argument("--top", type=int, default=0, help="show only the best K in the table")
    p.add_argument("--by-score", action="store_true",
                   help="rank by predicted OA alone, also where the scorer's validation chose its best fixed method")
    p.set_defaults(func=cmd_recommend)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the sources and methods a scorer knows, and how it reads their images")
    p.add_argument("--scorer", default=DEFAULT_SCORER, help="scorer folder (default: %(default)s)")
    _debug(p)
    p.set_defaults(func=cmd_methods)


def _add_scene(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scene", help="quality, best-method, fused and error maps of a whole GeoTIFF scene")
    p.add_argument("scene", help="a (Geo)TIFF or any raster GDAL reads: three 8-bit bands, or choose them with --bands")
    p.add_argument("--out", required=True, help="output folder (quality.tif, best_method.tif, fused.tif, error.tif, scene.json)")
    p.add_argument("--scorer", default=DEFAULT_SCORER, help="scorer folder written by the sqa stage (default: %(default)s)")
    p.add_argument("--clip", default=None, help="CLIP-RS folder, if not where the scorer recorded it")
    p.add_argument("--source", default=None, help="which source's method checkpoints to use")
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all of the source)")
    p.add_argument("--tile", type=int, default=None, help="window side in px (default: the scorer's training tile)")
    p.add_argument("--overlap", type=int, default=None, help="px shared by neighbouring windows (default: a quarter tile)")
    _pixels(p)
    p.add_argument("--truth", default=None, help="a ground-truth class raster on the same grid: also measure the maps")
    p.add_argument("--scale", type=float, default=None, metavar="F",
                   help="read the scene (and --truth) resampled by F; the maps are on that grid. Default: to the ground "
                   "sample distance the scorer's methods were trained at where both are known (a CRS in metres), else as "
                   "the scorer's source was read for training (said on stderr when not 1); 1: at its own resolution")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming unfinished work in --out")
    p.add_argument("--by-score", action="store_true",
                   help="each window's method by predicted OA, also where the scorer's validation chose its best fixed method")
    p.add_argument("--chunk", type=int, default=None, help="forward batch size (default: the scorer's)")
    p.add_argument("--json", action="store_true", help="print scene.json instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _debug(p)
    p.set_defaults(func=cmd_scene)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_score, _add_recommend, _add_methods, _add_scene]


def build_parser() -> argparse.ArgumentParser:
    """The ``rssqa`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="rssqa", description="Remote-sensing segmentation quality without ground truth.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rssqa`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except RSSQAError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug gives the traceback
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
