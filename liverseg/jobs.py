"""Which cases a ``liverseg infer`` run has and where their outputs go: inputs (files, DICOM series,
dataset folders) -> one :class:`CaseJob` per case, sharding, and whether a case is finished (its
sidecar, written last, is there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from liverseg.errors import LiversegError
from liverseg.io import NIFTI_SUFFIXES, case_name

DEFAULT_OUTPUT = Path("liverseg_out")


@dataclass(frozen=True)
class CaseJob:
    case: str
    image: Path
    mask: Path

    @property
    def sidecar(self) -> Path:
        return _sibling(self.mask, ".json")

    @property
    def probabilities(self) -> Path:
        return _sibling(self.mask, "_probabilities.nii.gz")

    @property
    def preview(self) -> Path:
        return _sibling(self.mask, ".png")

    @property
    def dicom_seg(self) -> Path:
        return _sibling(self.mask, "_seg.dcm")


def _sibling(mask: Path, suffix: str) -> Path:
    name = mask.name
    for ext in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return mask.with_name(name + suffix)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N, as Slurm array and Kubernetes indexed-job indices) -> (I, N)."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise LiversegError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise LiversegError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return index, count


def collect_cases(inputs: list[Path]) -> list[tuple[str, Path]]:
    """(case name, image path) for every input file, DICOM series folder or folder of those."""
    from liverseg.datasets import find_dataset

    cases: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() != ".csv":
            cases.append((case_name(path), path))  # read (and judged) later, as its own case
            continue
        if not path.exists():
            raise LiversegError("input not found; check the path", path)
        dataset = find_dataset(path)
        cases.extend((c.case_id, c.image) for c in dataset.cases)
    names = [name for name, _ in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LiversegError(f"several inputs share the case name(s) {', '.join(duplicates[:5])}; "
                            "their outputs would overwrite each other, rename or run them apart")
    return cases


def plan_jobs(inputs: list[Path], output: Path | None, shard: tuple[int, int] | None = None) -> list[CaseJob]:
    """Where each case's mask goes: OUT itself for one input and OUT ending in .nii/.nii.gz,
    else OUT/<case>.nii.gz (default ./liverseg_out/)."""
    cases = collect_cases(inputs)
    single_file = output is not None and output.name.lower().endswith(NIFTI_SUFFIXES)
    if single_file and len(cases) != 1:
        raise LiversegError(f"-o names one mask file but there are {len(cases)} cases; give a folder",
                            output)
    folder = output if output is not None else DEFAULT_OUTPUT
    jobs = [CaseJob(name, image, output if single_file else folder / f"{name}.nii.gz")  # type: ignore[arg-type]
            for name, image in sorted(cases)]
    if shard is not None:
        index, count = shard
        jobs = jobs[index::count]
    return jobs


def finished(job: CaseJob, dicom_seg: bool = False) -> bool:
    # The sidecar is written last (atomically), so its presence means the case is complete.
    return job.mask.is_file() and job.sidecar.is_file() and (not dicom_seg or job.dicom_seg.is_file())


def sidecar_flags(job: CaseJob) -> list[str] | None:
    """The QC flags recorded by an earlier run (None when that sidecar has none)."""
    try:
        flags = json.loads(job.sidecar.read_text(encoding="utf-8")).get("qc", {}).get("flags")
    except (OSError, ValueError, AttributeError):
        return None
    return list(flags) if isinstance(flags, list) else None


def check_dicom_seg_inputs(jobs: list[CaseJob]) -> None:
    """--dicom-seg needs a DICOM series to reference: refuse any other input before any work."""
    for job in jobs:
        if not job.image.is_dir():
            raise LiversegError("--dicom-seg needs a DICOM series folder as input, but this is a file "
                                "(no series for a SEG to reference); leave out --dicom-seg or give "
                                "the series folder", job.image)
