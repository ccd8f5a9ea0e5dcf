"""Prediction writers of the purify stage: what a pass writes per input shard, atomically.

:class:`ScoreWriter` (score pass) writes the scores of a shard; :class:`PurifyWriter` (write pass)
writes the purified output shard and then its done-marker, the record a rerun skips the shard by.
Both collect a shard's batches in :class:`_ShardBuffer` until its last one arrives.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from rssqa.data.caption_rules import RuleCounter
from rssqa.data.shards import write_shard
from rssqa.runs import atomic_write_json


# ============================================================================================ writers
def shard_name(index: int) -> str:
    """Output name of input shard ``index``."""
    return f"shard-{index:06d}"


class _ShardBuffer(BasePredictionWriter):
    """Collects a shard's batches (possibly interleaved with other shards' from other workers)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.buffers: dict[int, list[tuple[dict, dict]]] = {}
        self.samples = 0
        self.compute_s = 0.0
        self.wall_s = 0.0
        self.rank = 0
        self._t0 = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        # timed from here: a pass's wall time leaves out process launch and setup, not data loading
        self._t0 = time.perf_counter()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.wall_s = time.perf_counter() - self._t0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.rank = trainer.global_rank
        self.buffers.setdefault(batch["shard"], []).append((batch, prediction))
        self.samples += len(batch["key"]) + len(batch["bad"])
        self.compute_s += prediction["compute_s"]
        if batch["last"]:
            self.finish(batch["shard"], batch["url"], self.buffers.pop(batch["shard"]))

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        raise NotImplementedError


class ScoreWriter(_ShardBuffer):
    """Score pass: writes ``scores/shard-<i>.json`` (keys, rule flags, scores) per input shard."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        keys, rules, scores = [], [], []
        for batch, pred in parts:
            keys += batch["key"]
            rules += batch["rule"]
            scores += pred["score"]
        atomic_write_json(self.folder / f"{shard_name(index)}.json", {"url": url, "keys": keys, "rules": rules, "scores": scores})


class PurifyWriter(_ShardBuffer):
    """Write pass: the purified output shard, then the done-marker with counts and per-sample records.

    Output samples keep the image bytes as they were, ``txt`` = the chosen caption (so that pretraining
    reads purified shards like raw ones) and ``json`` = the source meta plus ``purify``: original
    caption, chosen caption, scores, decision, rule, round.
    """

    def __init__(self, shard_dir: Path, done_dir: Path, round_index: int, threshold: float):
        super().__init__()
        self.shard_dir, self.done_dir, self.round, self.threshold = shard_dir, done_dir, round_index, threshold

    def finish(self, index: int, url: str, parts: list[tuple[dict, dict]]) -> None:
        samples, records, bad = [], [], []
        rules, gen_rules = RuleCounter(), RuleCounter()
        counts: Counter[str] = Counter()
        compute_s = 0.0
        for batch, pred in parts:
            compute_s += pred["compute_s"]
            bad += [{"key": k, "reason": r} for k, r in batch["bad"]]
            for i, key in enumerate(batch["key"]):
                decision = pred["decision"][i]
                counts[decision] += 1
                rules.add(batch["rule"][i])
                if pred["generated"][i] is not None:
                    gen_rules.add(pred["gen_rule"][i])
                chosen = {"kept": batch["clean"][i], "rewritten": pred["generated"][i]}.get(decision)
                info = {
                    "decision": decision,
                    "original_caption": batch["caption"][i],
                    "caption": chosen,
                    "rule": batch["rule"][i],
                    "score": pred["score"][i],
                    "generated": pred["generated"][i],
                    "gen_score": pred["gen_score"][i],
                    "gen_rule": pred["gen_rule"][i],
                    "round": self.round,
                    "threshold": self.threshold,
                }
                records.append({"key": key, **info, "meta": batch["meta"][i]})
                if chosen is not None:
                    meta = {**batch["meta"][i], "purify": info}
                    samples.append({"__key__": key, batch["ext"][i]: batch["image"][i], "txt": chosen, "json": meta})
        name = f"{shard_name(index)}.tar"
        write_shard(self.shard_dir / name, samples)
        n_in = len(records) + len(bad)
        marker = {
            "url": url,
            "index": index,
            "output": name,
            "rank": self.rank,
            "n_in": n_in,
            "n_kept": counts["kept"],
            "n_rewritten": counts["rewritten"],
            "n_dropped": counts["dropped"],
            "n_bad": len(bad),
            "rules": rules.as_dict(),
            "generated_rules": gen_rules.as_dict(),
            "compute_s": compute_s,
            "bad": bad,
            "records": records,
        }
        atomic_write_json(self.done_dir / f"{shard_name(index)}.json", marker)
