"""Stage purify throughput: samples per second, share of wall time in model compute, 2 processes vs 1.

Runs the real stage (``stages/purify.py``) in subprocesses on a corpus of the embedded world, once as
one CPU process and once as two gloo processes, with the same filter and captioner checkpoints (random
weights: the bench times the loop, not the models' quality; an untrained captioner rarely stops early,
so every caption runs to ``max_tokens``: the worst case). A keep fraction of 0.7 makes the score pass
run and sends about 30% of the pairs (plus the rule failures) to the captioner.

Timed by the stage itself: each prediction pass from the start of its loop to its end (DataLoader
start-up, decoding, model compute, output writing; not process launch or model loading). Samples per
second = input samples / the slowest rank's pass time; compute share = time in ``predict_step`` /
pass time, averaged over ranks. The machine is shared: settings are interleaved and the best of
``--repeats`` runs counts.

Aims: model compute >= 85% of the prediction passes' wall time (decoding and I/O hidden behind
DataLoader workers); 2 processes >= 1.7x one.
Usage: ``python bench/purify.py --out runs/bench/purify.json``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import write_report
from rssqa.data.shards import iter_shard, list_shards
from rssqa.models.captioner import CaptionVocab, create_captioner, export_captioner
from rssqa.models.clip import create_clip, export_clip
from rssqa.world import CorpusConfig
from rssqa.world.export import export_corpus

ROOT = Path(__file__).resolve().parents[1]


def prepare(data: Path, n: int, size: int) -> None:
    """Write the corpus and the two checkpoints once (kept between bench runs)."""
    if not (data / "corpus" / "coarse" / "sizes.json").is_file():
        export_corpus(CorpusConfig(n_samples=n, image_size=size, shard_size=250), 0, data / "corpus")
    if not (data / "captioner" / "caption_vocab.json").is_file():
        torch.manual_seed(0)
        filt, *_ = create_clip("rs-tiny")
        export_clip(filt, "rs-tiny", data / "filter")
        cap, *_ = create_captioner("rs-coca-tiny")
        captions = [s["txt"] for u in list_shards(data / "corpus" / "trusted") for s in iter_shard(u, decode=False)]
        export_captioner(cap, "rs-coca-tiny", data / "captioner", CaptionVocab.build(captions, 2048, cap.context_length))


def run_stage(data: Path, out: Path, devices: int, workers: int, batch: int) -> dict:
    """One run of the stage; returns its summary plus the process wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, str(ROOT / "stages" / "purify.py"), "--config", str(ROOT / "conf" / "smoke" / "purify.yaml"),
        "--out", str(out), "--model.input", str(data / "corpus" / "coarse"), "--model.trusted", str(data / "corpus" / "trusted"),
        "--model.filter.checkpoint", str(data / "filter"), "--model.captioner.checkpoint", str(data / "captioner"),
        "--model.threshold", "null", "--model.keep_fraction", "0.7", "--model.batch_size", str(batch), "--model.num_workers", str(workers),
        "--model.wandb", "false", "--model.threads", "1", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"stage failed ({devices} process(es)):\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "process_wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/purify.json")
    ap.add_argument("--n", type=int, default=3529, help="pairs in the bench corpus: 15%% trusted, 3000 coarse = 12 shards")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved; the best counts")
    args = ap.parse_args()
    work = Path(args.out).resolve().parent / "purify-work"  # absolute: the stage reads relative inputs under --out's parent
    prepare(work / "data", args.n, args.size)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for devices in (1, 2):  # interleaved: both settings see the same background load
            runs[devices].append(run_stage(work / "data", work / f"run-{devices}", devices, args.workers, args.batch))
    best = {d: max(rs, key=lambda s: s["samples_per_s"]) for d, rs in runs.items()}
    speedup = round(best[2]["samples_per_s"] / best[1]["samples_per_s"], 2)
    keys = ("samples_per_s", "model_compute_share", "per_rank", "n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad",
            "process_wall_s")  # fmt: skip
    results = {
        "settings": {"n_pairs": args.n, "image_size": args.size, "workers_per_process": args.workers,
                     "batch_size": args.batch, "repeats": args.repeats, "cpus": os.cpu_count()},
        "one_process": {k: best[1][k] for k in keys},
        "two_processes": {k: best[2][k] for k in keys},
        "speedup_2_vs_1": speedup,
        "aims": {"model_compute_share": 0.85, "speedup_2_vs_1": 1.7},
        "all_runs": {str(d): [{k: s[k] for k in keys} for s in rs] for d, rs in runs.items()},
    }  # fmt: skip
    rows = [
        ("samples/s, 1 process", best[1]["samples_per_s"], "score pass + write pass, input samples"),
        ("samples/s, 2 processes", best[2]["samples_per_s"], "gloo DDP, each rank its own shards"),
        ("speedup 2 vs 1", speedup, "aim >= 1.7"),
        ("model compute share, 1 process", best[1]["model_compute_share"], "aim >= 0.85"),
        ("model compute share, 2 processes", best[2]["model_compute_share"], "mean over ranks"),
    ]
    write_report(args.out, "purify", results, rows)


if __name__ == "__main__":
    main()
