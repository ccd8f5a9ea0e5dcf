"""Print (and write ``summary.md``) one table of every benchmark JSON under a folder.

Usage: ``python -m bench.table runs/bench``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def headline(data: dict) -> str:
    """The scalar results of one benchmark, as ``key=value`` pairs."""
    skip = {"benchmark", "machine", "runs", "target"}
    parts = []
    for k, v in data.items():
        if k in skip:
            continue
        if isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()):
            parts += [f"{k}.{kk}={vv:g}" for kk, vv in v.items()]
        elif isinstance(v, int | float | bool):
            parts.append(f"{k}={v:g}" if not isinstance(v, bool) else f"{k}={v}")
    return ", ".join(parts)


def main(folder: str = "runs/bench") -> None:
    rows = [(p.stem, json.loads(p.read_text())) for p in sorted(Path(folder).glob("*.json"))]
    lines = ["| benchmark | what | results |", "|---|---|---|"]
    lines += [f"| {name} | {d.get('benchmark', '')} | {headline(d)} |" for name, d in rows]
    text = "\n".join(lines) + "\n"
    (Path(folder) / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
