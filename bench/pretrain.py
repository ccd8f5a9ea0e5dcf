"""Pretraining throughput: 1 process, and 2 DDP processes (gloo) against 1, through the real stage.

Also counts the training FLOPs per sample of each CLIP size (forward + backward, traced on the meta
device) and turns them, with published GPU peak throughput and an assumed utilisation, into the
GPU-hours of the paper profile (ViT-L-14 on 10M pairs).

Usage: ``python bench/pretrain.py --out runs/bench/pretrain.json``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import median, write_report
from rssqa.data.shards import ShardWriter
from rssqa.models.clip import clip_config, quiet_weight_notice
from rssqa.world import sample_pairs

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity).
GPU_PEAK_TFLOPS = {"A100-SXM4 (bf16)": 312.0, "H100-SXM5 (bf16)": 989.0}
ASSUMED_MFU = 0.4  # model FLOPs utilisation typical of large ViT contrastive training; an assumption


def train_flops_per_sample(name: str, grad_checkpointing: bool = False) -> float:
    """FLOPs of one training sample (forward + backward) of the named CLIP, counted by tracing on meta."""
    cfg = clip_config(name)
    with torch.device("meta"), quiet_weight_notice():
        model = open_clip.create_model(name, device="meta")
    model.set_grad_checkpointing(grad_checkpointing)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
    images = torch.zeros(2, 3, size, size, device="meta")
    tokens = torch.zeros(2, ctx, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        img, txt, scale = model(images, tokens)
        (scale * img @ txt.T).sum().backward()
    return counter.get_total_flops() / 2


def make_shards(folder: Path, n: int, size: int) -> Path:
    with ShardWriter(folder, maxcount=max(1, n // 4)) as writer:
        for i, pair in enumerate(sample_pairs(n, size, seed=11)):
            writer.write(
                {"__key__": f"b{i:06d}", "jpg": pair["image"], "txt": pair["txt"], "json": pair["json"]}
            )
    return folder


def run_stage(
    shards: Path, out: Path, processes: int, threads: int, steps: int, batch: int, model: str
) -> dict:
    """Train ``steps`` steps through stages/pretrain.py; return its summary (throughput excludes start-up)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable, str(ROOT / "stages" / "pretrain.py"),
        "--config", str(ROOT / "conf" / "smoke" / "pretrain.yaml"),
        "--out", str(out),
        "--data.shards", str(shards),
        "--model.model_name", model,
        "--data.batch_size", str(batch),
        "--data.samples_per_epoch", str(10**9),
        "--data.eval_scenes", "0",
        "--data.eval_pairs", "0",
        "--trainer.max_steps", str(steps),
        "--trainer.devices", str(processes),
        "--trainer.strategy", "ddp" if processes > 1 else "auto",
        "--trainer.deterministic", "false",
        "--checkpoint.every_n_train_steps", str(10**9),
        "--resume", "never",
        "--wandb", "false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({processes} process(es)):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def gpu_hours(flops_per_sample: float, samples: float, peak_tflops: float, mfu: float = ASSUMED_MFU) -> float:
    return flops_per_sample * samples / (peak_tflops * 1e12 * mfu) / 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench/pretrain.json")
    ap.add_argument("--model", default="rs-tiny")
    ap.add_argument("--batch", type=int, default=32, help="samples per process per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paper_samples", type=float, default=10e6, help="pairs per epoch of the paper profile")
    ap.add_argument("--paper_epochs", type=int, default=5, help="epochs in conf/paper/pretrain.yaml")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        size = clip_config(args.model)["vision_cfg"]["image_size"]
        shards = make_shards(work / "shards", 512, size)
        contenders = {"1 process, 1 thread": (1, 1), "2 processes (DDP gloo), 1 thread each": (2, 1),
                      "1 process, 2 threads": (1, 2)}  # fmt: skip
        rates: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeats):  # interleaved: every contender sees the same background load
            for name, (procs, threads) in contenders.items():
                summary = run_stage(shards, work / "run", procs, threads, args.steps, args.batch, args.model)
                rates[name].append(summary["samples_per_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: median(v) for k, v in rates.items()}
    one, two = med["1 process, 1 thread"], med["2 processes (DDP gloo), 1 thread each"]

    flops = {n: train_flops_per_sample(n) for n in ("rs-tiny", "rs-small", "ViT-B-32", "ViT-L-14")}
    flops["ViT-L-14 + grad checkpointing"] = train_flops_per_sample("ViT-L-14", grad_checkpointing=True)
    cpu_flops = flops[args.model] * one
    paper = flops["ViT-L-14 + grad checkpointing"]
    estimate = {
        gpu: {
            "gpu_hours_per_epoch": round(gpu_hours(paper, args.paper_samples, peak), 1),
            "gpu_hours_total": round(gpu_hours(paper, args.paper_samples * args.paper_epochs, peak), 1),
        }
        for gpu, peak in GPU_PEAK_TFLOPS.items()
    }
    results = {
        "model": args.model,
        "batch_per_process": args.batch,
        "steps": args.steps,
        "samples_per_s": med,
        "runs": rates,
        "ddp_speedup_2_vs_1": round(two / one, 3),
        "train_gflops_per_sample": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "measured_cpu_gflops_per_s_1_thread": round(cpu_flops / 1e9, 2),
        "paper_profile": {
            "model": "ViT-L-14 (grad checkpointing)",
            "samples_per_epoch": args.paper_samples,
            "epochs": args.paper_epochs,
            "assumed_mfu": ASSUMED_MFU,
            "gpu_peak_tflops": GPU_PEAK_TFLOPS,
            "estimate": estimate,
        },
    }
    rows = [(k, f"{v:.1f}/s", f"{args.model}, batch {args.batch} per process") for k, v in med.items()]
    rows.append(("2 processes vs 1", f"{two / one:.2f}x", "DDP weak scaling on 2 cores (ideal 2x)"))
    rows += [(f"train GFLOP/sample {k}", f"{v / 1e9:.2f}", "forward + backward") for k, v in flops.items()]
    rows += [(f"paper profile, {gpu}", f"{e['gpu_hours_total']:.0f} GPU-h",
              f"{args.paper_epochs} x {args.paper_samples:.0e} pairs at {ASSUMED_MFU:.0%} MFU")
             for gpu, e in estimate.items()]  # fmt: skip
    write_report(args.out, f"pretrain throughput ({args.model}, median of {args.repeats})", results, rows)


if __name__ == "__main__":
    main()
