"""Build RS-SQED: ``python stages/sqed.py --config conf/smoke/sqed.yaml --out runs/smoke/sqed``.

Relative source roots in the config resolve against ``--data_root`` (default: the parent of
``--out``, i.e. ``runs/<profile>``), so ``RUNS=`` moves the world and RS-SQED together.

On many ranks, the same command: ``make sqed NODES=2 GPUS=8`` starts it 16 times (srun or torchrun,
see ``rssqa.launch``) and each process takes its rank from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
(else ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``). Each rank trains and labels its share of the
(source, method) units on its own GPU and prints what it did; every rank then waits for the others' units
(at most ``--wait_s`` without one finishing) and computes the agreement between methods of its share of
each pool, and rank 0 joins the shares and writes the table and the summary, equal to a one-process run's. A rerun or a requeued job reuses every finished unit.
On one machine, ``--local_ranks 2`` (``local_ranks: 2`` in the config) starts the second rank itself: two
processes that share the units as two cluster ranks do, so that both cores stay busy (the same table as one
process). By hand: ``RANK=0 WORLD_SIZE=2 python stages/sqed.py ... & RANK=1 WORLD_SIZE=2 python stages/sqed.py ...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from multiprocessing.process import BaseProcess

import torch
from jsonargparse import CLI

from rssqa.errors import RSSQAError
from rssqa.processes import forked, worker_context
from rssqa.runs import SUMMARY, atomic_write_json, is_done, process_times, read_summary
from rssqa.tasks.sqed import Ranks, SQEDConfig, build_sqed, plan_sqed
from rssqa.tracking import quiet_lightning


def main(
    sqed: SQEDConfig,
    out: str = "runs/smoke/sqed",
    data_root: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    wait_s: float = 86400.0,
    local_ranks: int = 1,
) -> None:
    """Train the methods, label the pool, write the table, the label shards and the summary.

    Args:
        sqed: the stage configuration.
        out: the run folder; summary.json is written last.
        data_root: base of relative source roots (default: the parent of out).
        force: build again even when out holds a summary of the same configuration (checkpoints
            and label shards that still match are reused either way).
        dry_run: check the configuration and print the plan; read no data, train nothing.
        wait_s: on many ranks, how long rank 0 waits for the other ranks without any of their units
            finishing before it stops with an error naming the missing units.
        local_ranks: where no launcher set ranks, start this many ranks on this machine (this process is
            rank 0 and starts the others with the same command line); ignored under a launcher.
    """
    if local_ranks < 1:
        raise RSSQAError(f"local_ranks: must be at least 1, got {local_ranks}")
    if dry_run:
        print(json.dumps(plan_sqed(sqed, data_root or os.path.dirname(os.path.abspath(out))), indent=2))
        return
    ranks = Ranks.from_env()
    if ranks.world_size > 1:  # flushed now: a launch that started too few ranks shows at once
        print(f"sqed: rank {ranks.rank} of {ranks.world_size}, local rank {ranks.local_rank}", flush=True)
    if is_done(out) and not force:
        if read_summary(out).get("config") == json.loads(json.dumps(asdict(sqed))):
            print(f"{out}: already built with this configuration; pass --force to build again")
            return
        print(f"{out}: built with another configuration; building again (matching parts are reused)")
    quiet_lightning()
    others: list[subprocess.Popen | _ForkedRank] = []
    if local_ranks > 1 and ranks.world_size == 1:
        threads = sqed.threads or torch.get_num_threads()
        if local_ranks * threads > (os.cpu_count() or 1):  # OpenMP threads that outnumber the cores spin idle
            print(f"sqed: warning: {local_ranks} local ranks x {threads} threads on {os.cpu_count()} cores; "
                  "set sqed.threads so that they fit", flush=True)  # fmt: skip
        others, ranks = _start_local_ranks(local_ranks, one_thread=threads == 1), Ranks(0, local_ranks, 0)
    try:
        s = build_sqed(sqed, out, data_root, ranks=ranks, wait_s=wait_s)
        failed = [i + 1 for i, p in enumerate(others) if p.wait() != 0]
        if failed:
            raise RSSQAError(f"sqed: local rank {failed[0]} of {local_ranks} failed (its error is printed above)")
        if others:  # the summary's CPU time counts the other ranks too, now that they have ended
            s["cpu_s"] = process_times()["cpu_s"]
            atomic_write_json(os.path.join(out, SUMMARY), s)
    finally:
        for p in others:  # rank 0 failed: the others stop too (a rerun reuses every finished unit)
            if p.poll() is None:
                p.terminate()
                p.wait()
    if ranks.world_size > 1:
        for unit, done in s["units"].items():
            print(
                f"  rank {ranks.rank}: {unit} {'trained' if done['trained'] else 'reused its checkpoint'}, "
                f"{'labelled' if done['labelled'] else 'reused its label shard'}"
            )
    if ranks.rank:  # s is this rank's report; rank 0's is the summary
        print(
            f"sqed rank {ranks.rank}/{ranks.world_size} -> {out}: {len(s['units'])} units, trained "
            f"{s['trained']}, labelled {s['labelled']}, {s['seconds']} s; rank 0 writes the table"
        )
        return
    print(
        f"sqed -> {out}: {s['n_images']} images x {s['n_methods']} methods = {s['n_rows']} rows, "
        f"OA {s['oa_mean']:.3f} +- {s['oa_std']:.3f}, best method {s['best_method']} on "
        f"{s['best_method_share']:.0%} of images, {s['seconds']} s"
    )
    for method, oa in sorted(s["per_method_oa"].items(), key=lambda kv: -kv[1]):
        print(f"  {method:<14} OA {oa:.3f}  best on {s['wins'].get(method, 0)} images")


def _start_local_ranks(n: int, one_thread: bool) -> list[subprocess.Popen | _ForkedRank]:
    """Ranks 1 .. n-1 of an ``n``-rank build on this machine: this command line again, with torchrun's
    rank variables set (this process is rank 0); forked where that is safe (``rssqa.processes``: no
    second import of torch, Lightning and smp, 10 to 19 s of a core here), else a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    rank_env = [{**env, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r)} for r in range(1, n)]
    context = worker_context(one_thread)
    how = "forked from it" if forked(context) else "fresh interpreters"
    print(f"sqed: {n} ranks on this machine (this process is rank 0, the others {how})", flush=True)
    if forked(context):
        return [_ForkedRank(context.Process(target=_run_rank, args=(e, sys.argv[1:]))) for e in rank_env]
    return [subprocess.Popen([sys.executable, *sys.argv], env=e) for e in rank_env]


def _run_rank(env: dict[str, str], args: list[str]) -> None:
    """A forked local rank: this stage's command line under the rank's variables."""
    os.environ.clear()
    os.environ.update(env)
    _cli(args)


def _cli(args: list[str] | None = None) -> None:
    """The stage's command line (``args``, default ``sys.argv``); an RSSQAError is one line, exit status 1
    (``RSSQA_DEBUG=1``: its traceback)."""
    try:
        CLI(main, as_positional=False, args=args)
    except RSSQAError as e:
        if os.environ.get("RSSQA_DEBUG"):
            raise
        sys.exit(f"error: {e}")


class _ForkedRank:
    """A forked rank behind the part of ``subprocess.Popen`` that rank 0 uses (its exit code is Popen's)."""

    def __init__(self, process: BaseProcess) -> None:
        self.process = process
        process.start()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()


if __name__ == "__main__":
    _cli()
