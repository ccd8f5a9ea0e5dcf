"""What one round of the purify loop leaves on disk, read back: folders, done-markers, scores, thresholds.

:func:`round_dirs` names a round's folders, :func:`read_markers` and :func:`account` read and sum its
done-markers (checking that every input sample is accounted for once), :func:`read_scores` reads its
score pass, and :func:`keep_fraction_threshold` and :func:`otsu_threshold` turn those scores into the
round's global threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rssqa.data.caption_rules import RuleCounter
from rssqa.errors import RSSQAError
from rssqa.tasks.purify.writers import shard_name


# ============================================================================================ rounds
@dataclass
class RoundDirs:
    """Folders of one round."""

    root: Path
    shards: Path
    done: Path

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def filter(self) -> Path:
        return self.root / "filter"

    @property
    def captioner(self) -> Path:
        return self.root / "captioner"


def round_dirs(out_dir: Path, r: int, rounds: int) -> RoundDirs:
    """Round ``r``'s folders: the last round writes the stage's ``shards/`` and ``done/``."""
    root = out_dir / "rounds" / str(r)
    if r == rounds - 1:
        return RoundDirs(root, out_dir / "shards", out_dir / "done")
    return RoundDirs(root, root / "shards", root / "done")


def read_markers(done_dir: Path, n_shards: int) -> list[dict[str, Any]]:
    """The done-markers of all ``n_shards`` input shards, in input order (fails when one is missing)."""
    markers = []
    for i in range(n_shards):
        path = done_dir / f"{shard_name(i)}.json"
        if not path.is_file():
            raise RSSQAError(f"{path}: missing done-marker after the write pass (a rank failed?)")
        markers.append(json.loads(path.read_text()))
    return markers


def account(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of done-markers and check ``n_in = n_kept + n_rewritten + n_dropped + n_bad``.

    Raises:
        RSSQAError: when the identity does not hold for a shard or in total.
    """
    keys = ("n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad")
    total = dict.fromkeys(keys, 0)
    rules, gen_rules = RuleCounter(), RuleCounter()
    for m in markers:
        if m["n_in"] != m["n_kept"] + m["n_rewritten"] + m["n_dropped"] + m["n_bad"] or m["n_in"] != len(m["records"]) + len(m["bad"]):
            raise RSSQAError(f"{m['url']}: accounting mismatch in its done-marker ({ {k: m[k] for k in keys} })")
        for k in keys:
            total[k] += m[k]
        rules.update(m["rules"])
        gen_rules.update(m["generated_rules"])
    if total["n_in"] != total["n_kept"] + total["n_rewritten"] + total["n_dropped"] + total["n_bad"]:
        raise RSSQAError(f"purify: accounting mismatch: {total}")
    return {**total, "rules": rules.as_dict(), "generated_rules": gen_rules.as_dict()}


def read_scores(score_dir: Path, n_shards: int) -> np.ndarray:
    """The scores of all rule-passing input captions (float64); captions a rule rejected do not take part
    (they go to the captioner whatever their score)."""
    scores = []
    for i in range(n_shards):
        data = json.loads((score_dir / f"{shard_name(i)}.json").read_text())
        scores += [s for s, r in zip(data["scores"], data["rules"], strict=True) if r is None]
    if not scores:
        raise RSSQAError(f"{score_dir}: no caption passed the rules; cannot set a global threshold")
    return np.asarray(scores, np.float64)


def keep_fraction_threshold(scores: np.ndarray, keep_fraction: float) -> float:
    """The threshold at which ``keep_fraction`` of ``scores`` score at or above."""
    return float(np.quantile(scores, 1.0 - keep_fraction, method="lower"))


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a ``bins``-bin histogram of ``scores`` that maximises the variance
    between the two groups it makes (scores at or above it form the upper group)."""
    hist, edges = np.histogram(scores, bins)
    centres, w = (edges[:-1] + edges[1:]) / 2, hist / hist.sum()
    w0, m0 = np.cumsum(w), np.cumsum(w * centres)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(edges[1:][int(np.argmax(between))])
