"""`liverseg preprocess DATASET -o CACHE`: cache a dataset in model space for training."""

from __future__ import annotations

from pathlib import Path

import typer

from liverseg.cli.common import EXIT_BAD_INPUT, emit_json, friendly_errors


@friendly_errors
def command(
    dataset: Path = typer.Argument(..., help="Dataset: MSD/nnU-Net folder, LiTS folder, CSV of "
                                   "image,label pairs, or a CT file/DICOM folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Cache folder to write."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe (configs/*.yaml)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a setting, e.g. "
                                        "--set preprocess.target_spacing=[2,2,2] (repeatable)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Cases processed in parallel."),
    force: bool = typer.Option(False, "--force", help="Redo cases already in the cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Preprocess a dataset into CACHE: model-space arrays, JSON sidecars and fingerprint.json.

    Cases already cached with unchanged sources and config are skipped (--force redoes them).
    A bad case is reported and the run goes on; the exit code is 2 if any case failed.
    """
    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset

    cfg = load_config(config, overrides)
    report = preprocess_dataset(dataset, output, cfg.preprocess, workers=workers, force=force,
                                quiet=quiet or as_json)
    for case_id, message in report.failed:
        typer.echo(f"error: {case_id}: {message}", err=True)
    for case_id, message in report.warnings:
        typer.echo(f"warning: {case_id}: {message}", err=True)
    if as_json:
        emit_json(report.to_dict())
    elif not quiet:
        summary = (f"preprocessed {len(report.done)}, skipped {len(report.skipped)} unchanged, "
                   f"failed {len(report.failed)} -> {output}")
        if report.failed:
            summary += f" (failed: {', '.join(c for c, _ in report.failed)})"
        typer.echo(summary, err=True)
    if report.failed:
        raise typer.Exit(EXIT_BAD_INPUT)
