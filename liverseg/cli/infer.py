"""`liverseg infer INPUT... [-o OUT]`: segment liver and tumours, masks on the input's grid."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from liverseg.cli.common import EXIT_BAD_INPUT, emit_json, friendly_errors, progress

if TYPE_CHECKING:
    from liverseg.batch import CaseResult
    from liverseg.jobs import CaseJob


class Precision(str, Enum):  # infer.precision's values (liverseg.config.InferConfig)
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


@friendly_errors
def command(
    inputs: list[Path] = typer.Argument(..., help="CT files (NIfTI, NRRD, MHA), DICOM series "
                                        "folders, or folders of those."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Mask file (.nii/.nii.gz, one "
                                       "input only) or output folder [default: ./liverseg_out/]."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model bundle folder, or "
                                      "a shipped model's name (liverseg models) [default: liver_default]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overlap: float | None = typer.Option(None, "--overlap", min=0.0, max=0.95,
                                         help="Sliding-window overlap [default: the model's plan]."),
    sw_batch_size: int | None = typer.Option(None, "--sw-batch-size", min=1,
                                             help="Windows per forward pass [default: the plan]."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="Average over flips (4x slower) "
                                    "[default: the model's plan]."),
    precision: Precision | None = typer.Option(None, "--precision", help="The network's arithmetic: "
                                               "auto (bfloat16 where the CPU or GPU has it natively), "
                                               "float32 or bfloat16 [default: the model's plan]."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess",
                                     help="Keep the largest liver, fill holes, tumour in liver."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities",
                                            help="Also write <case>_probabilities.nii.gz."),
    preview: bool = typer.Option(False, "--preview", help="Also write <case>.png (three slices, "
                                 "mask outlined)."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="Also write <case>_seg.dcm, a DICOM "
                                   "Segmentation referencing the input series (DICOM inputs only)."),
    shard: str | None = typer.Option(None, "--shard", metavar="I/N", help="Process every N-th case "
                                     "starting at I (0-based), for cluster job arrays."),
    force: bool = typer.Option(False, "--force", help="Redo cases already finished."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Segment the liver (1) and liver tumours (2); each mask lands on its input's exact grid.

    Beside each mask a JSON sidecar records liver and tumour volume (mL), mean liver HU, QC
    flags and measures (docs/qc.md), seconds per stage and the model. Finished cases are
    skipped (--force redoes them); a bad case is reported and the batch goes on; the exit code
    is 2 if any case failed.
    """
    from liverseg.batch import run_inference
    from liverseg.jobs import parse_shard

    def bar(items: Iterable[CaseJob], total: int) -> Iterable[CaseJob]:
        return progress(items, total=total, desc="infer", quiet=quiet or as_json)

    def report_error(result: CaseResult) -> None:
        typer.echo(f"error: {result.error}", err=True)

    def report_warnings(result: CaseResult) -> None:
        for warning in result.warnings:
            typer.echo(f"warning: {result.input}: {warning}", err=True)

    report = run_inference(
        list(inputs), output, model=model, device=device, overlap=overlap, tta=tta,
        sw_batch_size=sw_batch_size, save_probabilities=save_probabilities, preview=preview,
        shard=parse_shard(shard), force=force, postprocess=postprocess, dicom_seg=dicom_seg,
        precision=precision.value if precision is not None else None, lean_import=True, progress=bar,
        on_error=report_error, on_warning=report_warnings)
    if as_json:
        emit_json(report.to_dict())
    elif not quiet and len(report.cases) > 1:
        typer.echo(f"infer: {report.summary()}", err=True)
    elif not quiet and report.done:
        done = report.done[0]
        flags = "QC ok" if not done.qc_flags else "QC: " + ", ".join(done.qc_flags)
        typer.echo(f"wrote {done.output} ({flags})", err=True)
    if not report.ok:
        raise typer.Exit(EXIT_BAD_INPUT)
