"""`liverseg evaluate DATASET [--model BUNDLE] -o REPORT_DIR`: segment a labelled dataset and score it."""

from __future__ import annotations

from pathlib import Path

import typer

from liverseg.cli.common import friendly_errors, progress


@friendly_errors
def command(
    dataset: Path = typer.Argument(..., help="Labelled dataset: MSD/nnU-Net folder, LiTS folder or "
                                   "CSV of image,label pairs."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder: predictions/, cases.csv, "
                                "summary.json, report.html."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model bundle folder, or a "
                                      "shipped model's name (liverseg models) [default: liver_default]."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0.0,
                                    help="Normalised surface Dice tolerance in mm."),
    resample_to_ref: bool = typer.Option(False, "--resample-to-ref", help="Resample predictions "
                                         "onto a label stored on another grid than its CT."),
    worst: int = typer.Option(3, "--worst", min=0, help="Worst cases per class pictured in the report."),
    as_json: bool = typer.Option(False, "--json", help="Print the aggregate scores as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Run inference on every labelled case of DATASET and score it (as `liverseg score`).

    Predictions are kept in REPORT_DIR/predictions/. A bad case is reported and the rest is
    evaluated; the exit code is 2 if any case failed.
    """
    from liverseg.bundle import load_bundle
    from liverseg.cli.score import present_summary
    from liverseg.evaluation import evaluate_dataset
    from liverseg.report import overlay_from_files, write_report

    hide = quiet or as_json
    bundle = load_bundle(model, device=device)

    def wrap(items: list) -> object:
        return progress(items, total=len(items), desc="evaluate", quiet=hide)

    results = evaluate_dataset(dataset, bundle, output / "predictions", tolerance, resample_to_ref,
                               wrap=wrap, device=device)
    overlay = overlay_from_files(lambda r: Path(r.image_file) if r.image_file else None,
                                 resample_to_ref)
    summary = write_report(output, results, tolerance, resample_to_ref, overlay=overlay,
                           n_worst=worst, title=f"liverseg evaluate: {bundle.model_id}",
                           extra_settings={"model": str(bundle.path), "model_id": bundle.model_id,
                                           "model_version": bundle.model_version,
                                           "dataset": str(dataset)})
    present_summary(summary, output, as_json=as_json, quiet=quiet)
