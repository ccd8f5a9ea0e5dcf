"""Write the embedded synthetic world: ``python stages/world.py --config conf/smoke/world.yaml --out runs/smoke/world``."""

from __future__ import annotations

import os

from jsonargparse import CLI

from rssqa.runs import is_done
from rssqa.world import WorldConfig, generate_world


def main(world: WorldConfig, out: str = "runs/smoke/world", workers: int = 0, force: bool = False) -> None:
    """Generate the world into ``out``.

    Args:
        world: the world's configuration (seed, corpus, sources, scenes).
        out: the run folder; its summary.json is written last.
        workers: processes (0 = one per core); the output does not depend on it.
        force: regenerate even when ``out`` already holds a finished world.
    """
    if is_done(out) and not force:
        print(f"{out}: already generated (summary.json present); pass --force to regenerate")
        return
    summary = generate_world(world, out, workers=workers or os.cpu_count() or 1)
    scenes = summary["scenes"]
    print(
        f"world -> {out}: {world.corpus.n_samples} pairs ({summary['corpus_samples_per_s']}/s), "
        f"{sum(s['n_images'] for s in summary['sources'].values())} tiles, "
        f"{scenes['n']} scenes of {scenes['size']} px in {summary['seconds']} s"
    )


if __name__ == "__main__":
    CLI(main, as_positional=False)
