"""Evaluation of purification against the embedded world's hidden truth (evaluation only).

A caption counts as flagged noisy when purification did not keep it as it was (``rewritten`` or
``dropped``); the truth is ``meta["truth"]["noisy"]``, which only the world writes and only this
module reads. Samples without truth (real corpora) are not evaluated; bad samples have no decision.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def noise_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Confusion counts of flagged-noisy vs truly-noisy, overall and per noise kind.

    Args:
        records: per-sample records of the done-markers (``decision`` and ``meta``).

    Returns:
        ``{"tp", "fp", "fn", "tn", "n_with_truth", "per_kind": {kind: {"n", "flagged"}}}``.
    """
    c: Counter[str] = Counter()
    per_kind: dict[str, Counter[str]] = {}
    for rec in records:
        truth = rec.get("meta", {}).get("truth")
        if not isinstance(truth, dict) or "noisy" not in truth:
            continue
        flagged = rec["decision"] != "kept"
        noisy = bool(truth["noisy"])
        c[("t" if flagged == noisy else "f") + ("p" if flagged else "n")] += 1
        kind = truth.get("noise") or "clean"
        k = per_kind.setdefault(kind, Counter())
        k["n"] += 1
        k["flagged"] += int(flagged)
        k[rec["decision"]] += 1
    return {
        "tp": c["tp"], "fp": c["fp"], "fn": c["fn"], "tn": c["tn"], "n_with_truth": sum(c.values()),
        "per_kind": {kind: dict(v) for kind, v in sorted(per_kind.items())},
    }  # fmt: skip


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of the positive class (0 where undefined)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def noise_metrics(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """``noise_precision``, ``noise_recall``, ``noise_f1`` and per-kind detail from done-markers.

    Returns an empty dict when no record carries the world's truth (a real corpus).
    """
    counts = noise_counts([rec for m in markers for rec in m["records"]])
    if counts["n_with_truth"] == 0:
        return {}
    p, r, f = precision_recall_f1(counts["tp"], counts["fp"], counts["fn"])
    per_kind = {
        kind: {**v, "flagged_share": round(v["flagged"] / v["n"], 4)} for kind, v in counts["per_kind"].items()
    }
    return {
        "noise_precision": round(p, 4),
        "noise_recall": round(r, 4),
        "noise_f1": round(f, 4),
        "noise_confusion": {k: counts[k] for k in ("tp", "fp", "fn", "tn")},
        "noise_per_kind": per_kind,
    }
