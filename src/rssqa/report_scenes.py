"""The pipeline report's whole-scenes section (:mod:`rssqa.report`), from the scenes stage's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rssqa.report_format import diff_text


def scenes_section(sc: dict[str, Any], root: Path, plots: Path, table: Any, img: Any) -> str:
    """Whole scenes: the fused map against each single method and the oracle, the error map's AUROC."""
    src = sc.get("inputs")
    what = ("The world's large scenes (GeoTIFF, own seed)" if not src else
            f"The whole images of RS-SQED's {src['split']} split, as the source reads them ({src['scenes']} images; "
            f"{len(src['skipped'])} smaller than a window left out)")  # fmt: skip
    out = ["## Whole scenes (`rssqa scene`)\n",
           f"{what}, scored window by window; the maps measured against "
           "their truth on the same pixels. Intervals: 95%, bootstrap over windows.\n\n"]  # fmt: skip
    rows, err_rows = [], []
    for r in sc.get("scenes", []):
        e = r.get("evaluation") or {}
        if "fused_oa" not in e:
            continue
        gap = e.get("gap_closed")
        rows.append([f"{r['source']}/{r['id']}", r["windows"], e["fused_oa"], f"{e['best_single_method']} {e['best_single_oa']:.3f}",
                     diff_text(e.get("fused_vs_best_single")), e["oracle_oa"], "" if gap is None else f"{gap:.2f}", r["seconds"]])  # fmt: skip
        au = e.get("error_auroc")
        if au:
            err_rows.append([f"{r['source']}/{r['id']}", r["error_model"], *[au.get(k) for k in ("error_head", "max_prob", "entropy", "disagreement")],
                             diff_text(e.get("error_auroc_margin"))])  # fmt: skip
    out.append(table("scenes_fused", ["scene", "windows", "fused OA", "best single method", "fused minus it [95%]", "oracle OA",
                                      "gap closed", "seconds"], rows))  # fmt: skip
    ov = sc.get("overall", {})
    if "fused_ahead" in ov:
        out.append(f"Fused map against the best single method of each scene: {ov['fused_ahead']} ahead, {ov['fused_tie']} tie, "
                   f"{ov['fused_behind']} behind; mean margin {ov['mean_fused_minus_best_single']:+.3f} OA "
                   f"(the oracle's {ov['mean_oracle_minus_best_single']:+.3f}).\n\n")  # fmt: skip
    pooled = ov.get("pooled") or {}
    if pooled.get("fused_minus_best_single"):
        out.append(f"All {pooled['n_scenes']} scenes together (bootstrap over windows within each scene): fused minus each "
                   f"scene's best single method, mean {diff_text(pooled['fused_minus_best_single'])} (the oracle's "
                   f"{pooled['oracle_minus_best_single']:+.3f})"
                   + (f"; error map AUROC {pooled['error_auroc']['error_head']:.3f} minus the best per-pixel baseline "
                      f"({pooled['error_auroc_best_baseline']}, {pooled['error_auroc'][pooled['error_auroc_best_baseline']]:.3f}): "
                      f"{diff_text(pooled['error_auroc_margin'])}" if pooled.get("error_auroc_margin") else "") + ".\n\n")  # fmt: skip
    cov = ov.get("mean_interval_coverage")
    if cov:
        out.append(f"Each method's mean predicted OA over a scene, with the band the means of its windows' intervals make "
                   f"(`mean_predicted_oa_interval` in `scene.json`): the scene's true OA inside it for {cov['inside']} of "
                   f"{cov['of']} (scene, method) pairs.\n\n")  # fmt: skip
    if err_rows:
        out.append("Per-pixel error map (is the fused class wrong here?), pixel AUROC on a sample of each window's pixels:\n\n")
        out.append(table("scenes_error_auroc", ["scene", "error map", "error map AUROC", "1 - max prob", "entropy",
                                                "disagreement", "margin over the best baseline [95%]"], err_rows))  # fmt: skip
    for r in sc.get("scenes", []):
        q = root / "scenes" / r["folder"] / "quicklook.png"
        if q.is_file():
            dst = plots / f"scene_{r['source']}_{r['id']}.png"
            dst.write_bytes(q.read_bytes())
            out.append(img(dst, f"{r['source']}/{r['id']}"))
    return "\n".join(out) + "\n"
