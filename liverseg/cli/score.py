"""`liverseg score PRED REF [-o REPORT_DIR]`: score predicted masks against reference masks."""

from __future__ import annotations

from pathlib import Path

import typer

from liverseg.cli.common import EXIT_BAD_INPUT, emit_json, friendly_errors, progress


@friendly_errors
def command(
    prediction: Path = typer.Argument(..., help="Predicted mask file, or a folder of them."),
    reference: Path = typer.Argument(..., help="Reference mask file, or a folder of them "
                                     "(a dataset root with labelsTr/ works; LiTS names understood)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Report folder: cases.csv, "
                                       "summary.json, report.html."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0.0,
                                    help="Normalised surface Dice tolerance in mm."),
    resample_to_ref: bool = typer.Option(False, "--resample-to-ref", help="Resample predictions on "
                                         "another grid onto the reference grid (nearest neighbour) "
                                         "instead of failing the case."),
    images: Path | None = typer.Option(None, "--images", help="CT file or folder for the report's "
                                       "pictures (default: imagesTr/ or LiTS volume-N beside the "
                                       "references)."),
    worst: int = typer.Option(3, "--worst", min=0, help="Worst cases per class pictured in the report."),
    as_json: bool = typer.Option(False, "--json", help="Print the aggregate scores as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Score predictions against references: Dice, IoU, HD95, ASSD, NSD, volumes per class.

    Classes: liver = label > 0, tumour = label 2 (when present). Two files, or two folders
    matched by case name (MSD, nnU-Net _0000, LiTS segmentation-N/volume-N/prediction-N).
    A bad case is reported and the rest is scored; the exit code is 2 if any case failed.
    """
    from liverseg.metrics import score_paths
    from liverseg.report import build_summary, find_image, overlay_from_files, write_report

    hide = quiet or as_json

    def wrap(items: list) -> object:
        return progress(items, total=len(items), desc="score", quiet=hide)

    results = score_paths(prediction, reference, tolerance, resample_to_ref, wrap=wrap)
    if output is not None:
        overlay = overlay_from_files(lambda r: find_image(r.reference_file, r.case, images),
                                     resample_to_ref)
        summary = write_report(output, results, tolerance, resample_to_ref, overlay=overlay,
                               n_worst=worst)
    else:
        summary = build_summary(results, tolerance, resample_to_ref)
    present_summary(summary, output, as_json=as_json, quiet=quiet)


def present_summary(summary: dict, output: Path | None, *, as_json: bool, quiet: bool) -> None:
    """Failures on stderr, the aggregate as JSON or text, exit 2 if any case failed."""
    for failure in summary["failures"]:
        typer.echo(f"error: {failure['case']}: {failure['error']}", err=True)
    if as_json:
        emit_json(summary["aggregate"])
    elif not quiet:
        typer.echo(format_aggregate(summary), err=True)
        if output is not None:
            typer.echo(f"report: {output / 'report.html'}", err=True)
    if summary["failures"]:
        raise typer.Exit(EXIT_BAD_INPUT)


def format_aggregate(summary: dict) -> str:
    """A few lines for people: mean ± std and global Dice per class."""
    agg = summary["aggregate"]
    lines = [f"{agg['n_scored']} of {agg['n_cases']} cases scored, {agg['n_failed']} failed"]
    for name, entry in agg["classes"].items():
        def ms(metric: str, entry: dict = entry) -> str:
            s = entry[metric]
            return "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
        gd = entry["global_dice"]
        lines.append(f"  {name:7s} Dice {ms('dice')}  HD95 {ms('hd95_mm')} mm  ASSD {ms('assd_mm')} mm"
                     f"  NSD {ms('nsd')}  global Dice {'n/a' if gd is None else f'{gd:.4f}'}")
    if "qc" in summary:
        anyflag = summary["qc"]["liver_dice_by_flag"][0]

        def dice(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"
        lines.append(f"  QC: {anyflag['n_flagged']} of {summary['qc']['n_cases']} cases flagged "
                     f"(liver Dice {dice(anyflag['dice_flagged'])}), {anyflag['n_clear']} clear "
                     f"(liver Dice {dice(anyflag['dice_clear'])})")
    return "\n".join(lines)
