"""Greedy captioning: one new token a step through cached prefixes against the whole prefix every step.

Both decoders run in one process, interleaved, on the same images: the full-prefix loop (what open_clip's
towers compute when given the prefix so far: every position again at every step) and the incremental
one (:class:`rssqa.models.captioner._PrefixCache`: the newest position only). They give the same
tokens (``tests/models/test_captioner.py``); the table gives captions per second and their ratio.

By default the captioner is an untrained ``rs-coca-tiny`` (the demo and smoke profiles' captioner):
an untrained model rarely ends a caption early, so every caption runs to ``--max-tokens``, the worst
case. ``--captioner`` times a trained captioner folder instead (what the purify stage exports).

Usage: ``python -m bench.caption --out runs/bench/caption.json [--captioner runs/demo/purify/rounds/0/captioner]``
"""

from __future__ import annotations

import argparse

import torch

from bench.common import median, time_runs, write_report
from rssqa.models.captioner import (
    EOT,
    SOT,
    CaptionVocab,
    create_captioner,
    greedy_decode,
    load_captioner,
    needs_vocab,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/caption.json")
    p.add_argument("--captioner", default=None, help="a trained captioner folder (default: untrained rs-coca-tiny)")
    p.add_argument("--images", type=int, default=64, help="images per batch (the demo's generation batch)")
    p.add_argument("--max-tokens", type=int, default=32, help="the demo's generation.max_tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.captioner:
        model, *_, vocab = load_captioner(args.captioner)
        name = args.captioner
    else:
        model, *_, vocab = create_captioner("rs-coca-tiny")
        name = "rs-coca-tiny (untrained)"
    model.eval()
    sot, eot = (CaptionVocab.SOT, CaptionVocab.EOT) if needs_vocab(model) else (SOT, EOT)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))

    def decode(incremental: bool):
        def run() -> int:
            greedy_decode(model, images, args.max_tokens, 4, sot, eot, incremental=incremental)
            return len(images)

        return run

    full, tokens = (greedy_decode(model, images, args.max_tokens, 4, sot, eot, incremental=i) for i in (False, True))
    same = torch.equal(full, tokens)
    rates = time_runs({"full_prefix": decode(False), "incremental": decode(True)}, args.repeats)
    med = {k: median(v) for k, v in rates.items()}
    ratio = round(med["incremental"] / med["full_prefix"], 2)
    length = float((tokens > 0).sum(1).float().mean())
    results = {"captions_per_s": med, "speedup": ratio, "same_tokens": same, "captioner": name, "images": args.images,
               "max_tokens": args.max_tokens, "mean_tokens": round(length, 1), "threads": args.threads, "runs": rates}  # fmt: skip
    write_report(
        args.out,
        f"greedy captioning, {name}, {args.images} images of {size} px, up to {args.max_tokens} tokens "
        f"(mean {length:.1f}), {args.threads} thread(s), median of {args.repeats}",
        results,
        [
            ("full prefix every step", f"{med['full_prefix']:.1f} cap/s", "every position of the prefix through both towers"),
            ("incremental (cached)", f"{med['incremental']:.1f} cap/s", "the newest position only"),
            ("speedup", f"{ratio:.2f}x", f"same tokens: {same}"),
        ],
    )


if __name__ == "__main__":
    main()
