"""The examples table of the purify stage: a few pairs of each decision, before and after.

:func:`example_rows` picks up to a given number of records of each decision (kept, rewritten,
dropped) from the done-markers, in input order; :func:`write_examples_csv` writes them as CSV.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any

from rssqa.runs import atomic_write_bytes

DECISIONS = ("kept", "rewritten", "dropped")


# ============================================================================================ examples
EXAMPLE_COLUMNS = ["key", "decision", "rule", "before", "after", "score", "after_score"]


def example_rows(markers: list[dict[str, Any]], per_decision: int) -> list[dict[str, Any]]:
    """Up to ``per_decision`` examples of each decision, in input order (before, after, scores)."""
    rows, seen = [], Counter()
    for m in markers:
        for rec in m["records"]:
            d = rec["decision"]
            if seen[d] >= per_decision:
                continue
            seen[d] += 1
            after = rec["caption"] if d != "dropped" else rec["generated"]
            after_score = rec["score"] if d == "kept" else rec["gen_score"]
            rows.append({"key": rec["key"], "decision": d, "rule": rec["rule"] or "", "before": rec["original_caption"],
                         "after": after or "", "score": round(rec["score"], 4),
                         "after_score": None if after_score is None else round(after_score, 4)})  # fmt: skip
    return sorted(rows, key=lambda r: (DECISIONS.index(r["decision"]), r["key"]))


def write_examples_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the examples table as CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXAMPLE_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
