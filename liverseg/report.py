"""Scoring reports: ``cases.csv``, ``summary.json`` and a self-contained ``report.html``.

``summary.json`` follows nnU-Net's ``summary.json`` in spirit (per-case metrics plus aggregates);
its structure is documented in docs/scoring.md and checked by :data:`SUMMARY_SCHEMA` (JSON Schema).
The HTML embeds every picture as a base64 data URI, so the single file can be mailed or archived.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from liverseg import __version__
from liverseg.io import atomic_path, write_text_atomic
from liverseg.metrics import (
    CLASS_DEFINITIONS,
    METRIC_NAMES,
    SUMMARY_METRICS,
    CaseResult,
    aggregate,
    scored_classes,
)
from liverseg.qc import dice_by_flag

#: Metrics drawn as box plots, with their axis labels.
PLOTTED = {"dice": "Dice", "iou": "IoU", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)",
           "nsd": "NSD", "rvd": "relative volume difference"}
EMPTY_CONVENTION = (
    "both empty: dice=iou=nsd=1, hd95=assd=0, rvd=0; one side empty: dice=iou=nsd=0, "
    "hd95=assd=null (undefined); reference empty: rvd=null; prediction empty: rvd=-1")
CSV_COLUMNS = ("case", "class", "status", *METRIC_NAMES, "qc_flags", "prediction_file",
               "reference_file", "error")

_NUM = {"type": ["number", "null"]}
_STAT = {"type": "object", "required": ["mean", "median", "std", "min", "max", "n"],
         "properties": {"mean": _NUM, "median": _NUM, "std": _NUM, "min": _NUM, "max": _NUM,
                        "n": {"type": "integer"}}}
_CLASS_METRICS = {"type": "object", "required": list(METRIC_NAMES),
                  "properties": {m: ({"type": "integer"} if m in ("tp", "fp", "fn") else _NUM)
                                 for m in METRIC_NAMES}}
_QC = {"type": "object", "required": ["flags", "measures"],
       "properties": {"flags": {"type": "array", "items": {"type": "string"}},
                      "measures": {"type": "object"}}}
SUMMARY_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["liverseg_version", "created", "settings", "classes", "metric_per_case",
                 "failures", "aggregate"],
    "properties": {
        "liverseg_version": {"type": "string"},
        "created": {"type": "string"},
        "settings": {"type": "object", "required": ["tolerance_mm", "resample_to_ref",
                                                    "empty_masks"]},
        "classes": {"type": "object", "additionalProperties": {"type": "string"}},
        "metric_per_case": {"type": "array", "items": {
            "type": "object",
            "required": ["case", "prediction_file", "reference_file", "shape", "spacing_mm",
                         "metrics"],
            "properties": {"case": {"type": "string"},
                           "metrics": {"type": "object", "additionalProperties": _CLASS_METRICS},
                           "qc": _QC},
        }},
        "failures": {"type": "array", "items": {
            "type": "object", "required": ["case", "prediction_file", "reference_file", "error"],
            "properties": {"error": {"type": "string"}}}},
        "qc": {"type": "object", "required": ["n_cases", "liver_dice_by_flag"], "properties": {
            "liver_dice_by_flag": {"type": "array", "items": {
                "type": "object", "required": ["flag", "n_flagged", "dice_flagged", "n_clear",
                                               "dice_clear"]}}}},
        "aggregate": {
            "type": "object", "required": ["n_cases", "n_scored", "n_failed", "classes"],
            "properties": {
                "n_cases": {"type": "integer"}, "n_scored": {"type": "integer"},
                "n_failed": {"type": "integer"},
                "classes": {"type": "object", "additionalProperties": {
                    "type": "object",
                    "required": [*SUMMARY_METRICS, "global_dice", "tp", "fp", "fn", "n_both_empty"],
                    "properties": {**{m: _STAT for m in SUMMARY_METRICS}, "global_dice": _NUM},
                }},
            }},
    },
}


def _clean(value: float | int) -> float | int | None:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    return int(value)


def build_summary(results: Sequence[CaseResult], tolerance_mm: float,
                  resample_to_ref: bool = False, extra: dict | None = None) -> dict:
    """The summary.json document: settings, per-case metrics, failures and aggregates."""
    classes = scored_classes(results)
    per_case = []
    for r in results:
        if not r.ok:
            continue
        per_case.append({
            "case": r.case, "prediction_file": r.prediction_file,
            "reference_file": r.reference_file, "shape": r.shape, "spacing_mm": r.spacing_mm,
            "metrics": {c: {k: _clean(v) for k, v in r.metrics[c].items()} for c in classes},
            **({"qc": r.qc} if r.qc is not None else {}),
        })
    failures = [{"case": r.case, "prediction_file": r.prediction_file,
                 "reference_file": r.reference_file, "error": r.error}
                for r in results if not r.ok]
    settings = {"tolerance_mm": float(tolerance_mm), "resample_to_ref": bool(resample_to_ref),
                "empty_masks": EMPTY_CONVENTION, "std": "population (ddof=0)",
                "global_dice": "2*sum(tp) / (2*sum(tp) + sum(fp) + sum(fn)) over scored cases"}
    settings.update(extra or {})
    agg = aggregate(results)
    summary = {
        "liverseg_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "classes": {c: CLASS_DEFINITIONS[c] for c in classes},
        "metric_per_case": per_case,
        "failures": failures,
        "aggregate": json.loads(json.dumps(agg, default=_clean)),
    }
    with_qc = [r for r in results if r.ok and r.qc is not None]
    if with_qc:
        summary["qc"] = {"flags": "docs/qc.md", "n_cases": len(with_qc),
                         "liver_dice_by_flag": dice_by_flag([(float(r.metrics["liver"]["dice"]),
                                                              list(r.qc["flags"])) for r in with_qc])}
    return summary


def write_cases_csv(results: Sequence[CaseResult], path: str | Path) -> Path:
    """One row per case and class (failed cases: one row with the error), atomically."""
    classes = scored_classes(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        base = {"case": r.case, "prediction_file": r.prediction_file or "",
                "reference_file": r.reference_file or "",
                "qc_flags": ";".join(r.qc["flags"]) if r.qc is not None else ""}
        if not r.ok:
            writer.writerow({**base, "class": "", "status": "error", "error": r.error})
            continue
        for c in classes:
            row = {k: ("" if _clean(v) is None else _clean(v)) for k, v in r.metrics[c].items()}
            writer.writerow({**base, **row, "class": c, "status": "ok", "error": ""})
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _box_plot(results: Sequence[CaseResult], metric: str, label: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    classes = scored_classes(results)
    data = []
    for c in classes:
        vals = [r.metrics[c][metric] for r in results if r.ok]
        data.append([float(v) for v in vals if np.isfinite(v)])
    fig = Figure(figsize=(3.2, 3.0), dpi=100)
    ax = fig.subplots()
    positions = list(range(1, len(classes) + 1))
    if any(data):
        ax.boxplot([d if d else [np.nan] for d in data], positions=positions, widths=0.5)
        for pos, d in zip(positions, data, strict=True):  # every case as a dot
            ax.plot(np.full(len(d), pos) + np.linspace(-0.08, 0.08, len(d)), d, "o", ms=3,
                    alpha=0.6, color="#1f77b4")
    ax.set_xticks(positions, classes)
    ax.set_title(label, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _fmt(value: float | int | None, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int | np.integer):
        return f"{int(value):d}"
    if metric.endswith("_ml"):
        return f"{value:.1f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


OverlayFn = Callable[[CaseResult, str, Path], Path | None]


def worst_cases(results: Sequence[CaseResult], n: int = 3) -> list[tuple[CaseResult, str]]:
    """The ``n`` lowest-Dice cases per class (ties broken by name), as (case, class)."""
    out: list[tuple[CaseResult, str]] = []
    for c in scored_classes(results):
        scored = [r for r in results if r.ok and (r.metrics[c]["tp"] + r.metrics[c]["fp"]
                                                  + r.metrics[c]["fn"]) > 0]
        scored.sort(key=lambda r: (r.metrics[c]["dice"], r.case))
        out.extend((r, c) for r in scored[:n])
    return out


def write_report(out_dir: str | Path, results: Sequence[CaseResult], tolerance_mm: float,
                 resample_to_ref: bool = False, overlay: OverlayFn | None = None,
                 n_worst: int = 3, title: str = "liverseg scores",
                 extra_settings: dict | None = None) -> dict:
    """Write cases.csv, summary.json and report.html into ``out_dir``; return the summary.

    ``overlay(case_result, class_name, png_path)`` draws one worst-case picture (or returns None
    when it cannot); pictures go to ``out_dir/pictures/`` and are embedded in the HTML.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(results, tolerance_mm, resample_to_ref, extra_settings)
    write_cases_csv(results, out / "cases.csv")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    pictures = out / "pictures"
    pictures.mkdir(exist_ok=True)
    boxes = []
    if any(r.ok for r in results):
        for metric, label in PLOTTED.items():
            boxes.append((label, _box_plot(results, metric, label, pictures / f"box_{metric}.png")))
    overlays = []
    if overlay is not None:
        for r, c in worst_cases(results, n_worst):
            png = overlay(r, c, pictures / f"worst_{c}_{r.case}.png")
            if png is not None:
                overlays.append((r, c, png))
    write_text_atomic(out / "report.html", _html(summary, results, boxes, overlays, title))
    return summary


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left}
tr.err td{background:#fdecea} .imgs img{margin:4px;border:1px solid #ddd}
.note{color:#555;font-size:13px}
"""


def _html(summary: dict, results: Sequence[CaseResult], boxes: list, overlays: list,
          title: str) -> str:
    e = html.escape
    classes = list(summary["classes"])
    agg = summary["aggregate"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
             f"<p class='note'>liverseg {e(summary['liverseg_version'])}, {e(summary['created'])}; "
             f"{agg['n_cases']} cases, {agg['n_scored']} scored, {agg['n_failed']} failed. "
             "Classes: " + ", ".join(f"{e(c)} = {e(d)}" for c, d in summary["classes"].items())
             + f"; NSD tolerance {summary['settings']['tolerance_mm']} mm. Empty masks: "
             f"{e(EMPTY_CONVENTION)}.</p>"]
    # aggregate table
    parts.append("<h2>Summary</h2><table><tr><th class='l'>class</th><th class='l'>metric</th>"
                 "<th>mean</th><th>median</th><th>std</th><th>min</th><th>max</th><th>n</th></tr>")
    for c in classes:
        entry = agg["classes"][c]
        for m in SUMMARY_METRICS:
            s = entry[m]
            parts.append(f"<tr><td class='l'>{e(c)}</td><td class='l'>{e(m)}</td>"
                         + "".join(f"<td>{_fmt(s[k], m)}</td>" for k in ("mean", "median", "std",
                                                                          "min", "max"))
                         + f"<td>{s['n']}</td></tr>")
        parts.append(f"<tr><td class='l'>{e(c)}</td><td class='l'><b>global Dice</b></td>"
                     f"<td>{_fmt(entry['global_dice'])}</td><td colspan='5' class='l'>pooled TP/FP/FN"
                     f" over all cases; {entry['n_both_empty']} case(s) empty on both sides</td></tr>")
    parts.append("</table>")
    if boxes:
        parts.append("<h2>Distributions</h2><div class='imgs'>")
        parts += [f"<img alt='{e(label)}' src='{_png_data_uri(p)}'>" for label, p in boxes]
        parts.append("</div>")
    if "qc" in summary:
        parts.append(_qc_table(summary["qc"]))
    # per-case table
    shown = list(METRIC_NAMES)
    parts.append("<h2>Cases</h2><table><tr><th class='l'>case</th><th class='l'>class</th>"
                 + "".join(f"<th>{e(m)}</th>" for m in shown) + "<th class='l'>QC flags</th></tr>")
    for r in results:
        if not r.ok:
            parts.append(f"<tr class='err'><td class='l'>{e(r.case)}</td><td class='l'>error</td>"
                         f"<td class='l' colspan='{len(shown)}'>{e(r.error or '')}</td></tr>")
            continue
        flags = "n/a" if r.qc is None else (", ".join(r.qc["flags"]) or "none")
        for c in classes:
            parts.append(f"<tr><td class='l'>{e(r.case)}</td><td class='l'>{e(c)}</td>"
                         + "".join(f"<td>{_fmt(r.metrics[c][m], m)}</td>" for m in shown)
                         + f"<td class='l'>{e(flags)}</td></tr>")
    parts.append("</table>")
    if summary["failures"]:
        parts.append("<h2>Failures</h2><ul>")
        parts += [f"<li><b>{e(f['case'])}</b>: {e(f['error'])}</li>" for f in summary["failures"]]
        parts.append("</ul>")
    if overlays:
        parts.append("<h2>Worst cases</h2><p class='note'>Lowest Dice per class; reference and "
                     "prediction outlined on the CT (abdominal window), radiological view.</p>")
        for r, c, png in overlays:
            parts.append(f"<h3>{e(r.case)} — {e(c)} Dice {_fmt(r.metrics[c]['dice'])}</h3>"
                         f"<img style='max-width:100%' alt='{e(r.case)}' src='{_png_data_uri(png)}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _qc_table(qc: dict) -> str:
    """Liver Dice per QC flag state: do the flags point at the bad cases?"""
    rows = "".join(
        f"<tr><td class='l'>{html.escape(row['flag'])}</td><td>{row['n_flagged']}</td>"
        f"<td>{_fmt(row['dice_flagged'])}</td><td>{_fmt(row['min_dice_flagged'])}</td>"
        f"<td>{row['n_clear']}</td><td>{_fmt(row['dice_clear'])}</td><td>{_fmt(row['min_dice_clear'])}</td></tr>"
        for row in qc["liver_dice_by_flag"])
    return ("<h2>Quality control</h2><p class='note'>Liver Dice of the cases each QC flag marks "
            "(flags and thresholds: docs/qc.md).</p><table><tr><th class='l'>flag</th>"
            "<th>cases flagged</th><th>mean Dice</th><th>min Dice</th><th>cases not flagged</th>"
            f"<th>mean Dice</th><th>min Dice</th></tr>{rows}</table>")


def find_image(reference_file: str | Path | None, case: str,
               images: str | Path | None = None) -> Path | None:
    """The CT beside a reference mask, for pictures: ``images`` (a file, or a folder matched by
    case), else ``imagesTr/`` beside ``labelsTr/`` (MSD/nnU-Net, ``_0000`` too), else LiTS
    ``volume-N`` beside ``segmentation-N``. None when nothing fits (pictures then show masks only).
    """
    from liverseg.io import is_image_file
    from liverseg.metrics import match_key

    if images is not None:
        root = Path(images)
        if root.is_file():
            return root
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if is_image_file(p) and match_key(p) == case:
                    return p
        return None
    if reference_file is None:
        return None
    ref = Path(reference_file)
    if ref.parent.name == "labelsTr":
        folder = ref.parent.parent / "imagesTr"
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if is_image_file(p) and match_key(p) == match_key(ref):
                    return p
    if ref.name.lower().startswith("segmentation-"):
        for p in sorted(ref.parent.iterdir()):
            if (is_image_file(p) and p.name.lower().startswith("volume-")
                    and match_key(p) == match_key(ref)):
                return p
    return None


def overlay_from_files(image_for: Callable[[CaseResult], Path | None],
                       resample_to_ref: bool = False) -> OverlayFn:
    """An overlay function that re-reads a case's masks (and CT when ``image_for`` finds one)."""
    from liverseg.io import read_ct, read_label, same_grid
    from liverseg.metrics import CLASSES, resample_nearest
    from liverseg.pictures import save_overlay_png

    def draw(result: CaseResult, cls: str, path: Path) -> Path | None:
        if result.prediction_file is None or result.reference_file is None:
            return None
        ref = read_label(result.reference_file)
        pred = read_label(result.prediction_file)
        pred_labels = pred.array if same_grid(pred, ref) else resample_nearest(pred, ref)
        image_path = image_for(result)
        image = None
        if image_path is not None:
            ct = read_ct(image_path, min_extent_mm=None)  # a backdrop for the picture, any size
            image = ct.array if same_grid(ct, ref) else None
        if image is None:  # no CT: masks on a plain dark background
            image = np.full(ref.shape, -1000.0, dtype=np.float32)
        masks = {f"reference {cls}": CLASSES[cls](ref.array),
                 f"predicted {cls}": CLASSES[cls](pred_labels)}
        dice = result.metrics[cls]["dice"]
        return save_overlay_png(image, masks, ref.spacing, path, affine=ref.affine,
                                title=f"{result.case}: {cls} Dice {dice:.4f}")

    return draw
