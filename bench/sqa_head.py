"""One training step of the RS-SQA head at the demo profile's shapes: the head as it computes now against
the row-by-row formulation it replaced, interleaved in one process.

A demo batch is every method of eight images (64 rows): per row a 576-channel method feature map on the
4x4 grid, the image's 128 x 8 x 8 CLIP-RS patch tokens, the cell and global descriptors. The reference
gathers one adapter weight (576 x 64) per row and encodes each row's semantic tokens (eight times the
same image's); the head groups rows by method (one product per method present) and encodes each image's
semantics once. Both give the same numbers (``tests/models/test_sqa.py``); the table gives training
steps per second (forward, backward, AdamW) and their ratio.

Usage: ``python -m bench.sqa_head --out runs/bench/sqa_head.json [--threads 1] [--repeats 5]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import median, time_runs, write_report
from rssqa.models.sqa import RSSQA

METHODS, IMAGES, FEAT, TOKENS, EMBED, GRID = 8, 8, 576, 128, 128, 4


class RowByRow(RSSQA):
    """The reference: a gathered adapter weight per row, semantic tokens encoded per row."""

    def encode_semantics(self, sem_embed: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        tokens = F.adaptive_avg_pool2d(self.norm_tokens(sem_tokens), self.grid).flatten(2).transpose(1, 2)
        x = self.sem_tokens(tokens) + self.sem_embed(self.norm_embed(sem_embed)).unsqueeze(1)
        return self.sem_norm(x + self.pos)

    def _adapt(self, feats: torch.Tensor, method_idx: torch.Tensor) -> torch.Tensor:
        known = (method_idx >= 0).to(feats)
        m = method_idx.clamp_min(0)
        z = (feats - self.feat_mean[m].unsqueeze(1)) / self.feat_std[m].unsqueeze(1)
        return torch.bmm(z, self.method_weight[m] * known.view(-1, 1, 1)) + (self.method_bias[m] * known.view(-1, 1)).unsqueeze(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().forward({k: v for k, v in batch.items() if k != "image_idx"})  # no sharing per image


def demo_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = METHODS * IMAGES
    per_image = {"sem_embed": torch.randn(IMAGES, EMBED, generator=g), "sem_tokens": torch.randn(IMAGES, TOKENS, 8, 8, generator=g)}
    return {
        **{k: v.repeat_interleave(METHODS, 0) for k, v in per_image.items()},
        "seg_cells": torch.randn(rows, 9, GRID, GRID, generator=g),
        "seg_global": torch.randn(rows, 80, generator=g),
        "seg_feats": torch.randn(rows, FEAT, GRID, GRID, generator=g),
        "method_idx": torch.arange(METHODS).repeat(IMAGES),
        "image_idx": torch.arange(IMAGES).repeat_interleave(METHODS),
        "oa": torch.rand(rows, generator=g),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/sqa_head.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's sqa workers use one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch = demo_batch()
    kwargs = dict(embed_dim=EMBED, token_dim=TOKENS, cell_dim=9, global_dim=80, grid=GRID,
                  methods=[f"m{i}" for i in range(METHODS)], feat_dim=FEAT)  # fmt: skip

    def trainer(cls: type[RSSQA]):
        torch.manual_seed(0)
        model = cls(**kwargs).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def run() -> int:
            for _ in range(args.steps):
                loss = F.mse_loss(model(batch), batch["oa"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return args.steps

        run()  # warm-up
        return run

    rates = time_runs({"head": trainer(RSSQA), "row_by_row": trainer(RowByRow)}, args.repeats)
    head, ref = median(rates["head"]), median(rates["row_by_row"])
    ratio = round(head / ref, 2)
    write_report(
        args.out, "sqa_head",
        {"steps_per_s": rates, "median_steps_per_s": {"head": head, "row_by_row": ref}, "speedup": ratio,
         "threads": args.threads, "rows_per_step": METHODS * IMAGES},
        [("head (grouped adapters, semantics per image)", f"{head} steps/s", f"median of {args.repeats}"),
         ("row by row (the reference)", f"{ref} steps/s", f"median of {args.repeats}"),
         ("speedup", f"{ratio}x", f"{args.threads} thread(s), {METHODS * IMAGES} rows per step")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
