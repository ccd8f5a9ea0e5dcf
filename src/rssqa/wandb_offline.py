"""Read an offline Weights & Biases run back, without syncing it: its identity, summary and history.

An offline run keeps everything in ``run-<id>.wandb``, a log of protobuf records in 32 KiB blocks
(each chunk: CRC32, length, type: full, first, middle or last). wandb offers no local reader in the
version we pin, so this short one serves the tests and anyone checking a run on a machine with no
network before ``wandb sync``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rssqa.errors import RSSQAError

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise RSSQAError(f"{path}: not a W&B run log")
    pos, chunks = 7, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + _HEADER : pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _items(items) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(run_dir: str | os.PathLike, wait_s: float = 0.0) -> dict[str, Any]:
    """Read ``run_dir`` (an ``offline-run-*`` folder, or a ``wandb`` folder: its latest run).

    Args:
        run_dir: the run's folder, or a ``wandb`` folder (its ``latest-run``).
        wait_s: how long to wait, polling, for the log of a finished run (its exit record): W&B's service
            process may still be writing the log after ``finish()`` has returned on a busy machine.

    Returns:
        ``{"project", "group", "name", "job_type", "tags", "config", "summary", "history"}`` where
        summary holds the last value of every key and history one dict per logged step.
    """
    run_dir = Path(run_dir)
    if (run_dir / "latest-run").exists():
        run_dir = (run_dir / "latest-run").resolve()
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise RSSQAError(f"{run_dir}: no run-*.wandb log in this folder")
    deadline = time.monotonic() + wait_s
    while True:
        out, finished = _read_log(logs[0])
        if finished or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if "project" not in out:
        raise RSSQAError(f"{logs[0]}: no run record in the log (is the run still being written?)")
    return out


def _read_log(path: Path) -> tuple[dict[str, Any], bool]:
    """The run's identity, config, summary and history, and whether the log holds the run's exit."""
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": []}
    finished = False
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(project=r.run.project, group=r.run.run_group, name=r.run.display_name,
                       job_type=r.run.job_type, tags=list(r.run.tags))  # fmt: skip
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
        elif kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "exit":
            finished = True
    return out, finished
