"""Shared by the benchmarks: repeated timing, medians, and the JSON + table every benchmark writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def time_runs(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Time each ``fn`` (which returns the number of items it processed) ``repeats`` times, interleaved.

    Interleaving puts every contender under the same background load of a shared machine.

    Returns:
        name -> items per second of each run.
    """
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return rates


def median(xs: list[float]) -> float:
    """The median, rounded for reports."""
    return round(statistics.median(xs), 2)


def write_report(out: str | os.PathLike, name: str, results: dict[str, Any], rows: list[tuple]) -> None:
    """Write ``out`` (JSON) with machine facts, and print a small table of ``rows`` (name, value, note)."""
    payload = {
        "benchmark": name,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **results,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    width = max(len(str(r[0])) for r in rows)
    print(f"\n{name}")
    for label, value, note in rows:
        print(f"  {label:<{width}}  {value:>12}  {note}")
    print(f"  -> {out}")
