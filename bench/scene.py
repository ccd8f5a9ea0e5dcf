"""``rssqa scene`` on a large scene: peak memory of the whole run, and its time against the methods alone.

A three-band scene (default 8192 x 8192 px, generated, tiled GeoTIFF with a CRS and a nodata corner)
is processed twice, each time in a fresh process with one torch thread, alternating:

- ``scene``: the whole ``rssqa scene`` job (windowed reading, every method on every window, CLIP-RS,
  the quality head and the ranking head, agreement, the pixel error head, blending, writing four
  Cloud-Optimised GeoTIFFs, the quick look);
- ``alone``: the same windows read the same way, every method run on each (forward, softmax, argmax)
  in the same batch size, results dropped: what a user runs anyway.

Reported: each run's wall time and peak resident memory (``ru_maxrss`` of the process, the whole
run), the medians and the ratio scene/alone (targets: at most 2 GB and 1.3x).

The models are untrained stand-ins of the demo profile's shapes (``bench.score.stand_in``: the eight
tiny methods, ``rs-tiny`` CLIP, the demo heads, a pixel error head): a trained model costs the same.

Usage: ``python -m bench.scene --out runs/bench/scene.json [--size 8192] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import write_report

TARGET_RATIO, TARGET_GB = 1.3, 2.0


def write_scene(path: Path, size: int, seed: int = 0) -> None:
    """A smooth random ``size×size`` RGB scene, written strip by strip (never whole in memory)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    block = 512
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "nodata": 0,
               "crs": "EPSG:32640", "transform": from_origin(300000.0, 2800000.0, 0.3, 0.3), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as d:
        for r in range(0, size, block):
            h = min(block, size - r)
            coarse = rng.integers(1, 255, (3, h // 16 + 1, size // 16 + 1)).astype(np.float32)
            img = np.repeat(np.repeat(coarse, 16, 1), 16, 2)[:, :h, :size] + rng.normal(0, 10, (3, h, size))
            img = np.clip(img, 1, 250).astype(np.uint8)
            yy, xx = np.mgrid[r : r + h, :size]
            img[:, (yy + xx) < size // 8] = 0  # a nodata corner
            d.write(img, window=rasterio.windows.Window(0, r, size, h))


def _stand_in(tile: int, chunk: int):
    import torch

    from bench.score import stand_in
    from rssqa.models.pixel_error import PixelErrorHead

    scorer, source = stand_in(tile, chunk)
    scorer.ranking_model = scorer.agreement_model
    torch.manual_seed(1)
    token_dim = int(scorer.config.get("token_dim", 0) or _token_dim(scorer))
    # as the demo's: agreement and quality-weighted agreement channels, CLIP-RS tokens
    scorer.pixel_model = PixelErrorHead(agreement=True, token_dim=token_dim, quality_power=8).eval()
    scorer.config["image_size"] = [tile, tile]
    return scorer, source


def _token_dim(scorer) -> int:
    import torch

    from rssqa.models.quality_inputs import semantic_features

    return int(semantic_features(scorer.clip, torch.zeros(1, scorer.min_size, scorer.min_size, 3, dtype=torch.uint8))["tokens"].shape[1])


def worker(kind: str, scene: Path, out: Path, tile: int, overlap: int, chunk: int) -> None:
    """One contender, in this process (``--worker``); prints its wall time as JSON."""
    import torch

    torch.set_num_threads(1)
    scorer, source = _stand_in(tile, chunk)
    t0 = time.perf_counter()
    if kind == "scene":
        from rssqa.scene import SceneJob, SceneOptions

        summary = SceneJob(scorer, scene, out, SceneOptions(source=source, tile=tile, overlap=overlap, progress=False, resume=False)).run()
        n = summary["windows"]["scored"]
    else:
        n = segment_windows(scorer, source, scene, tile, overlap, chunk)
    print(json.dumps({"seconds": time.perf_counter() - t0, "windows": n}))


def segment_windows(scorer, source: str, scene: Path, tile: int, overlap: int, chunk: int) -> int:
    """Every method on every window holding data (the scene's windows, read strip by strip)."""
    import rasterio
    import torch

    from rssqa.scene import window_offsets

    segmenters = [scorer.method(m, source).segmenter for m in scorer.methods(source)]
    n = 0
    with rasterio.open(scene) as src, torch.no_grad():
        rows, cols = window_offsets(src.height, tile, overlap), window_offsets(src.width, tile, overlap)
        for r in rows:
            win = rasterio.windows.Window(0, r, src.width, tile)
            pixels = src.read([1, 2, 3], window=win).transpose(1, 2, 0)
            valid = src.dataset_mask(window=win) > 0
            tiles = [pixels[:, c : c + tile] for c in cols if valid[:, c : c + tile].any()]
            for start in range(0, len(tiles), chunk):
                part = np.stack(tiles[start : start + chunk])
                if len(part) < chunk:
                    part = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), np.uint8)])
                x = torch.from_numpy(part).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
                for seg in segmenters:
                    seg(x).softmax(1).argmax(1)
            n += len(tiles)
    return n


def run_child(kind: str, scene: Path, out: Path, tile: int, overlap: int, chunk: int) -> dict[str, float]:
    """A contender in a fresh process: its wall time, windows and peak resident memory."""
    cmd = [sys.executable, "-m", "bench.scene", "--worker", kind, "--scene", str(scene), "--work", str(out),
           "--tile", str(tile), "--overlap", str(overlap), "--chunk", str(chunk)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench.scene: the {kind} run failed (exit {os.waitstatus_to_exitcode(status)})")
    rec = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": rec["seconds"], "process_s": wall, "windows": rec["windows"], "peak_rss_gb": usage.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/scene.json")
    ap.add_argument("--size", type=int, default=8192, help="scene side in px")
    ap.add_argument("--tile", type=int, default=96, help="window side (the demo profile's tile)")
    ap.add_argument("--overlap", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default="runs/bench/scene_work")
    ap.add_argument("--worker", choices=["scene", "alone"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scene", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.scene), Path(args.work), args.tile, args.overlap, args.chunk)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scene = work / f"scene_{args.size}.tif"
    if not scene.is_file():
        t0 = time.perf_counter()
        write_scene(scene.with_suffix(".tmp.tif"), args.size)
        os.replace(scene.with_suffix(".tmp.tif"), scene)
        print(f"scene written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    runs: dict[str, list[dict[str, float]]] = {"alone": [], "scene": []}
    for _ in range(args.repeats):
        for kind in runs:  # alternating: both under the same background load
            runs[kind].append(run_child(kind, scene, work / "out", args.tile, args.overlap, args.chunk))
            print(f"{kind}: {runs[kind][-1]}", file=sys.stderr)
    med = {k: float(np.median([r["seconds"] for r in v])) for k, v in runs.items()}
    peak = max(r["peak_rss_gb"] for r in runs["scene"])
    ratio = med["scene"] / med["alone"]
    results = {
        "size": args.size, "tile": args.tile, "overlap": args.overlap, "chunk": args.chunk,
        "windows": runs["scene"][0]["windows"], "seconds": med, "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO,
        "peak_rss_gb": round(peak, 3), "alone_peak_rss_gb": round(max(r["peak_rss_gb"] for r in runs["alone"]), 3),
        "target_gb": TARGET_GB, "meets_target": ratio <= TARGET_RATIO and peak <= TARGET_GB, "runs": runs,
        "load_avg_1m": os.getloadavg()[0], "rusage_self_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }  # fmt: skip
    write_report(
        args.out,
        f"rssqa scene, {args.size} x {args.size} px, {results['windows']} windows of {args.tile} px, one core (median of {args.repeats})",
        results,
        [
            ("methods alone", f"{med['alone']:.0f} s", "8 methods on every window: forward, softmax, argmax"),
            ("rssqa scene", f"{med['scene']:.0f} s", "the same + CLIP-RS, heads, agreement, pixel errors, blending, COGs"),
            ("ratio", f"{ratio:.2f}x", f"target <= {TARGET_RATIO}x"),
            ("peak memory (scene)", f"{peak:.2f} GB", f"whole process, target <= {TARGET_GB} GB"),
        ],
    )


if __name__ == "__main__":
    main()
