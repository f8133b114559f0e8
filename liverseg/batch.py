"""The batch runner behind ``liverseg infer``: one case read (the next one read ahead), predicted
and written (mask, sidecar with QC, optional probabilities, preview and DICOM SEG), resume. Which
cases there are and where their outputs go (sharding included) is :mod:`liverseg.jobs`.

Finished cases (mask and sidecar present; the sidecar is written last, atomically) are skipped; a
failing case is recorded and the batch goes on. Each case is claimed (``atomic.claimed``) while it
is worked on, so several runs may share an output folder, and a run killed at any moment is
rerun with the same command (its temporary files are removed, finished cases kept).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from liverseg import qc
from liverseg.bundle import Bundle
from liverseg.errors import LiversegError
from liverseg.infer import predict_volume, resolve_device, timed
from liverseg.io import Volume, write_mask, write_text_atomic
from liverseg.jobs import (
    CaseJob,
    check_dicom_seg_inputs,
    finished,
    plan_jobs,
    sidecar_flags,
)


@dataclass
class CaseResult:
    case: str
    input: str
    output: str
    status: str  # "done", "skipped" or "failed"
    error: str = ""
    seconds: float = 0.0
    qc_flags: list[str] | None = None  # the case's QC flags (None: unknown, e.g. failed)
    warnings: list[str] = field(default_factory=list)  # the input was usable but doubtful


@dataclass
class InferReport:
    cases: list[CaseResult] = field(default_factory=list)
    model_id: str = ""
    model_version: str = ""

    def _with(self, status: str) -> list[CaseResult]:
        return [c for c in self.cases if c.status == status]

    @property
    def done(self) -> list[CaseResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[CaseResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseResult]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (f"{len(self.done)} done, {len(self.skipped)} skipped (already finished), "
                f"{len(self.failed)} failed")
        flagged = [c for c in self.cases if c.qc_flags]
        if flagged:
            text += f"; QC flags on {len(flagged)}: " + "; ".join(
                f"{c.case} ({', '.join(c.qc_flags or [])})" for c in flagged)
        return text

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "model_version": self.model_version,
                "done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "cases": [asdict(c) for c in self.cases]}


def _write_probabilities(probabilities: np.ndarray, reference: Volume, path: Path) -> None:
    """(C, x, y, z) probabilities as a 4D NIfTI (x, y, z, C) on the input grid, 8-bit with a
    scale factor of 1/255 (readers apply it), which keeps files small."""
    import nibabel as nib

    from liverseg.io import save_nifti

    data = np.clip(np.rint(np.moveaxis(probabilities, 0, -1) * 255.0), 0, 255).astype(np.uint8)
    image = nib.Nifti1Image(data, reference.affine)
    image.set_qform(reference.affine, 1)
    image.set_sform(reference.affine, 1)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    save_nifti(image, path)


CaseInput = tuple[Volume, bool | None, float]  # the CT, its contrast (None: unknown), read seconds


def read_case(job: CaseJob) -> CaseInput:
    """A case's CT, whether DICOM says it is contrast-enhanced, and the seconds that took."""
    from liverseg.io import read_ct

    start = time.perf_counter()
    volume = read_ct(job.image)
    contrast = qc.contrast_from_dicom(job.image) if job.image.is_dir() else None
    return volume, contrast, round(time.perf_counter() - start, 4)


class ReadAhead:
    """Reads the next case's CT in a background thread: the first while the network loads, each
    next one once the network is done with the case before it (:meth:`start_next`), so that the
    read runs beside that case's single-threaded stages (resampling, postprocessing, QC, writing)
    on the core they leave idle, not against the network's threads. Inflating and converting a CT
    runs mostly outside the GIL; at most one volume waits in memory. A read's error comes out of
    :meth:`take`."""

    def __init__(self, jobs: list[CaseJob]) -> None:
        self._order = {job: i for i, job in enumerate(jobs)}
        self._jobs = jobs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liverseg-read")
        self._pending: tuple[CaseJob, Future[CaseInput]] | None = None
        self._following: int | None = None
        if jobs:
            self._pending = (jobs[0], self._pool.submit(read_case, jobs[0]))

    def take(self, job: CaseJob) -> CaseInput:
        """``job``'s input (read now if it was not read ahead); :meth:`start_next` then reads the
        case after it."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == job:
            future = pending[1]
        else:  # not the case read ahead (put off by a claim, or none): read it now
            if pending is not None:
                pending[1].cancel()
            future = self._pool.submit(read_case, job)
        self._following = self._order.get(job, len(self._jobs)) + 1
        return future.result()

    def start_next(self) -> None:
        """Start reading the case after the one last taken; once (later calls do nothing)."""
        following, self._following = self._following, None
        if following is not None and following < len(self._jobs) and self._pending is None:
            self._pending = (self._jobs[following], self._pool.submit(read_case, self._jobs[following]))

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def infer_case(job: CaseJob, bundle: Bundle, *, device: str = "cpu", overlap: float | None = None,
               tta: bool | None = None, sw_batch_size: int | None = None,
               save_probabilities: bool = False, preview: bool = False,
               postprocess: bool = True, dicom_seg: bool = False,
               reader: ReadAhead | None = None, precision: str | None = None) -> dict:
    """Read (or take from ``reader``), predict and write one case (mask, optional probabilities,
    preview and DICOM SEG, sidecar). ``seconds.read`` is the read's own time, also when it ran
    ahead in the background; ``seconds.total`` runs from taking the input to the sidecar."""
    from liverseg import __version__

    timings: dict[str, float] = {}
    start = time.perf_counter()
    volume, contrast, timings["read"] = reader.take(job) if reader is not None else read_case(job)
    try:
        prediction = predict_volume(volume, bundle, device=device, overlap=overlap, tta=tta,
                                    sw_batch_size=sw_batch_size, keep_probabilities=save_probabilities,
                                    postprocess=None if postprocess else False, contrast=contrast,
                                    precision=precision,
                                    on_predicted=reader.start_next if reader is not None else None)
    finally:
        if reader is not None:
            reader.start_next()  # also when the case failed before its network was done
    seg_info = None
    timings.update(prediction.timings)
    # The sidecar marks a finished case: remove an earlier run's first, so that a crash while the
    # new files are written leaves the case unfinished rather than old sidecar + new mask.
    job.sidecar.unlink(missing_ok=True)
    written: list[Path] = []
    try:
        with timed(timings, "write"):
            write_mask(prediction.labels, volume, job.mask)
            written.append(job.mask)
            if prediction.probabilities is not None:
                _write_probabilities(prediction.probabilities, volume, job.probabilities)
                written.append(job.probabilities)
        if preview:
            from liverseg.pictures import save_overlay_png

            with timed(timings, "preview"):
                save_overlay_png(volume.array, prediction.labels, volume.spacing, job.preview,
                                 title=f"{job.case} ({bundle.model_id})", affine=volume.affine)
                written.append(job.preview)
        if dicom_seg:
            from liverseg.dicomseg import write_dicom_seg

            with timed(timings, "dicom_seg"):
                seg_info = write_dicom_seg(prediction.labels, volume, job.image, job.dicom_seg,
                                           model_name=bundle.model_id, model_version=bundle.model_version)
                written.append(job.dicom_seg)
    except BaseException:
        for path in written:  # a failed case leaves no outputs behind
            path.unlink(missing_ok=True)
        raise
    timings["total"] = round(time.perf_counter() - start, 4)
    sidecar = {
        "case": job.case,
        "input": str(job.image),
        "mask": str(job.mask),
        "labels": {str(k): v for k, v in bundle.plan.labels.items()},
        **prediction.stats,
        "qc": prediction.qc,
        "seconds": timings,
        "model_id": bundle.model_id,
        "model_version": bundle.model_version,
        "model_path": str(bundle.path),
        "liverseg_version": __version__,
        "device": device,
        "precision": prediction.precision,
        "geometry": volume.geometry(),
        "warnings": list(volume.warnings),
    }
    if save_probabilities:
        sidecar["probabilities"] = str(job.probabilities)
    if preview:
        sidecar["preview"] = str(job.preview)
    if seg_info is not None:
        sidecar["dicom_seg"] = seg_info.to_dict()
    write_text_atomic(job.sidecar, json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def run_inference(inputs: list[Path], output: Path | None, *, model: Path | None = None,
                  device: str = "auto", overlap: float | None = None, tta: bool | None = None,
                  sw_batch_size: int | None = None, save_probabilities: bool = False,
                  preview: bool = False, shard: tuple[int, int] | None = None, force: bool = False,
                  postprocess: bool = True, dicom_seg: bool = False, precision: str | None = None,
                  lean_import: bool = False,
                  progress: Callable[[Iterable[CaseJob], int], Iterable[CaseJob]] | None = None,
                  on_error: Callable[[CaseResult], None] | None = None,
                  on_warning: Callable[[CaseResult], None] | None = None) -> InferReport:
    """Segment every case; finished cases are skipped unless ``force``; a failing case is recorded
    and the batch goes on. Setup errors (no model, no inputs) raise LiversegError before any write.
    ``lean_import``: import MONAI without its unused optional extras (the CLI's own process only:
    liverseg.monai_import).
    """
    from liverseg.bundle import load_bundle

    device = resolve_device(device)
    jobs = plan_jobs(inputs, output, shard)
    if dicom_seg:
        check_dicom_seg_inputs(jobs)
    with ReadAhead([job for job in jobs if force or not finished(job, dicom_seg)]) as reader:
        if lean_import:  # the CLI's own process (liverseg.monai_import)
            from liverseg.monai_import import import_monai_for_inference

            import_monai_for_inference()
        bundle = load_bundle(model, device=device)  # while the first CT is read
        return _run_jobs(jobs, bundle, reader, device=device, overlap=overlap, tta=tta,
                         sw_batch_size=sw_batch_size, save_probabilities=save_probabilities,
                         preview=preview, force=force, postprocess=postprocess, dicom_seg=dicom_seg,
                         precision=precision, progress=progress, on_error=on_error, on_warning=on_warning)


def _run_jobs(jobs: list[CaseJob], bundle: Bundle, reader: ReadAhead, *, device: str,
              overlap: float | None, tta: bool | None, sw_batch_size: int | None,
              save_probabilities: bool, preview: bool, force: bool, postprocess: bool, dicom_seg: bool,
              precision: str | None,
              progress: Callable[[Iterable[CaseJob], int], Iterable[CaseJob]] | None,
              on_error: Callable[[CaseResult], None] | None,
              on_warning: Callable[[CaseResult], None] | None) -> InferReport:
    from liverseg.atomic import claimed, remove_stale_parts

    report = InferReport(model_id=bundle.model_id, model_version=bundle.model_version)
    remove_stale_parts(*sorted({job.mask.parent for job in jobs}))  # left by runs that were killed
    iterable: Iterable[CaseJob] = progress(jobs, len(jobs)) if progress is not None else jobs
    for job, todo in claimed(iterable, lambda j: j.mask, lambda j: finished(j, dicom_seg), force=force):
        if not todo:
            report.cases.append(CaseResult(job.case, str(job.image), str(job.mask), "skipped",
                                           qc_flags=sidecar_flags(job)))
            continue
        start = time.perf_counter()
        try:
            sidecar = infer_case(job, bundle, device=device, overlap=overlap, tta=tta,
                                 sw_batch_size=sw_batch_size, save_probabilities=save_probabilities,
                                 preview=preview, postprocess=postprocess, dicom_seg=dicom_seg,
                                 reader=reader, precision=precision)
        except LiversegError as exc:
            result = CaseResult(job.case, str(job.image), str(job.mask), "failed", str(exc))
        except (RuntimeError, ValueError, MemoryError, OSError) as exc:
            # Not a user error we foresaw; still one line, and the batch goes on.
            message = " ".join(f"{job.image}: {type(exc).__name__}: {exc}".split())[:400]
            result = CaseResult(job.case, str(job.image), str(job.mask), "failed", message)
        else:
            result = CaseResult(job.case, str(job.image), str(job.mask), "done",
                                seconds=round(time.perf_counter() - start, 3),
                                qc_flags=list(sidecar["qc"]["flags"]), warnings=sidecar["warnings"])
        report.cases.append(result)
        if result.status == "failed" and on_error is not None:
            on_error(result)
        if result.warnings and on_warning is not None:
            on_warning(result)
    order = {job.case: i for i, job in enumerate(jobs)}
    report.cases.sort(key=lambda c: order[c.case])  # cases waited for come last otherwise
    return report
