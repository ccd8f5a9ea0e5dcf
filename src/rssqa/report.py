"""The pipeline report: ``runs/<profile>/report.md`` + ``report.json`` + plots, every number read from
the stage summaries (and the benchmark JSONs), none typed by hand.

Usage: ``python -m rssqa.report --runs runs --profile demo``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

from rssqa.report_format import diff_text, fmt, md_table
from rssqa.report_scenes import scenes_section
from rssqa.runs import atomic_write_bytes, atomic_write_json, is_done, read_summary
from rssqa.tracking import publish_run, wandb_run

STAGES = ("world", "purify", "pretrain", "pretrain_raw", "sqed", "sqa", "scenes")
METRICS = ("srcc", "plcc", "krcc", "rmse")


def load_summaries(profile_dir: Path) -> dict[str, dict[str, Any]]:
    """Summaries of the finished stages under ``profile_dir`` (missing stages are left out)."""
    return {s: read_summary(profile_dir / s) for s in STAGES if is_done(profile_dir / s)}


def _bar(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path:
    """Grouped bar chart: groups = {series: {category: value}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = list(dict.fromkeys(c for g in groups.values() for c in g))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(cats) + 2), 3.6))
    width = 0.8 / max(len(groups), 1)
    for i, (name, vals) in enumerate(groups.items()):
        x = np.arange(len(cats)) + i * width
        ax.bar(x, [vals.get(c, np.nan) for c in cats], width, label=name)
    ax.set_xticks(np.arange(len(cats)) + width * (len(groups) - 1) / 2, cats, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _copy_plots(stage_dir: Path, out_dir: Path, stage: str) -> list[Path]:
    copied = []
    for png in sorted([*stage_dir.glob("*.png"), *stage_dir.glob("figures/*.png")]):
        dst = out_dir / f"{stage}_{png.name}"
        shutil.copyfile(png, dst)
        copied.append(dst)
    return copied


def _examples(purify_dir: Path, per_decision: int = 3) -> list[dict[str, str]]:
    """Up to ``per_decision`` rows of each decision (kept, rewritten, dropped) from purify's examples.csv."""
    path = purify_dir / "examples.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        d = r.get("decision", "")
        if seen.get(d, 0) < per_decision:
            seen[d] = seen.get(d, 0) + 1
            out.append(r)
    return out


def _benchmarks(bench_dir: Path) -> list[list[Any]]:
    rows = []
    for path in sorted(bench_dir.glob("*.json")):
        data = json.loads(path.read_text())
        headline = {k: v for k, v in data.items() if isinstance(v, int | float | bool) and k != "target"}
        rows.append([path.stem, data.get("benchmark", ""), ", ".join(f"{k}={fmt(v)}" for k, v in headline.items())])
    return rows


def _stage_speeds(s: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Per-stage throughput rows read from the summaries (absent figures are left out)."""
    rows = []
    if "world" in s:
        w = s["world"]
        rows.append(["world", "image-text pairs generated", w.get("corpus_samples_per_s"), w.get("workers"), w.get("seconds")])
        rows.append(["world", "segmentation tiles generated", w.get("source_tiles_per_s"), w.get("workers"), w.get("seconds")])
    if "purify" in s:
        rows.append(["purify", "pairs scored, captioned, written", s["purify"].get("samples_per_s"), s["purify"].get("world_size"), s["purify"].get("seconds")])
    for name in ("pretrain", "pretrain_raw"):
        if name in s:
            rows.append([name, "training samples", s[name].get("samples_per_s"), s[name].get("world_size"), s[name].get("train_seconds")])
    if "sqed" in s:
        q = s["sqed"]
        rows.append(["sqed", "(image, method) rows labelled", q.get("rows_labelled_per_s"), q.get("world_size", 1), q.get("seconds")])
        rows.append(["sqed", "training images (all methods)", q.get("train_images_per_s"), q.get("world_size", 1), q.get("train_s_recorded")])
    if "sqa" in s:
        rows.append(["sqa", "models trained (RS-SQA + ablations)", None, 1, s["sqa"].get("seconds")])
    return [r for r in rows if r[2] is not None or r[0] == "sqa"]


def _stage_times(s: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Each stage's wall time, CPU time and CPU share (of one core) from its summary."""
    rows = []
    for name in ("world", "purify", "pretrain_raw", "pretrain", "sqed", "sqa", "scenes"):
        t = s.get(name, {})
        if t.get("wall_s"):
            rows.append([name, t["wall_s"], t.get("cpu_s"), round(t["cpu_s"] / t["wall_s"], 2) if t.get("cpu_s") is not None else None])
    return rows


def _pixel_margin(v: dict[str, Any] | None, best: str | None) -> str:
    if not v or not best:
        return ""
    interval = "-" if v.get("low") is None or v.get("high") is None else f"[{v['low']:+.3f}, {v['high']:+.3f}]"
    diff = "-" if v.get("diff") is None else f"{v['diff']:+.3f}"
    return f"head minus the best baseline ({best}) in pixel AUROC: {diff}, 95% interval {interval}, verdict: {v.get('verdict')}"


def _versus_cells(v: dict | None) -> list:
    """A bootstrap comparison as three table cells: the difference, its 95% interval and the verdict."""
    if not v:
        return [None, "", ""]
    return [v["diff"], f"[{v['low']:+.3f}, {v['high']:+.3f}]", v["verdict"]]


def _pixel_section(px: dict[str, Any], table: Any) -> str:
    """The pixel error head against the per-pixel label-free baselines (the sqa summary's ``pixel_error``)."""
    rec = px.get("recommended") or {}
    cols = [("every (image, method)", px), ("recommended method", rec)] if rec else [("every (image, method)", px)]
    rows = [["pixel error head", *[c.get(k) for _, c in cols for k in ("auroc", "ap")]]]
    for n in px.get("baselines", {}):
        if px["baselines"][n]:
            rows.append([n, *[(c.get("baselines", {}).get(n) or {}).get(k) for _, c in cols for k in ("auroc", "ap")]])
    top = (px.get("config") or {}).get("top") or 0
    trained = f"each image's {top} most accurate methods" if top else "all their methods"
    if px.get("quality_weighted"):
        power = (px.get("model") or {}).get("quality_power")
        images = f"{px.get('train_images')} val images ({trained})"
        if px.get("train_split") == "train+val":
            folds = (px.get("config") or {}).get("quality_folds")
            images = (f"{px.get('train_images')} train and val images ({trained}; on the train split, the scores of {folds} "
                      "fits that each left out the image's fold)")  # fmt: skip
        where = (f"{images}, its epoch chosen on other val images; it also reads the "
                 f"other methods' agreement weighted by their predicted OA ** {power:g} (the recommending model's scores, out "
                 "of sample on val and test)")  # fmt: skip
    else:
        where = f"{px.get('train_images')} train images ({trained}), its epoch chosen on val"
    out = ["## Where a segmentation is wrong: pixel error maps\n",
           f"Per pixel, the probability that a method's class is wrong, on the test split ({px.get('n_test_images')} images, "
           f"{px.get('pixels_per_row')} labelled pixels drawn per image and method, seeded): on every (image, method), and on "
           f"each image's recommended method alone (what an error map shows). The head trained on {where}. Beside it the "
           "label-free per-pixel scores it reads (1 - max probability, entropy, the share of the other methods that disagree):\n\n",
           table("sqa_pixel_error", ["score", *[f"{h} {k}" for h, _ in cols for k in ("AUROC", "AP")]], rows)]  # fmt: skip
    for what, c in cols:
        m = _pixel_margin(c.get("vs_best_baseline"), c.get("best_baseline"))
        if m:
            out.append(f"\n{what.capitalize()}: {m} (paired bootstrap over test images).\n")
    return "".join(out)


def _folds_section(cv: dict[str, Any], table: Any) -> str:
    """Cross-validation over split groups (the sqa summary's ``group_folds``): per fold and pooled."""
    p = cv["pooled"]
    shown = [*p["models"], "consensus", *([p["best_label_free"]] if p.get("best_label_free") else [])]
    shown = [m for i, m in enumerate(shown) if m in p["srcc"] and m not in shown[:i]]
    rows = [[", ".join(f["groups"]), f["n_images"], *[f["scores"][m]["srcc"] for m in shown],
             f"{f['best_fixed_method']} {fmt(f.get('best_fixed_oa'))}", *[f["scores"][m]["chosen_oa"] for m in shown],
             f.get("oracle_oa")] for f in cv["folds"]]  # fmt: skip
    rec = p["recommend"][shown[0]]
    rows.append(["all, pooled", p["n_images"], *[p["srcc"][m] for m in shown], f"(each fold's) {fmt(rec['best_fixed_oa'])}",
                 *[p["recommend"][m]["chosen_oa"] for m in shown], rec["oracle_oa"]])  # fmt: skip
    out = ["## Cross-validation over areas\n",
           f"The split groups of the train, val and test splits in {cv['k']} folds; each fold is the test split once (the "
           "next one val, the rest train), so every image is scored by heads that never saw its group. SRCC and the "
           "chosen method's OA per fold, then on all out-of-fold rows together:\n\n",
           table("sqa_group_folds", ["test groups", "images", *[f"{m} SRCC" for m in shown], "best fixed (train) OA",
                                     *[f"{m} chosen OA" for m in shown], "oracle OA"], rows)]  # fmt: skip
    for key, against in (("vs_consensus", "consensus"), ("vs_best_label_free", p.get("best_label_free"))):
        for m, d in (p.get(key) or {}).items():
            out.append(f"\n{m} minus {against} in SRCC, all folds: {diff_text(d)} (paired bootstrap over images).\n")
    gain = p.get("recommended_minus_best_fixed")
    if gain:
        r = p["recommend"][p["recommender"]]
        out.append(f"\nRecommending by {p['recommender']}: chosen OA {r['chosen_oa']:.3f}, best fixed method {r['best_fixed_oa']:.3f}, "
                   f"oracle {r['oracle_oa']:.3f}; chosen minus best fixed per image {diff_text(gain)} (bootstrap over images).\n")  # fmt: skip
    pol = p.get("policy")
    if pol:
        out.append(f"\nAs `rssqa recommend` decides (each fold on its val split: ranking by {p['recommender']} only where it was "
                   f"ahead of the best fixed method there; folds: {', '.join(pol['per_fold'])}): chosen OA {pol['chosen_oa']:.3f}, "
                   f"minus best fixed per image {diff_text(pol['vs_best_fixed'])}.\n")  # fmt: skip
    return "".join(out)


def _intervals_section(iv: dict[str, Any], pooled: dict[str, Any], table: Any) -> str:
    """How far each head's predicted OA may be (``intervals``; with group folds ``pooled.intervals``)."""
    folds = pooled.get("intervals") or {}
    rows = [[m, sum(v["n"]), *[v["test"][k] for k in ("coverage", "below", "above", "mean_width")],
             *([f"{folds[m]['coverage']:.3f} ({folds[m]['mean_width']:.2f} wide)" if m in folds else "-"] if folds else [])]
            for m, v in iv.items()]  # fmt: skip
    return (f"## How far the predicted OA may be: {next(iter(iv.values()))['level']:.0%} intervals\n"
            "`rssqa score` and `rssqa recommend` give each predicted OA an interval: a head's signed errors on held-out rows, in "
            "three bins of the predicted value, set offsets that cover new rows of the same kind at the level (split conformal "
            "prediction, `rssqa.intervals`). From the val rows, on the test rows (below / above: OA outside on that side)"
            + ("; and on each held-out group, from its fold's val rows" if folds else "") + ":\n\n"
            + table("sqa_intervals", ["head", "val rows", "test coverage", "below", "above", "mean width",
                                      *(["held-out groups"] if folds else [])], rows))  # fmt: skip


_SEED_ORDER = ("rs_sqa", "with_agreement", "with_agreement_ranking", "error_map")  # the summary's keys are sorted


def _policy_line(p: dict[str, Any]) -> str:
    """What ``rssqa recommend`` does with this run's scorer (the sqa summary's ``recommend_policy``)."""
    v, t = p["val"]["vs_best_fixed"], p["test"]
    how = (f"ranks by {p['model']}" if p["policy"] == "model"
           else f"puts {p['method']} first and the others after it by {p['model']}'s scores")  # fmt: skip
    return (f"`rssqa recommend` {how}: on the val split, choosing per image by {p['model']} minus always running "
            f"{p['method']} was {v['diff']:+.3f} OA [{v['low']:+.3f}, {v['high']:+.3f}] ({v['verdict']}; only `ahead` "
            f"ranks by the model). What it does, on the test split: chosen OA {t['chosen_oa']:.3f}, regret {t['regret']:.3f} "
            f"(best fixed {t['best_fixed_oa']:.3f}, oracle {t['oracle_oa']:.3f}).\n\n")


def _seeds_section(sd: dict[str, Any], table: Any) -> str:
    """The quality heads trained again under other seeds: each headline figure's median [min, max]."""

    def span(v: dict[str, Any], key: str, digits: int = 3, sign: str = "") -> str:
        r = v["spread"].get(key)
        return "" if r is None else f"{r['median']:{sign}.{digits}f} [{r['min']:{sign}.{digits}f}, {r['max']:{sign}.{digits}f}]"

    def ahead(v: dict[str, Any], key: str) -> str:
        r = v["spread"].get(key)
        return "" if r is None else f"{r['ahead']} of {r['of']}"

    rows = [[m, span(v, "srcc"), span(v, "srcc_minus_consensus", sign="+"), ahead(v, "vs_consensus"),
             span(v, "regret", 4), span(v, "gap_closed"), span(v, "top1"), ahead(v, "vs_best_fixed"),
             {True: "yes", False: "no", None: ""}[v.get("reproduced")]]
            for m, v in sorted(sd["models"].items(), key=lambda kv: _SEED_ORDER.index(kv[0]) if kv[0] in _SEED_ORDER else 9)]  # fmt: skip
    return ("How much is the seed? The heads trained again on the same RS-SQED and splits, once per seed "
            f"({', '.join(map(str, sd['seeds']))}: initial weights, dropout, batch order); median [min, max] over the seeds, "
            "and on how many seeds the paired bootstrap says ahead (`python -m rssqa.tasks.sqa.seeds`; the last column: "
            f"the run's own seed {sd['run_seed']} gives the run's figures):\n\n"
            + table("sqa_seeds", ["head", "test SRCC", "minus consensus", "ahead of consensus", "regret", "gap closed",
                                  "top1", "ahead of best fixed", "reproduces the run"], rows)
            + "".join(f"\nEach source left out in turn, {m} above `consensus` in SRCC on {v['spread']['above']['median']:g} "
                      f"[{v['spread']['above']['min']}, {v['spread']['above']['max']}] of "
                      f"{next(iter(v['per_seed'].values()))['of']} held-out sources, ahead (interval above zero) on "
                      f"{v['spread']['ahead']['median']:g} [{v['spread']['ahead']['min']}, {v['spread']['ahead']['max']}].\n"
                      for m, v in (sd.get("loso") or {}).items()))  # fmt: skip


def build_report(runs: str | Path, profile: str, wandb: bool = True, pipeline_seconds: float | None = None) -> Path:
    """Write ``runs/<profile>/report.md``, ``report.json`` and ``report_plots/``; return the markdown path.

    With ``wandb``, its tables and plots also go to a W&B run named ``report`` (see :mod:`rssqa.tracking`).
    """
    root = Path(runs) / profile
    s = load_summaries(root)
    plots = root / "report_plots"
    plots.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# rssqa report: profile `{profile}`\n", f"Stages finished: {', '.join(s) or 'none'}.\n"]
    data: dict[str, Any] = {"profile": profile, "stages": list(s)}

    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}  # every table and plot also goes to W&B
    images: dict[str, Path] = {}

    def img(path: Path, alt: str) -> str:
        images[f"figures/{path.stem}"] = path
        return f"![{alt}]({path.relative_to(root).as_posix()})\n"

    def table(key: str, header: list[str], rows: list[list[Any]]) -> str:
        tables[key] = (header, rows)
        return md_table(header, rows)

    if "world" in s:
        w = s["world"]
        md.append("## The embedded world\n")
        rows = [[tier, v["n"], v.get("noise/clean", 0), v["n"] - v.get("noise/clean", 0)] for tier, v in w["corpus"].items()]
        md.append(table("world_corpus", ["tier", "pairs", "clean captions", "noisy captions"], rows))
        md.append(table("world_sources", ["source", "layout", "tiles"], [[k, v["layout"], v["n_images"]] for k, v in w["sources"].items()]))
        data["world"] = {"corpus": w["corpus"], "sources": {k: v["n_images"] for k, v in w["sources"].items()}}

    if "purify" in s:
        p = s["purify"]
        md.append("## Purification\n")
        keys = ["n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad", "samples_per_s"]
        md.append(table("purify_counts", keys, [[p.get(k) for k in keys]]))
        if "noise_f1" in p:
            md.append(table("purify_noise", ["noise precision", "noise recall", "noise F1"],
                             [[p["noise_precision"], p["noise_recall"], p["noise_f1"]]]))  # fmt: skip
        counts = {k: float(p[k]) for k in ("n_kept", "n_rewritten", "n_dropped", "n_bad") if k in p}
        md.append(img(_bar(plots / "purify_counts.png", "purification decisions", {"pairs": counts}, "pairs"), "decisions"))
        ex = _examples(root / "purify")
        if ex:
            cols = [c for c in ("decision", "rule", "before", "after", "score", "after_score") if c in ex[0]]
            cols = cols or list(ex[0])[:4]
            md.append("Examples (before, after, the filter's score of each):\n\n")
            md.append(table("purify_examples", cols, [[str(e.get(c, ""))[:80] for c in cols] for e in ex]))
        data["purify"] = {k: p.get(k) for k in (*keys, "noise_precision", "noise_recall", "noise_f1")}

    if "pretrain" in s:
        md.append("## CLIP-RS: purified against raw corpus\n")
        runs_ = {name: s[name] for name in ("pretrain", "pretrain_raw") if name in s}
        keys = ["zeroshot_top1", "retrieval_mean_recall", "samples_seen", "samples_per_s", "world_size"]
        md.append(table("clip_purified_vs_raw", ["model", *keys], [[n, *[v.get(k) for k in keys]] for n, v in runs_.items()]))
        groups = {n: {k: float(v[k]) for k in keys[:2] if k in v} for n, v in runs_.items()}
        md.append(img(_bar(plots / "clip_purified_vs_raw.png", "CLIP-RS evaluation", groups, "score"), "clip"))
        data["pretrain"] = {n: {k: v.get(k) for k in keys} for n, v in runs_.items()}
    elif "sqa" in s:
        # a profile on real data (dubai) pretrains no CLIP of its own: say which ones RS-SQA used
        a = s["sqa"]
        md.append("## CLIP-RS\n")
        absent = ", ".join(st for st in ("world", "purify", "pretrain") if st not in s)
        md.append(f"Not run in this profile: {absent}. RS-SQA used the CLIP-RS at `{a.get('clip')}` and, for the "
                  f"generic_clip ablation, the CLIP at `{a.get('generic_clip')}`.\n")  # fmt: skip
        data["clip"] = {"clip": a.get("clip"), "generic_clip": a.get("generic_clip")}

    if "sqed" in s:
        q = s["sqed"]
        md.append("## RS-SQED: overall accuracy of eight methods\n")
        keys = ["n_images", "n_methods", "n_rows", "oa_mean", "oa_std", "best_method_share"]
        md.append(table("sqed_summary", keys, [[q.get(k) for k in keys]]))
        wins = q.get("wins", {})
        md.append(table("sqed_per_method", ["method", "mean OA", "images where best"],
                        [[m, v, wins.get(m, 0)] for m, v in q.get("per_method_oa", {}).items()]))  # fmt: skip
        md.append(table("sqed_per_source", ["source", "mean OA"], [[k, v] for k, v in q.get("per_source_oa", {}).items()]))
        for pth in _copy_plots(root / "sqed", plots, "sqed"):
            md.append(img(pth, pth.stem))
        data["sqed"] = {k: q.get(k) for k in (*keys, "per_method_oa")}

    if "sqa" in s:
        a = s["sqa"]
        md.append("## RS-SQA against label-free baselines and ablations (test split)\n")
        rows = [["RS-SQA", *[a["test"].get(m) for m in METRICS]]]
        # a baseline the run could not compute (agreement without agreement data) is null: left out
        rows += [[n, *[v.get(m) for m in METRICS]] for n, v in a.get("baselines", {}).items() if v is not None]
        md.append(table("sqa_comparison", ["model", *METRICS], rows))
        srcc = {r[0]: float(r[1]) for r in rows if r[1] is not None}
        md.append(img(_bar(plots / "sqa_srcc.png", "SRCC with true OA (test)", {"SRCC": srcc}, "SRCC"), "srcc"))
        for key, who in (("vs_rs_sqa", "RS-SQA"), ("vs_with_agreement", "RS-SQA with agreement"),
                         ("vs_error_map", "the error map's OA")):
            vs = a.get(key)
            if not vs:
                continue
            md.append(f"{who[0].upper()}{who[1:]} minus each other score on the same test images, with the 95% interval of a paired "
                      f"bootstrap over images, the share of draws in which {who} is ahead, and the verdict: "
                      "ahead or behind only where the interval excludes zero, tie otherwise:\n\n")  # fmt: skip
            md.append(table(f"sqa_{key}", ["against", "SRCC diff", "95% interval", "verdict", "share ahead",
                                           "PLCC diff", "95% interval", "verdict"],
                            [[n, v["srcc"]["diff"], f"[{v['srcc']['low']:+.3f}, {v['srcc']['high']:+.3f}]", v["srcc"].get("verdict", ""),
                              v["srcc"]["a_better"], v["plcc"]["diff"], f"[{v['plcc']['low']:+.3f}, {v['plcc']['high']:+.3f}]",
                              v["plcc"].get("verdict", "")]
                             for n, v in vs.items()]))  # fmt: skip
            data[f"sqa_{key}"] = vs
        loso = a.get("leave_one_source_out")
        if loso:
            md.append("## Leave one source out\n")
            md.append("The quality heads trained on the other sources' rows, tested on the held-out source's test "
                      "images; beside them the training-free consensus and the best other label-free score:\n\n")  # fmt: skip
            models = [m for m in ("rs_sqa", "with_agreement") if all(m in f for f in loso.values())]
            header = ["held out", "images", *[f"{m} SRCC" for m in models], "consensus SRCC",
                      *[f"{m} minus consensus [95%]" for m in models], "best other label-free",
                      *[f"{m} regret" for m in models], "consensus regret"]  # fmt: skip
            rows_loso = []
            for held, f in loso.items():
                best = f.get("best_label_free")
                rows_loso.append([held, f.get("n_images"), *[f[m]["srcc"] for m in models], f.get("consensus", {}).get("srcc"),
                                  *[diff_text(f[m].get("vs_consensus")) for m in models],
                                  f"{best} {fmt(f[best]['srcc'])}" if best else "-",
                                  *[f[m]["regret"] for m in models], f.get("consensus", {}).get("regret")])  # fmt: skip
            md.append(table("sqa_leave_one_source_out", header, rows_loso))
            above, ahead = a.get("loso_above_consensus"), a.get("loso_ahead_of_consensus") or {}
            if above:
                md.append("Held-out sources on which each model is above consensus in SRCC: "
                          + ", ".join(f"{m} {n} of {len(loso)}" + (f" ({ahead[m]} with the interval excluding zero)" if m in ahead else "")
                                      for m, n in above.items()) + ".\n")  # fmt: skip
            data["sqa_leave_one_source_out"] = loso
        cv = a.get("group_folds")
        if a.get("intervals"):
            md.append(_intervals_section(a["intervals"], (cv or {}).get("pooled", {}), table))
            data["sqa_intervals"] = a["intervals"]
        if cv:
            md.append(_folds_section(cv, table))
            data["sqa_group_folds"] = cv
        px = a.get("pixel_error")
        if px:
            md.append(_pixel_section(px, table))
            data["sqa_pixel_error"] = px
        md.append("## Method recommendation\n")
        rk = ["top1", "top1_within", "chosen_oa", "best_fixed_oa", "oracle_oa", "regret", "gap_closed"]
        rec = a.get("recommend", {})
        md.append(table("sqa_recommend", rk, [[rec.get(k) for k in rk]]))
        if rec.get("best_fixed_method"):
            md.append(f"Best fixed method (on train): {rec['best_fixed_method']}; {rec.get('n_images')} test images; "
                      "top1_within: the chosen method is within 0.01 OA of the best; gap_closed: (chosen_oa - "
                      "best_fixed_oa) / (oracle_oa - best_fixed_oa).\n")
        pol = a.get("recommend_policy")
        if pol:
            md.append(_policy_line(pol))
        others = a.get("recommend_baselines", {})
        if others:
            md.append("Ranking the methods by another score instead:\n\n")
            rb = ["top1", "top1_within", "chosen_oa", "regret", "gap_closed"]
            md.append("The last columns: the chosen method's OA minus the best fixed method's, per image, with the 95% "
                      "interval of a bootstrap over images and the verdict.\n\n")  # fmt: skip
            md.append(table("sqa_recommend_by_score", ["ranked by", *rb, "minus best fixed", "95% interval", "verdict"],
                            [[n, *[v.get(k) for k in rb], *_versus_cells(v.get("vs_best_fixed"))]
                             for n, v in {"RS-SQA": rec, **others}.items()]))  # fmt: skip
        head = a.get("recommend_headroom")
        if head:
            err = head.get("within_image_error", {})
            md.append(
                f"How exact must a score be? Ranking each test image's methods by their true OA plus Gaussian noise, "
                f"top1 reaches {head['target']:g} only while the noise stays below {head['sigma_for_target']:.3f} OA. "
                f"The learned scores' error within an image (their per-image offset removed) is "
                + ", ".join(f"{n} {v:.3f}" for n, v in err.items())
                + ".\n\n"
            )
            md.append(table("sqa_recommend_headroom", ["noise sigma (OA)", "top1"], [[k, v] for k, v in head["top1_at_sigma"].items()]))
            data["sqa_recommend_headroom"] = head
        if is_done(root / "sqa" / "seeds"):  # the heads trained again under other seeds (rssqa.tasks.sqa.seeds)
            seeds = read_summary(root / "sqa" / "seeds")
            md.append(_seeds_section(seeds, table))
            data["sqa_seeds"] = {m: v["spread"] for m, v in seeds["models"].items()}
        for pth in _copy_plots(root / "sqa", plots, "sqa"):
            md.append(img(pth, pth.stem))
        data["sqa"] = {"test": a["test"], "baselines": a.get("baselines", {}), "recommend": a.get("recommend", {})}

    if "scenes" in s:
        md.append(scenes_section(s["scenes"], root, plots, table, img))
        data["scenes"] = {"overall": s["scenes"].get("overall", {}), "scenes": s["scenes"].get("scenes", [])}

    md.append("## Benchmarks\n")
    times = _stage_times(s)
    if pipeline_seconds is not None:
        data["pipeline_seconds"] = pipeline_seconds
        md.append(f"The whole pipeline took {pipeline_seconds:.0f} s of wall time (`make demo`, stages side by side).\n")
    if times:
        md.append("Wall and CPU time of each stage's processes (CPU share 1.0 = one core busy all along; purify "
                  "counts every DDP rank, sqed its local ranks, sqa its fit workers; another stage's DDP rank that "
                  "had not ended when the summary was written is not counted):\n\n")  # fmt: skip
        md.append(table("stage_times", ["stage", "wall s", "CPU s", "CPU share"], times))
        data["stage_times"] = {r[0]: {"wall_s": r[1], "cpu_s": r[2]} for r in times}
    speed = _stage_speeds(s)
    if speed:
        md.append("Throughput measured by the stages of this run (one or two processes on this machine):\n\n")
        md.append(table("stage_throughput", ["stage", "what", "per second", "processes", "stage seconds"], speed))
        data["stage_throughput"] = speed
    bench = _benchmarks(Path(runs) / "bench")
    if bench:
        md.append("From `make bench` (each against its reference in the same run; `runs/bench/*.json`):\n\n")
        md.append(table("benchmarks", ["benchmark", "what", "figures"], bench))
        data["bench"] = bench
    else:
        md.append("No `runs/bench/*.json` yet: `make bench` runs the benchmarks against their references.\n")
    out = root / "report.md"
    atomic_write_bytes(out, "\n".join(md).encode())
    atomic_write_json(root / "report.json", data)
    if wandb:  # the report's tables and plots as one more run in the pipeline run's W&B group
        publish_run(wandb_run(plots, "report", name="report", profile=profile), "report", {}, tables=tables, images=images)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Write runs/<profile>/report.md from the stage summaries.")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--no-wandb", action="store_true", help="leave W&B out (the report files are written anyway)")
    ap.add_argument("--pipeline-seconds", type=float, default=None, help="the whole pipeline's wall time (make demo)")
    args = ap.parse_args()
    print(build_report(args.runs, args.profile, wandb=not args.no_wandb, pipeline_seconds=args.pipeline_seconds))


if __name__ == "__main__":
    main()
