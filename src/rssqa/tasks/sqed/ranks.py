"""Ranks of a multi-process build: who this process is, which units it builds, on which device.

The units (source, method) are independent, so a cluster run starts the same command ``W`` times
and each process reads its rank from the launcher's environment (:meth:`Ranks.from_env`: torchrun,
else srun). :func:`assign_units` deals the units out so that each has exactly one owner, and
``_devices`` gives each rank's fits its own GPU.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rssqa.errors import RSSQAError

# (rank, world size, local rank) as torchrun sets them, then as srun does
_RANK_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-rank build.

    Attributes:
        rank: this process, in ``[0, world_size)``; rank 0 writes the table and the summary.
        world_size: processes building the units.
        local_rank: this process's index on its node: its GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """The ranks the launcher set: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else srun's
        ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, else one process.

        A shell in an interactive SLURM allocation (job name ``bash`` or ``interactive``) is one process,
        as Lightning has it.
        """
        env = os.environ if env is None else env
        torchrun, slurm = _RANK_ENV
        if torchrun[0] in env or torchrun[1] in env:
            keys = torchrun
        elif all(k in env for k in slurm[:2]) and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            keys = slurm
        else:
            return cls()
        rank, size, local = (_env_int(env, k) for k in keys)
        if size < 1 or not 0 <= rank < size or local < 0:
            raise RSSQAError(
                f"{keys[0]}: {rank} is not a rank of {keys[1]}={size} processes (local rank {local})"
            )
        return cls(rank, size, local)


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "0" if key in ("LOCAL_RANK", "SLURM_LOCALID") else None)
    if value is None:
        raise RSSQAError(f"{key}: not set, but the other rank variables of its launcher are")
    try:
        return int(value)
    except ValueError:
        raise RSSQAError(f"{key}: {value!r} is not an integer") from None


def assign_units(sources: Sequence[str], methods: Sequence[str], ranks: Ranks) -> list[tuple[str, str]]:
    """The (source, method) units that ``ranks.rank`` builds, in the order it builds them.

    Units are numbered method-major in config order, ``i = method_index * len(sources) + source_index``,
    and rank ``r`` of ``W`` owns those with ``i % W == r``: every unit has one owner, and when ``W`` is
    a multiple of the number of sources each rank meets one source only (decoded and checked once).
    A rank builds its units source by source, methods in config order, so that a source's training
    images are read once and freed before the next source's. With ``W = 1`` this is every unit, source
    by source: the table's row order.
    """
    return [
        (s, m)
        for s in sources
        for m in methods
        if _owner(sources, methods, s, m, ranks.world_size) == ranks.rank
    ]


def _owner(sources: Sequence[str], methods: Sequence[str], source: str, method: str, world_size: int) -> int:
    """The rank that builds a unit (see :func:`assign_units`)."""
    return (methods.index(method) * len(sources) + sources.index(source)) % world_size


def _devices(accelerator: str, local_rank: int) -> int | list[int]:
    """Lightning's ``devices`` for one rank's fits: one CPU process, or the rank's own GPU.

    Ranks sharing a node see all its GPUs (srun with ``--gpus-per-node``, torchrun) and take GPU
    ``local_rank``; a process that sees a single GPU was bound to it by its launcher and takes that one.
    """
    if not (accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())):
        return 1
    n = torch.cuda.device_count()
    if n == 1:
        return [0]
    if n and local_rank >= n:
        raise RSSQAError(f"LOCAL_RANK: {local_rank}, but this process sees {n} GPUs (one rank per GPU)")
    return [local_rank]


def await_others(missing: Callable[[], Sequence[object]], wait_s: float, poll_s: float, error: Callable[[Sequence[object]], str]) -> None:
    """Poll ``missing()`` (what the other ranks have not delivered yet) every ``poll_s`` seconds until it is empty.

    SLURM signals every task (SIGUSR1) before the time limit; the ranks still training then checkpoint and
    requeue the job: a rank waiting here ignores the signal meanwhile (srun would end the job when it
    exited, with no requeue).

    Raises:
        RSSQAError: ``error(missing)`` when nothing more came in for ``wait_s`` seconds.
    """
    left = missing()
    if not left:
        return
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        progress = time.monotonic()
        while True:
            time.sleep(poll_s)
            now = missing()
            if not now:
                return
            if len(now) < len(left):
                progress = time.monotonic()
            elif time.monotonic() - progress > wait_s:
                raise RSSQAError(error(now))
            left = now
    finally:
        signal.signal(signal.SIGUSR1, previous)
