"""The stage itself: check a configuration (:func:`plan_sqed`) and build RS-SQED (:func:`build_sqed`).

Each rank prepares the sources it needs and builds its own units; rank 0 then waits for the other
ranks' checkpoints and label shards, and writes ``splits.json``, the table, the OA plot and, last,
``summary.json``, with throughput as recorded when each part was made, and publishes to W&B.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from rssqa import progress
from rssqa.agreement import MIN_METHODS
from rssqa.data.segsets import list_layouts
from rssqa.data.sqed import (
    SPLITS,
    TABLE,
    assign_splits,
    oa_summary,
    plot_oa,
    read_shard_meta,
    shard_matches,
    write_table,
)
from rssqa.errors import RSSQAError
from rssqa.models.segmenters import add_method_config, check_buildable, list_methods, resolve_method
from rssqa.runs import atomic_write_json, write_summary
from rssqa.tasks.sqed.agreement import (
    agree_source,
    agreement_columns,
    await_agreement,
    label_and_agree,
    source_owner,
)
from rssqa.tasks.sqed.config import SQEDConfig
from rssqa.tasks.sqed.label import _rows, _shard_path, label_method
from rssqa.tasks.sqed.ranks import Ranks, _owner, assign_units, await_others
from rssqa.tasks.sqed.sources import (
    PreparedSource,
    _label_fingerprint,
    _train_fingerprint,
    prepare_source,
    training_data,
)
from rssqa.tasks.sqed.train import _unit_folder, train_method
from rssqa.tracking import finish_runs, make_loggers, publish

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often rank 0 looks for the other ranks' units


def _wandb(cfg: SQEDConfig, out: Path) -> list[Logger]:
    """The W&B logger the methods' fits share (their CSV logs are per source and method)."""
    if cfg.wandb not in ("offline", "online", "disabled"):
        raise RSSQAError(f"wandb: {cfg.wandb!r}; choose offline, online or disabled")
    return make_loggers(out, "sqed", wandb=cfg.wandb != "disabled", csv=False)


def plan_sqed(cfg: SQEDConfig, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a configuration without reading data or training (a dry run).

    Registers ``method_configs``, resolves every method at ``size`` and checks that smp knows its
    architecture and encoder; checks splits and source names; with ``data_root``, checks that the
    source folders exist.

    Returns:
        ``{"methods": {name: {arch, encoder, epochs}}, "sources": {name: {layout, root, exists}}}``.
    """
    for path in cfg.method_configs:
        add_method_config(path)
    methods = cfg.methods or list_methods()
    if len(set(methods)) != len(methods):
        raise RSSQAError(f"methods: {methods} lists a method twice")
    unknown = set(cfg.method_overrides) - set(methods)
    if unknown:
        raise RSSQAError(f"method_overrides: {sorted(unknown)} are not among the methods {methods}")
    plan: dict[str, Any] = {"methods": {}, "sources": {}}
    for m in methods:
        spec = resolve_method(m, cfg.size, cfg.method_overrides.get(m))
        check_buildable(spec)
        plan["methods"][m] = {
            "arch": spec.arch,
            "encoder": spec.encoder_name,
            "epochs": spec.epochs(cfg.train.epochs),
        }
    if set(cfg.splits) - set(SPLITS) or "seg" not in cfg.splits:
        raise RSSQAError(f"splits: keys must be among {SPLITS} and include seg; got {sorted(cfg.splits)}")
    assign_splits({}, cfg.splits)  # checks the fractions
    for key, value in (("train.batch_size", cfg.train.batch_size), ("label.batch_size", cfg.label.batch_size),
                       ("label.chunk", cfg.label.chunk), ("label.grid", cfg.label.grid), ("label.hist_bins", cfg.label.hist_bins)):
        if value < 1:
            raise RSSQAError(f"{key}: must be positive, got {value}")
    if cfg.on_bad not in ("error", "skip"):
        raise RSSQAError(f"on_bad: {cfg.on_bad!r}; choose error or skip")
    names = [s.name for s in cfg.sources]
    if not names or len(set(names)) != len(names):
        raise RSSQAError(f"sources: need one or more, with distinct names; got {names}")
    for sc in cfg.sources:
        layout = sc.layout or sc.name
        if layout not in list_layouts():
            raise RSSQAError(f"sources: {sc.name}: layout {layout!r} unknown; choose from {list_layouts()}")
        root = Path(sc.root)
        if not root.is_absolute() and data_root is not None:
            root = Path(data_root) / root
        plan["sources"][sc.name] = {"layout": layout, "root": str(root), "exists": root.is_dir()}
    return plan


def build_sqed(
    cfg: SQEDConfig,
    out: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    *,
    ranks: Ranks | None = None,
    wait_s: float = 86400.0,
) -> dict[str, Any]:
    """Build this rank's units of RS-SQED under ``out``; on rank 0, then the table and ``summary.json`` (last).

    Args:
        cfg: the stage configuration.
        out: the run folder (``runs/<profile>/sqed``).
        data_root: base of relative source roots (default: ``out``'s parent, i.e. ``runs/<profile>``).
        ranks: this process's rank (default :meth:`Ranks.from_env`; one process unless a launcher set
            ranks). Rank ``r`` builds the units of :func:`assign_units`.
        wait_s: rank 0 gives up (``RSSQAError`` naming the missing units) when none of the other
            ranks' units has finished for this many seconds.

    Returns:
        On rank 0 the summary: keys of shared/DESIGN.md plus timings, counts and bad samples, where
        ``units``, ``trained``, ``reused_checkpoints``, ``labelled``, ``reused_shards``, ``train_s`` and
        ``label_s`` cover rank 0's own units (all of them in a one-process run). On another rank its
        report: ``rank``, ``world_size``, ``units`` (``{"<source>/<method>": {trained, labelled}}``),
        the same counts and ``seconds``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    data_root = Path(data_root) if data_root is not None else out.parent
    ranks = Ranks.from_env() if ranks is None else ranks
    lead = ranks.rank == 0
    if not lead:
        # Lightning read this rank from the environment at import, as for a DDP job, and keeps its
        # rank-zero-only writers (the CSV logs) silent elsewhere; here each rank runs its own fits
        rank_zero_only.rank = 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods = list(plan_sqed(cfg)["methods"])
    names = [sc.name for sc in cfg.sources]
    mine = assign_units(names, methods, ranks)
    # rank 0 prepares every source (it writes the table) and alone writes the pools; the others
    # prepare only the sources of their units, in the same way
    needed = set(names) if lead else {s for s, _ in mine}
    preps = {
        sc.name: prepare_source(sc, cfg, out, data_root, write_pool=lead)
        for sc in cfg.sources
        if sc.name in needed
    }
    if lead:
        atomic_write_json(
            out / "splits.json",
            {p.name: dict(zip(p.pool_ids, p.pool_splits, strict=True)) for p in preps.values()}
            | {"_seg": {p.name: [p.source.samples[i].image_id for i in p.seg] for p in preps.values()}},
        )
    t_prep = time.perf_counter()
    loggers = _wandb(cfg, out) if lead else []
    units: dict[str, dict[str, bool]] = {}
    timing = {
        "train_s": 0.0,
        "label_s": 0.0,
        "trained": 0,
        "reused_checkpoints": 0,
        "labelled": 0,
        "reused_shards": 0,
    }
    shard_bytes, recorded = 0, {"train_s": 0.0, "train_images": 0, "label_s": 0.0, "label_rows": 0}
    agreeing = len(methods) >= MIN_METHODS
    since = time.time()  # an agreement file written after this is this run's
    agreed: dict[str, tuple[Path | None, bool]] = {}  # per source: its agreement file, whether written now
    try:
        for name, group in itertools.groupby(mine, key=lambda unit: unit[0]):
            prep = preps[name]
            # read only if a method needs training, then shared by the source's methods, then freed
            data = functools.cache(functools.partial(training_data, prep, cfg))
            group_methods = [m for _, m in group]
            # this rank builds every method of the source: it labels them and their agreement in one pass
            owns_source = source_owner(names, methods, name, ranks.world_size) == ranks.rank
            together: dict[str, Any] | None = {} if agreeing and owns_source else None
            for method in group_methods:
                t = time.perf_counter()
                task, trained = train_method(prep, method, cfg, out, loggers, data, ranks)
                timing["train_s"] += time.perf_counter() - t
                timing["trained" if trained else "reused_checkpoints"] += 1
                labelled = False
                if together is None:
                    t = time.perf_counter()
                    _, labelled = label_method(prep, method, task, cfg, out, ranks)
                    timing["label_s"] += time.perf_counter() - t
                    timing["labelled" if labelled else "reused_shards"] += 1
                else:
                    together[method] = task
                units[f"{name}/{method}"] = {"trained": trained, "labelled": labelled}
                done = len(units)
                elapsed = time.perf_counter() - t_prep
                of_rank = f" of rank {ranks.rank}" if ranks.world_size > 1 else ""
                progress.line("sqed", f"{name}/{method} {'trained' if trained else 'reused'}: unit {done}/{len(mine)}"
                                      f"{of_rank}, {elapsed:.0f} s{progress.eta(done, len(mine), elapsed)}")  # fmt: skip
            if together is not None:
                t = time.perf_counter()
                labels, agree_file, new = label_and_agree(prep, together, cfg, out, ranks)
                timing["label_s"] += time.perf_counter() - t
                for method, labelled in labels.items():
                    timing["labelled" if labelled else "reused_shards"] += 1
                    units[f"{name}/{method}"]["labelled"] = labelled
                agreed[name] = (agree_file if lead else None, new)
                progress.line("sqed", f"{name}: {len(labels)} methods labelled and their agreement in one pass, "
                                      f"{time.perf_counter() - t:.0f} s")  # fmt: skip
                del together
        timing = {k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()}
        if not lead and not agreeing:
            return _rank_report(ranks, units, timing, t0)
        for sc in cfg.sources:  # a rank but 0 prepared only its units' sources
            if sc.name not in preps:
                preps[sc.name] = prepare_source(sc, cfg, out, data_root, write_pool=False)
        t_wait = time.perf_counter()
        others = [(preps[s], m) for s in names for m in methods if f"{s}/{m}" not in units]
        _await_units(others, cfg, out, names, methods, ranks.world_size, wait_s)
        t_wait = time.perf_counter() - t_wait
        # agreement between each source's methods, now that all of them are labelled: every rank computes a
        # share of a source whose methods several ranks built; one rank built them all: it wrote it already
        t_agree = time.perf_counter()
        for name in names:
            if name in agreed:
                continue
            fps = [read_shard_meta(_shard_path(out, name, m))["fingerprint"] for m in methods]
            if not agreeing or source_owner(names, methods, name, ranks.world_size) is None:
                agreed[name] = agree_source(preps[name], methods, fps, cfg, out, ranks, wait_s)
            elif lead:
                agreed[name] = await_agreement(preps[name], methods, fps, cfg, out, wait_s, since)
        t_agree = time.perf_counter() - t_agree
        if not lead:
            return _rank_report(ranks, units, timing, t0, waited_s=round(t_wait, 2), agreement_s=round(t_agree, 2))
        # the table, source by source and method by method, from the shards whichever rank wrote them
        rows: list[dict[str, Any]] = []
        for prep in preps.values():
            for method in methods:
                path = _shard_path(out, prep.name, method)
                shard_bytes += path.stat().st_size
                for k, v in _recorded(out, prep, method, path).items():
                    recorded[k] += v
                new_rows = _rows(prep, method, path, out)
                agree_file = agreed[prep.name][0]
                if agree_file is not None:
                    cols = agreement_columns(agree_file, prep, method)
                    for r in new_rows:
                        r.update({k: float(v[r["feature_row"]]) for k, v in cols.items()})
                log.info("%s/%s: mean OA %.3f", prep.name, method, np.mean([r["oa"] for r in new_rows]))
                rows += new_rows
    except BaseException:
        finish_runs(loggers)
        raise
    write_table(out / TABLE, rows)
    plot_oa(rows, out / "oa_distributions.png")
    summary = {
        **oa_summary(rows),
        "methods": methods,
        "sources": {
            p.name: {
                "layout": next(s.layout or s.name for s in cfg.sources if s.name == p.name),
                "classes": list(p.source.classes),
                "n_samples": len(p.source),
                "n_seg_train": len(p.seg),
                "n_pool": len(p.pool),
                "n_bad": len(p.source.bad),
                "n_unlabelled": len(p.source.unlabelled),
                "bad": [str(b) for b in p.source.bad[:20]],
            }
            for p in preps.values()
        },
        "n_bad": sum(len(p.source.bad) for p in preps.values()),
        "agreement": {
            "computed": sorted(s for s, (f, new) in agreed.items() if f is not None and new),
            "reused": sorted(s for s, (f, new) in agreed.items() if f is not None and not new),
            "seconds": round(t_agree, 2),
        },
        "feature_bytes_per_row": shard_bytes / max(len(rows), 1),
        # as recorded when each checkpoint and shard was made, so a resumed run reports the same
        "rows_labelled_per_s": _rate(recorded["label_rows"], recorded["label_s"]),
        "train_images_per_s": _rate(recorded["train_images"], recorded["train_s"]),
        "train_s_recorded": _finite(recorded["train_s"]),
        "label_s_recorded": _finite(recorded["label_s"]),
        **timing,
        "units": units,
        "world_size": ranks.world_size,
        "prepare_s": round(t_prep - t0, 2),
        "waited_s": round(t_wait, 2),  # for the other ranks' units
        "seconds": round(time.perf_counter() - t0, 2),
        "config": asdict(cfg),
    }
    per_method = [[m, summary["per_method_oa"].get(m), summary["wins"].get(m, 0)] for m in methods]
    publish(
        loggers, "sqed", {k: v for k, v in summary.items() if k not in ("config", "sources")},
        tables={"per_method": (["method", "oa_mean", "images_won"], per_method)},
        images={"oa_distributions": out / "oa_distributions.png"},
    )  # fmt: skip
    write_summary(out, summary)
    return summary


def _rank_report(ranks: Ranks, units: dict[str, dict[str, bool]], timing: dict[str, Any], t0: float, **extra: float) -> dict[str, Any]:
    """What a rank but 0 returns: its units, their timing, ``extra`` and its seconds."""
    return {"rank": ranks.rank, "world_size": ranks.world_size, "units": units, **timing, **extra,
            "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def _unit_done(out: Path, source: str, method: str, label_fp: str) -> bool:
    """Whether a unit's checkpoint and its label shard of this configuration are on disk (both are
    written atomically, the shard last)."""
    return (_unit_folder(out, source, method) / "final.ckpt").is_file() and shard_matches(
        _shard_path(out, source, method), label_fp
    )


def _await_units(
    units: Sequence[tuple[PreparedSource, str]],
    cfg: SQEDConfig,
    out: Path,
    sources: Sequence[str],
    methods: Sequence[str],
    world_size: int,
    wait_s: float,
) -> None:
    """Poll (every :data:`POLL_S` s) until the other ranks' ``units`` are done (see :func:`_unit_done`;
    :func:`~rssqa.tasks.sqed.ranks.await_others`).

    Raises:
        RSSQAError: none of them finished for ``wait_s`` seconds; names those missing and their ranks.
    """
    pending = {
        f"{p.name}/{m}": (p.name, m, _label_fingerprint(_train_fingerprint(p, m, cfg)[3], p, cfg.label.chunk))
        for p, m in units
    }

    def missing() -> list[str]:
        for k in [k for k, unit in pending.items() if _unit_done(out, *unit)]:
            del pending[k]
        return list(pending)

    def error(keys: Sequence[object]) -> str:
        named = ", ".join(f"{k} (rank {_owner(sources, methods, pending[k][0], pending[k][1], world_size)})" for k in keys)
        return f"{out}: no unit of the other ranks finished in {wait_s:g} s; missing {named} (are all WORLD_SIZE={world_size} ranks running?)"

    await_others(missing, wait_s, POLL_S, error)


def _recorded(out: Path, prep: PreparedSource, method: str, shard: Path) -> dict[str, float]:
    """Times and amounts recorded when a method's checkpoint and label shard were made."""
    record = out / "methods" / prep.name / method / "train.json"
    trained = json.loads(record.read_text()) if record.is_file() else {}
    return {
        "label_s": read_shard_meta(shard).get("seconds", math.nan),
        "label_rows": len(prep.pool),
        "train_s": trained.get("seconds", math.nan),
        "train_images": trained.get("images", 0) * trained.get("epochs", 0),
    }


def _finite(x: float) -> float | None:
    # parts built by an older version carry no timing: say "unknown", not NaN (invalid JSON)
    return round(x, 2) if math.isfinite(x) else None


def _rate(n: float, seconds: float) -> float | None:
    return round(n / seconds, 2) if math.isfinite(seconds) and seconds > 0 else None
