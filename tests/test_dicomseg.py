"""DICOM SEG out: the SEG read back with highdicom is the NIfTI mask, voxel for voxel, on every
real series in ../shared/data/dicom; it references the series, codes its segments in SNOMED CT,
holds frames only where a segment is, and passes dciodvfy; NIfTI inputs are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_DIR, shared_file
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.dicomseg import read_dicom_seg_labels, write_dicom_seg
from liverseg.errors import LiversegError
from liverseg.io import dicom_series, dicom_series_files, read_ct, read_label

runner = CliRunner()


def series_folders() -> list[Path]:
    """Every folder of ../shared/data/dicom that holds a DICOM series: the tests follow the data."""
    folders = sorted(p for p in shared_file("dicom").iterdir() if p.is_dir() and dicom_series(p))
    if not folders:
        pytest.fail(f"no DICOM series found in {DICOM_DIR}")
    return folders


def labels_from_seg(seg_path: Path, series: Path, trust_locations: bool = False) -> np.ndarray:
    """The test's own reading of a SEG (highdicom), onto the series' grid in read_ct's (x, y, z)
    order: frames are looked up by the SOP Instance UID of each file, in the order read_ct reads.
    ``trust_locations`` for SEGs that do not state that spatial locations are preserved."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    uids = []
    for name in dicom_series_files(series):
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        uids.append(str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID))
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, dtype=np.uint8,
                                               ignore_spatial_locations=trust_locations)
    return pixels.transpose(2, 1, 0)


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports; in CI a missing dciodvfy fails, elsewhere it skips."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy missing in CI: apt-get install -y dicom3tools (see .ci/run)")
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def test_the_shipped_reference_seg_reads_back_as_its_label_map() -> None:
    """The reading used below, checked on a SEG made by other software (dcmqi) first."""
    series = shared_file("dicom/ct3slice_series")
    reference = read_label(shared_file("dicom/ct3slice_liver.nrrd"))
    # dcmqi leaves out SpatialLocationsPreserved (ours states YES, so it is checked below).
    rebuilt = labels_from_seg(shared_file("dicom/ct3slice_liver_seg.dcm"), series, trust_locations=True)
    assert reference.array.any()
    np.testing.assert_array_equal(rebuilt, reference.array)


def demo_labels(volume_hu: np.ndarray) -> np.ndarray:
    """Liver and tumour labels on a real grid, from its HU: soft tissue 1, denser tissue 2, and
    the first slice left empty (no frame may be written for it)."""
    labels = np.zeros(volume_hu.shape, dtype=np.uint8)
    labels[(volume_hu > 20) & (volume_hu < 100)] = 1
    labels[(volume_hu >= 100) & (volume_hu < 300)] = 2
    labels[:, :, 0] = 0
    return labels


@pytest.mark.parametrize("series", series_folders(), ids=lambda p: p.name)
def test_seg_round_trip_is_identical_and_valid(series: Path, tmp_path: Path) -> None:
    volume = read_ct(series, min_extent_mm=None)  # the 3-slice series too: a slab is refused for infer
    labels = demo_labels(volume.array)
    assert {1, 2} <= set(np.unique(labels).tolist())
    out = tmp_path / f"{series.name}_seg.dcm"
    info = write_dicom_seg(labels, volume, series, out, model_name="test-model", model_version="1")

    np.testing.assert_array_equal(labels_from_seg(out, series), labels)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, series), labels)
    # Frames only where a segment is present: one per (slice, segment) holding any voxel.
    present = sum(int(np.any(labels[:, :, k] == s)) for k in range(labels.shape[2]) for s in (1, 2))
    seg = pydicom.dcmread(out)
    assert int(seg.NumberOfFrames) == info.frames == present < 2 * labels.shape[2]
    # It references every instance of the source series, and codes its segments in SNOMED CT.
    instances = {str(i.ReferencedSOPInstanceUID)
                 for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    files = dicom_series_files(series)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).get("SOPInstanceUID")
                    or pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
                for f in files}
    assert instances == expected and info.referenced_instances == len(files)
    types = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
              s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert types == [("Liver", "SCT", "10200004"), ("Liver tumour", "SCT", "108369006")]
    errors, _ = dciodvfy_errors(out)
    assert errors == []


def test_a_mask_from_another_grid_is_refused(tmp_path: Path) -> None:
    series = shared_file("dicom/ct3slice_series")
    volume = read_ct(series, min_extent_mm=None)  # a 3 mm slab, read for its grid
    labels = demo_labels(volume.array)
    shifted = volume.with_array(volume.array)
    shifted.affine[:3, 3] += [0.0, 0.0, 1.0]  # one slice off
    with pytest.raises(LiversegError, match="not where the mask's slice 0 lies"):
        write_dicom_seg(labels, shifted, series, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def test_infer_dicom_seg_on_a_real_series(tmp_path: Path) -> None:
    """Through the CLI with the shipped model: the SEG equals the NIfTI mask it sits beside."""
    series = shared_file("dicom/tsexample_series")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(series), "-o", str(out), "--dicom-seg"])
    assert result.exit_code == 0, result.output
    mask = read_label(out / "tsexample_series.nii.gz")
    seg_file = out / "tsexample_series_seg.dcm"
    assert mask.array.any()
    np.testing.assert_array_equal(labels_from_seg(seg_file, series), mask.array)
    sidecar = json.loads((out / "tsexample_series.json").read_text())
    assert sidecar["dicom_seg"]["path"] == str(seg_file)
    assert "small_extent" in sidecar["qc"]["flags"]  # 20 slices of 2 mm: 40 mm of body
    assert "QC: " in result.output and "small_extent" in result.output
    errors, _ = dciodvfy_errors(seg_file)
    assert errors == []


def test_infer_dicom_seg_refuses_a_nifti_input(tmp_path: Path) -> None:
    image = shared_file("liver/imagesTr/tsexample.nii.gz")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(image), "-o", str(out), "--dicom-seg"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "--dicom-seg needs a DICOM series" in lines[0] and str(image) in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
