"""DICOM series: finding them in a folder, and reading one only when its slices form a regular grid.

SimpleITK (GDCM) sorts a series by slice position and builds one spacing for it, but it only
*warns* when the slices are not evenly spaced (a slice missing in transfer, uneven
reconstructions, two acquisitions under one SeriesInstanceUID), mixes orientations, or is
sheared (gantry tilt): the volume it returns then has a wrong geometry, so a mask would be
placed wrongly and volumes in mL would be wrong. Here the slice positions
(ImagePositionPatient projected on the slice normal from ImageOrientationPatient) are checked
after reading and such a series is refused with a one-line error that says what is wrong.

Refusing rather than resampling is deliberate: liverseg's rule is a mask on the input's exact
grid, and an uneven series has no regular grid for a mask (a DICOM SEG of it would not map frame
to slice either). ``dcm2niix`` resamples uneven and tilted series to a regular grid when the user
decides that is acceptable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liverseg.errors import LiversegError

if TYPE_CHECKING:
    import SimpleITK

# A slice may sit this fraction of the series' slice spacing off the regular grid (rounding in
# the headers is ~1e-4 mm; 5% of a 2 mm spacing is 0.1 mm, far below what a 3-4 mm model sees).
SPACING_TOLERANCE = 0.05
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines; 1e-3 is 0.06 degrees
_WHAT_TO_DO = ("re-export the complete series from the scanner or PACS, or convert it with dcm2niix "
               "(which resamples uneven and tilted series) and give liverseg the NIfTI")


class _SimpleITK:
    """SimpleITK, imported on first use: importing it costs about 0.3 s and 100 MB that reading
    NIfTI never needs (most of what ``liverseg infer`` reads)."""

    def __getattr__(self, name: str) -> object:
        import SimpleITK

        # ITK prints warnings (e.g. 'No Series were found') straight to stderr; liverseg reports
        # problems itself as one-line errors, so keep stderr clean.
        SimpleITK.ProcessObject_SetGlobalWarningDisplay(False)
        return getattr(SimpleITK, name)


sitk = _SimpleITK()


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """The DICOM series in a folder (not recursive): SeriesInstanceUID -> files sorted by position.

    GDCM orders each series by image position along the slice normal, not by file name.
    """
    reader = sitk.ImageSeriesReader()
    series: dict[str, list[str]] = {}
    try:
        for uid in reader.GetGDCMSeriesIDs(str(folder)):
            series[uid] = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    except RuntimeError:
        return {}
    return {uid: files for uid, files in series.items() if files}


def _multi_frame_error(frames: int, modality: str, path: Path | str) -> LiversegError:
    what = ("a DICOM Segmentation, not a CT: give the CT series folder" if modality == "SEG" else
            "liverseg reads CT as a folder of single-frame slices; convert the file with dcm2niix "
            "and give the NIfTI, or export the series as single-frame slices")
    return LiversegError(f"multi-frame DICOM file ({frames} frames, modality {modality or 'unknown'}): "
                         f"{what}", path)


def check_dicom_file(path: Path) -> None:
    """Refuse a single multi-frame DICOM file, which GDCM reads with a made-up slice spacing."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable: the actual read reports it
    frames = _int(reader.GetMetaData("0028|0008")) if reader.HasMetaDataKey("0028|0008") else 1
    if frames > 1:
        modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
        raise _multi_frame_error(frames, modality, path)


def _int(text: str) -> int:
    try:
        return int(float(text.strip()))
    except ValueError:
        return 1


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.strip().split("\\")]
    except ValueError:
        return []


def _choose(folder: Path, series_uid: str | None) -> tuple[list[str], list[str]]:
    """(files of the series to read, in slice order; warnings)."""
    series = dicom_series(folder)
    if not series:
        raise LiversegError("folder holds no readable DICOM image series; point to a folder of CT "
                            "slices (.dcm) or to a NIfTI file", folder)
    if series_uid is not None:
        if series_uid not in series:
            known = ", ".join(sorted(series)) or "none"
            raise LiversegError(f"no DICOM series with SeriesInstanceUID {series_uid} (found: {known})",
                                folder)
        return series[series_uid], []
    uid, files = max(series.items(), key=lambda item: len(item[1]))  # the largest is the CT
    if len(series) == 1:
        return files, []
    others = ", ".join(f"{len(f)} slices" for u, f in series.items() if u != uid)
    return files, [f"folder holds {len(series)} DICOM series; used the largest ({len(files)} slices), "
                   f"ignored the others ({others}); give each series its own folder"]


def dicom_series_files(folder: Path, series_uid: str | None = None) -> list[str]:
    """The files :func:`read_series` reads from a DICOM folder, in slice order: the series
    ``series_uid``, else the largest series (the CT; scouts and dose reports are smaller)."""
    return _choose(Path(folder), series_uid)[0]


def read_series(folder: Path, series_uid: str | None = None) -> tuple[SimpleITK.Image, list[str]]:
    """The series' image (SimpleITK, LPS) and warnings; refuses series without a regular grid.

    Without ``series_uid`` the largest series is read; a warning names the others.
    """
    files, warnings = _choose(folder, series_uid)
    if len(files) < 2:
        check_dicom_file(Path(files[0]))
        raise LiversegError("DICOM series has a single slice; liverseg needs a 3D CT series", folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice headers, read with the pixels
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown error"
        raise LiversegError(f"cannot read DICOM series ({first})", folder) from None
    check_slice_geometry(reader, len(files), folder)
    return image, warnings


def check_slice_geometry(reader: SimpleITK.ImageSeriesReader, count: int, folder: Path) -> None:
    """Refuse a series whose slices (in the reader's order) do not lie on one regular grid."""

    def tag(i: int, key: str) -> str:
        return reader.GetMetaData(i, key) if reader.HasMetaDataKey(i, key) else ""

    frames = [_int(tag(i, "0028|0008") or "1") for i in range(count)]
    if max(frames) > 1:
        raise _multi_frame_error(max(frames), tag(0, "0008|0060").strip(), folder)
    orientation = [_floats(tag(i, "0020|0037")) for i in range(count)]
    position = [_floats(tag(i, "0020|0032")) for i in range(count)]
    if any(len(o) != 6 for o in orientation) or any(len(p) != 3 for p in position):
        raise LiversegError("DICOM slices lack ImagePositionPatient/ImageOrientationPatient, so they "
                            f"cannot be placed in 3D; {_WHAT_TO_DO}", folder)
    iop, ipp = np.array(orientation), np.array(position)
    if np.abs(iop - iop[0]).max() > _ORIENTATION_TOLERANCE:
        distinct = {tuple(np.round(o, 2)) for o in iop}
        raise LiversegError(f"DICOM series mixes {len(distinct)} slice orientations (ImageOrientationPatient "
                            "differs between slices, e.g. axial slices with a coronal scout); put each "
                            "orientation in its own series folder", folder)
    normal = np.cross(iop[0, :3], iop[0, 3:])
    normal /= np.linalg.norm(normal)
    along = ipp @ normal  # each slice's position on the normal, mm
    steps = np.diff(along)
    same = int(np.sum(np.abs(steps) < 1e-3))
    if same:
        raise LiversegError(f"DICOM series has {same + 1} slices at the same position (of {count}): it "
                            f"mixes two acquisitions under one SeriesInstanceUID; {_WHAT_TO_DO}", folder)
    step = float(np.median(steps))
    deviation = np.abs(steps - step)
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_TOLERANCE * abs(step):
        gap = steps[worst] / step
        where = (f"slices {worst + 1} and {worst + 2} of {count} (at {along[worst]:.2f} and "
                 f"{along[worst + 1]:.2f} mm along the slice normal) are {abs(steps[worst]):.3g} mm apart "
                 f"where the others are {abs(step):.3g} mm")
        if gap > 1.5 and abs(gap - round(gap)) < SPACING_TOLERANCE:
            missing = round(gap) - 1
            problem = f"DICOM series has {missing} missing slice{'s' if missing > 1 else ''}: {where}"
        else:
            problem = f"DICOM series has uneven slice spacing: {where}"
        raise LiversegError(f"{problem}; {_WHAT_TO_DO}", folder)
    drift = (ipp[-1] - ipp[0]) - (along[-1] - along[0]) * normal  # in-plane shift across the series
    shear = float(np.linalg.norm(drift)) / (count - 1)
    if shear > SPACING_TOLERANCE * abs(step):
        angle = float(np.degrees(np.arctan2(shear, abs(step))))
        raise LiversegError(f"DICOM slices are sheared (each slice shifted {shear:.3g} mm in its plane, a "
                            f"gantry tilt of about {angle:.1f} degrees), which a regular grid cannot hold; "
                            f"{_WHAT_TO_DO}", folder)
