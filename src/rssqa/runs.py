"""The run-folder contract: ``<root>/<profile>/<stage>/``, with ``summary.json`` written last, atomically.

A stage is done when its summary exists; the Makefile and downstream stages rely on exactly that.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from rssqa.errors import RSSQAError

SUMMARY = "summary.json"
# a stage's process imports rssqa first thing: its wall time is counted from here, or from the fork that
# started it (a stage forked from a preloaded interpreter, rssqa.preload)
_STARTED = time.monotonic()


def _restart_clock() -> None:
    global _STARTED
    _STARTED = time.monotonic()


os.register_at_fork(after_in_child=_restart_clock)


def stage_dir(root: str | os.PathLike, profile: str, stage: str) -> Path:
    """Return ``root/profile/stage`` (not created)."""
    return Path(root) / profile / stage


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
    return atomic_write_bytes(path, text.encode())


def process_times() -> dict[str, float]:
    """``wall_s`` since this process imported rssqa and ``cpu_s`` (user + system) of this process and
    of its children that have ended (a DDP rank still running is not counted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"wall_s": round(time.monotonic() - _STARTED, 2), "cpu_s": round(cpu, 2)}


def write_summary(folder: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``folder/summary.json``: call this last, it marks the stage as done.

    Adds ``wall_s`` and ``cpu_s`` (:func:`process_times`) to ``summary`` (in place, so that what a
    stage returns is what it wrote) unless the stage set them, so the report can show where a
    pipeline's time went and how busy the cores were.
    """
    for k, v in process_times().items():
        summary.setdefault(k, v)
    return atomic_write_json(Path(folder) / SUMMARY, summary)


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``folder/summary.json``, with a one-line error when the stage has not finished."""
    return read_json(Path(folder) / SUMMARY, f"not found; run the stage that writes {Path(folder).name} first")


def read_json(path: Path, missing: str, invalid: str = "not valid JSON") -> Any:
    """The JSON in ``path``, or a one-line error naming it: ``missing`` where it is no file, ``invalid`` with the
    parser's reason where it does not parse."""
    if not path.is_file():
        raise RSSQAError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RSSQAError(f"{path}: {invalid} ({e.msg} at line {e.lineno})") from None


def is_done(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a summary, i.e. its stage finished."""
    return (Path(folder) / SUMMARY).is_file()


def resolve_under(spec: str | list[str], root: str | os.PathLike) -> str | list[str]:
    """Make relative paths in ``spec`` (a path, a shard pattern or a list of them) relative to ``root``.

    Stage configs name their inputs relative to ``runs/<profile>``, so ``RUNS=`` moves all stages
    together; absolute paths and URLs (``pipe:``, ``s3://`` ...) are left as they are.
    """

    def one(path: str) -> str:
        path = str(path)
        if os.path.isabs(path) or "://" in path or path.startswith("pipe:"):
            return path
        return str(Path(root) / path)

    return [one(p) for p in spec] if isinstance(spec, list) else one(spec)


def _jsonable(x: Any) -> Any:
    # numpy and torch scalars / arrays, Paths
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
