"""Masks as DICOM Segmentation objects that reference their source CT series (highdicom).

PACS viewers (OHIF, 3D Slicer, Horos) take segmentations as DICOM SEG, which point at the CT
instances they were drawn on. :func:`write_dicom_seg` turns a label map on a DICOM series' grid
(as :func:`liverseg.io.read_ct` read it) into one binary SEG with two segments, coded in SNOMED CT:

* segment 1 ``Liver`` (category Anatomical Structure 91723000, type Liver 10200004): label 1;
* segment 2 ``Liver tumour`` (category Morphologically Abnormal Structure 49755003, type
  Neoplasm 108369006, anatomic region Liver): label 2.

The segments do not overlap, exactly as the NIfTI label map: the liver of LiTS (label > 0) is
their union. Frame ``k`` of the SEG is the mask on the ``k``-th instance in the order the series
was read; frames where no segment is present are left out (highdicom's ``omit_empty_frames``).
Before anything is written, every instance's position and orientation are checked against the
mask's grid, so a SEG can never point at the wrong slice.

Anonymisation sometimes empties identifiers a SEG must copy. A missing SOP Instance/Class UID is
taken from the file's meta header (which names the same instance); a missing Study or Series
Instance UID is replaced by one derived deterministically from the instance UIDs, and the
substitution is reported (``DicomSegInfo.substituted``) because a viewer will then not file the
SEG under the source's study by itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverseg.errors import LiversegError
from liverseg.io import Volume, atomic_path

#: Position tolerance (mm) between a header's Image Position and the mask grid: DICOM decimal
#: strings carry about 6 significant digits.
_POSITION_TOL_MM = 1e-2
_ORIENTATION_TOL = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class DicomSegInfo:
    """What was written: the file, its segments, its frame count and any identifier substitutes."""

    path: str
    segments: dict[int, str]
    frames: int
    referenced_instances: int
    substituted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "segments": {str(k): v for k, v in self.segments.items()},
                "frames": self.frames, "referenced_instances": self.referenced_instances,
                "substituted": self.substituted}


def segment_descriptions(model_name: str, model_version: str) -> list:
    """The two segments (liver, liver tumour) with their SNOMED CT codes and the algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64] or "liverseg", version=model_version[:64] or "unknown",
        family=codes.DCM.ArtificialIntelligence)
    # (number, label, category, type, anatomic region, CIELab display colour)
    segments = [
        (1, "Liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver, None, (57.0, -30.0, 20.0)),
        (2, "Liver tumour", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm,
         [codes.SCT.Liver], (55.0, 70.0, 45.0)),
    ]
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=label.lower(), tracking_uid=hd.UID(),
        anatomic_regions=regions, display_color=hd.color.CIELabColor(*colour))
        for number, label, category, kind, regions, colour in segments]


def read_series_headers(files: list[str], source: str | Path) -> tuple[list, list[str]]:
    """The headers (no pixels) of a series' files in the given order, with identifiers a SEG
    needs filled in where anonymisation emptied them; returns (datasets, substitutions)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import generate_uid

    datasets = []
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            raise LiversegError(f"cannot read DICOM header of {name} ({exc})", source) from None
        meta = getattr(ds, "file_meta", None)
        for attr, meta_attr in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(ds.get(attr, "") or "") and meta is not None and meta.get(meta_attr):
                setattr(ds, attr, meta.get(meta_attr))
        if not str(ds.get("SOPInstanceUID", "") or ""):
            raise LiversegError(f"{name} has no SOP Instance UID, so a SEG cannot reference it; "
                                "write a NIfTI mask only (leave out --dicom-seg)", source)
        datasets.append(ds)
    substituted = []
    instance_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(attr, "") or "") for ds in datasets}
        if values == {""}:
            uid = generate_uid(entropy_srcs=["liverseg", attr, *instance_uids])
            for ds in datasets:
                setattr(ds, attr, uid)
            substituted.append(f"{attr} (empty in the source; derived {uid})")
        elif len(values) != 1:
            raise LiversegError(f"the series' files disagree on {attr}; give a folder holding one "
                                "series", source)
    for ds in datasets:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty means the default repertoire; highdicom wants it absent
        # type 2 attributes a SEG copies: present, even if empty
        for attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                     "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber"):
            if attr not in ds:
                setattr(ds, attr, "")
    return datasets, substituted


def check_grid(datasets: list, volume: Volume, source: str | Path) -> None:
    """Refuse unless instance ``k`` lies exactly at the mask grid's slice ``k`` (position,
    orientation, rows x columns): the SEG's frames are placed by these headers."""
    nx, ny, nz = volume.shape
    if len(datasets) != nz:
        raise LiversegError(f"the series has {len(datasets)} instances but the mask {nz} slices; "
                            "the mask must come from this series", source)
    lps = _LPS_TO_RAS @ np.asarray(volume.affine)[:3, :3]  # RAS -> LPS (the matrix is its own inverse)
    lps_origin = _LPS_TO_RAS @ np.asarray(volume.affine)[:3, 3]
    row_dir = lps[:, 0] / np.linalg.norm(lps[:, 0])  # along a row: the column index (x) grows
    col_dir = lps[:, 1] / np.linalg.norm(lps[:, 1])
    for k, ds in enumerate(datasets):
        if int(ds.Rows) != ny or int(ds.Columns) != nx:
            raise LiversegError(f"instance {k} is {ds.Rows}x{ds.Columns} but the mask slices are "
                                f"{ny}x{nx}; the mask must come from this series", source)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        expected = lps_origin + lps[:, 2] * k
        if (not np.allclose(orientation[:3], row_dir, atol=_ORIENTATION_TOL)
                or not np.allclose(orientation[3:], col_dir, atol=_ORIENTATION_TOL)
                or not np.allclose(position, expected, atol=_POSITION_TOL_MM)):
            raise LiversegError(f"instance {k} ({ds.SOPInstanceUID}) is not where the mask's slice {k} "
                                "lies; the mask must be on the grid this series was read into", source)


def write_dicom_seg(labels: np.ndarray, volume: Volume, series_dir: str | Path, path: str | Path, *,
                    model_name: str = "liverseg", model_version: str = "",
                    series_uid: str | None = None) -> DicomSegInfo:
    """Write ``labels`` (0 background, 1 liver, 2 tumour; on ``volume``'s grid, which
    :func:`liverseg.io.read_ct` read from ``series_dir``) as a DICOM SEG at ``path``, atomically.
    """
    from liverseg.io import dicom_series_files

    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the volume grid {volume.shape}")
    if labels.size and int(labels.max()) > 2:
        raise ValueError("labels must be 0 background, 1 liver, 2 tumour")
    files = dicom_series_files(Path(series_dir), series_uid)
    datasets, substituted = read_series_headers(files, series_dir)
    check_grid(datasets, volume, series_dir)
    # (x, y, z) -> one frame per instance: frame k is slice k with rows along y, columns along x.
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=np.uint8)
    descriptions = segment_descriptions(model_name, model_version)
    with warnings.catch_warnings():
        # Names copied from the source (e.g. 'JANCT000') trip highdicom's person-name advice;
        # they are the source's, not ours to rewrite.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(datasets, frames, descriptions, model_name)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return DicomSegInfo(path=str(path), segments={d.SegmentNumber: d.SegmentLabel for d in descriptions},
                        frames=int(seg.NumberOfFrames), referenced_instances=len(datasets),
                        substituted=substituted)


def _segmentation(datasets: list, frames: np.ndarray, descriptions: list, model_name: str) -> object:
    import highdicom as hd

    from liverseg import __version__

    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="liverseg",
        manufacturer_model_name=model_name[:64] or "liverseg", software_versions=__version__,
        device_serial_number="none", content_label="LIVERSEG",
        content_description="Liver and liver tumour (automatic, liverseg)",
        omit_empty_frames=True)


def read_dicom_seg_labels(seg_path: str | Path, series_dir: str | Path,
                          series_uid: str | None = None) -> np.ndarray:
    """A SEG's segments as a label map (segment number = label) on the grid of the series it
    references, in :func:`liverseg.io.read_ct`'s (x, y, z) order; instances without a frame are 0."""
    import highdicom as hd

    from liverseg.io import dicom_series_files

    seg = hd.seg.segread(str(seg_path))
    datasets, _ = read_series_headers(dicom_series_files(Path(series_dir), series_uid), series_dir)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                               assert_missing_frames_are_empty=True, dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 1, 0))
