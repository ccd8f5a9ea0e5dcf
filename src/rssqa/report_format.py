"""Markdown pieces of the pipeline report (:mod:`rssqa.report`): numbers, tables, a difference with its interval."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals; ``None`` as an empty cell."""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return "" if x is None else str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table, its cells through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def diff_text(d: dict[str, Any] | None) -> str:
    """A difference with its interval and verdict (``diff``, ``low``, ``high``, ``verdict``): ``+0.012 [+0.003, +0.020] ahead``."""
    if not d:
        return ""
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['verdict']}"
