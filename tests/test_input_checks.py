"""Hostile inputs real archives contain: each refused by the reader with one line (the file, what is
wrong, what to do), exit 2 and no output, or read with a warning in the sidecar when usable but
doubtful. The NIfTI headers are written byte for byte (nibabel would repair them on save), the
DICOM series are the real ones in ../shared/data/dicom with a slice deleted or moved."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import shared_file
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.io import read_ct, save_volume

runner = CliRunner()
TS_SERIES = "dicom/tsexample_series"  # 20 slices, 0.98 x 0.98 x 2 mm, JPEG 2000
SLAB_SERIES = "dicom/ct3slice_series"  # 3 uncompressed slices


def write_raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray, pixdim: dict[int, float] | None = None,
                    **fields: object) -> Path:
    """An uncompressed NIfTI-1 whose header holds exactly ``fields`` and ``pixdim`` entries (set
    after qform/sform from ``affine``), written without nibabel's save-time repairs."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_qform(affine, 1)
    header.set_sform(affine, 1)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    for index, value in (pixdim or {}).items():
        header["pixdim"][index] = value
    with path.open("wb") as handle:
        handle.write(header.binaryblock)
        handle.write(b"\0" * 4)  # no extensions
        handle.write(np.asarray(data).tobytes(order="F"))
    return path


def _ct(small_ct: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(small_ct)
    return np.asarray(image.dataobj).astype(np.int16), image.affine


def _infer(source: Path, model: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["infer", str(source), "-o", str(out), "--model", str(model), "-q", *extra])


def _assert_refused(result, source: Path, out: Path, words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(source) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# ---------------------------------------------------------------------------------------------
# NIfTI: voxels and header


def _hostile_nifti(kind: str, small_ct: Path, folder: Path) -> tuple[Path, str]:
    data, affine = _ct(small_ct)
    path = folder / f"{kind}.nii"
    if kind == "nan_block":
        ct = data.astype(np.float32)
        ct[30:40, 30:40, 20:30] = np.nan  # a converter's hole
        return write_raw_nifti(path, ct, affine), "1000 voxels (0.388%) are NaN or infinite"
    if kind == "inf_voxel":
        ct = data.astype(np.float32)
        ct[1, 2, 3] = np.inf
        return write_raw_nifti(path, ct, affine), "NaN or infinite"
    if kind == "zero_slice_spacing":  # qform only: pixdim is the voxel size in use
        return write_raw_nifti(path, data, affine, {3: 0.0}, sform_code=0), "z 0 mm"
    if kind == "negative_spacing":
        return write_raw_nifti(path, data, affine, {1: -3.0}, sform_code=0), "x -3 mm"
    if kind == "nan_spacing":
        return write_raw_nifti(path, data, affine, {2: np.nan}, sform_code=0), "y nan mm"
    if kind == "no_transform_zero_spacing":
        return write_raw_nifti(path, data, affine, {3: 0.0}, qform_code=0, sform_code=0), "z 0 mm"
    if kind == "singular_sform":
        return write_raw_nifti(path, data, affine, srow_z=np.array([0.0, 0.0, 0.0, 5.0])), "zero axis"
    if kind == "parallel_axes_sform":  # the third voxel axis along the first
        return (write_raw_nifti(path, data, affine, srow_x=np.array([3.0, 0.0, 3.0, 0.0]),
                                srow_y=np.array([0.0, 3.0, 0.0, 0.0]), srow_z=np.array([0.0, 0.0, 0.0, 0.0])),
                "singular affine")
    if kind == "nan_sform":
        srow = np.array(affine[0], dtype=np.float64)
        srow[3] = np.nan
        return write_raw_nifti(path, data, affine, srow_x=srow), "NaN or infinite values"
    if kind == "bad_qfac":
        return write_raw_nifti(path, data, affine, {0: 7.0}, sform_code=0), "qfac"
    if kind == "three_slices":
        return write_raw_nifti(path, data[:, :, :3].copy(), affine), "216x192x9 mm (72x64x3 voxels"
    if kind == "micrometre_voxels":
        scaled = affine.copy()
        scaled[:3, :3] *= 1000.0
        return write_raw_nifti(path, data, scaled), "larger than a human body"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_block", "inf_voxel", "zero_slice_spacing", "negative_spacing",
                                  "nan_spacing", "no_transform_zero_spacing", "singular_sform",
                                  "parallel_axes_sform", "nan_sform", "bad_qfac", "three_slices",
                                  "micrometre_voxels"])
def test_hostile_nifti_is_refused_before_any_output(kind: str, small_ct: Path, tiny_bundle: Path,
                                                    tmp_path: Path) -> None:
    source, words = _hostile_nifti(kind, small_ct, tmp_path)
    out = tmp_path / "out"
    _assert_refused(_infer(source, tiny_bundle, out), source, out, words)


def test_doubtful_header_is_read_with_warnings_in_sidecar_and_stderr(small_ct: Path, tiny_bundle: Path,
                                                                     tmp_path: Path) -> None:
    """The sform is intact, so the image is usable; but pixdim says 0 mm slices and the qform sits
    elsewhere: both noted (sidecar 'warnings', one stderr line each), mask on nibabel's grid."""
    data, affine = _ct(small_ct)
    qform_elsewhere = affine.copy()
    qform_elsewhere[:3, 3] += [0.0, 0.0, 12.0]
    header_q = nib.Nifti1Header()
    header_q.set_qform(qform_elsewhere, 1)
    quaternion = {k: header_q[k] for k in ("quatern_b", "quatern_c", "quatern_d",
                                           "qoffset_x", "qoffset_y", "qoffset_z")}
    source = write_raw_nifti(tmp_path / "doubtful.nii", data, affine, **quaternion)
    zero = write_raw_nifti(tmp_path / "zero_pixdim.nii", data, affine, {3: 0.0}, qform_code=0)
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(source), str(zero), str(small_ct), "-o", str(out),
                                 "--model", str(tiny_bundle), "-q"])
    assert result.exit_code == 0, result.output
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 2 and all(line.startswith("warning: ") for line in stderr), stderr
    disagree = json.loads((out / "doubtful.json").read_text())["warnings"]
    assert len(disagree) == 1 and "qform and sform disagree by up to 12 mm" in disagree[0]
    assert str(source) in stderr[0] and disagree[0] in stderr[0]
    pixdim = json.loads((out / "zero_pixdim.json").read_text())["warnings"]
    assert pixdim == ["pixdim holds an invalid voxel size (z 0 mm); used the sform's (3x3x3 mm)"]
    for path in (source, zero):
        mask, given = nib.load(out / f"{path.stem}.nii.gz"), nib.load(path)
        assert mask.shape == given.shape
        np.testing.assert_allclose(mask.affine, given.affine, atol=1e-5)
    # An ordinary image has an empty list (and no stderr line): the key is always there for QC.
    assert json.loads((out / "small.json").read_text())["warnings"] == []
    # QC folds the warnings in: a doubtful input is flagged for a person to look at.
    for name, flagged in (("doubtful", True), ("zero_pixdim", True), ("small", False)):
        qc = json.loads((out / f"{name}.json").read_text())["qc"]
        assert ("input_doubtful" in qc["flags"]) is flagged


# ---------------------------------------------------------------------------------------------
# DICOM series


def _series_copy(tmp_path: Path, name: str = TS_SERIES) -> tuple[Path, list[Path]]:
    """A copy of a real series and its files in slice-position order."""
    folder = tmp_path / "series"
    shutil.copytree(shared_file(name), folder)
    files = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                     .ImagePositionPatient[2]))
    return folder, files


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _multi_frame(source: Path, target: Path) -> Path:
    """The uncompressed 3-slice series as one multi-frame file (pixel data of all slices)."""
    slices = sorted((pydicom.dcmread(f) for f in source.iterdir()),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    ds = slices[0]
    ds.NumberOfFrames = len(slices)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def _hostile_dicom(kind: str, tmp_path: Path) -> tuple[Path, str]:
    if kind in ("multi_frame_folder", "multi_frame_file"):
        target = tmp_path / "mf" / "ct.dcm"
        _multi_frame(shared_file(SLAB_SERIES), target)
        return (target.parent if kind == "multi_frame_folder" else target), "multi-frame DICOM file (3 frames"
    if kind == "seg_file":
        return shared_file("dicom/ct3slice_liver_seg.dcm"), "a DICOM Segmentation, not a CT"
    folder, files = _series_copy(tmp_path)
    if kind == "missing_slice":
        files[7].unlink()
        return folder, "1 missing slice: slices 7 and 8 of 19"
    if kind == "two_missing_slices":
        files[7].unlink()
        files[8].unlink()
        return folder, "2 missing slices"
    if kind == "uneven_spacing":  # one slice 0.8 mm off its place (spacing 2 mm)
        ds = pydicom.dcmread(files[12], stop_before_pixels=True)
        position = [float(v) for v in ds.ImagePositionPatient]
        _edit(files[12], ImagePositionPatient=[position[0], position[1], position[2] + 0.8])
        return folder, "uneven slice spacing"
    if kind == "duplicate_position":  # two acquisitions under one UID: a slice twice
        ds = pydicom.dcmread(files[5], stop_before_pixels=True)
        _edit(files[6], ImagePositionPatient=[float(v) for v in ds.ImagePositionPatient])
        return folder, "2 slices at the same position"
    if kind == "mixed_orientations":  # coronal slices under the axial series' UID
        for f in files[:4]:
            _edit(f, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
        return folder, "mixes 2 slice orientations"
    if kind == "gantry_tilt":  # each slice shifted 0.7 mm in y: a 19 degree tilt
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            _edit(f, ImagePositionPatient=[x, y + 0.7 * i, z])
        return folder, "sheared"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_slice", "two_missing_slices", "uneven_spacing",
                                  "duplicate_position", "mixed_orientations", "gantry_tilt",
                                  "multi_frame_folder", "multi_frame_file", "seg_file"])
def test_dicom_without_a_regular_grid_is_refused(kind: str, tiny_bundle: Path, tmp_path: Path) -> None:
    """SimpleITK reads each of these with a wrong geometry (a deleted slice: 2.11 mm spacing for
    the 2 mm series; a multi-frame file: 1 mm); liverseg refuses them and says why."""
    source, words = _hostile_dicom(kind, tmp_path)
    out = tmp_path / "out"
    _assert_refused(_infer(source, tiny_bundle, out), source, out, words)


def test_dicom_series_with_a_small_second_series_reads_the_largest_with_a_warning(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(shared_file(TS_SERIES), folder)
    for f in shared_file(SLAB_SERIES).iterdir():
        shutil.copy(f, folder / f"slab_{f.name}")
    volume, alone = read_ct(folder), read_ct(shared_file(TS_SERIES))
    np.testing.assert_array_equal(volume.array, alone.array)
    np.testing.assert_array_equal(volume.affine, alone.affine)
    assert volume.warnings == ["folder holds 2 DICOM series; used the largest (20 slices), ignored the "
                               "others (3 slices); give each series its own folder"]
    assert alone.warnings == []


# ---------------------------------------------------------------------------------------------
# score: grids that cannot be compared


def test_score_refuses_damaged_or_disjoint_prediction_grids(tmp_path: Path) -> None:
    """With --resample-to-ref a prediction is moved onto the reference grid by its header: a header
    with 0 mm slices (nibabel would take 1 mm) or a grid elsewhere in space (Dice 0 for nothing)
    must be refused, per case, naming the file; the good case is still scored."""
    ref_path = shared_file("dicom/tsexample_series_liver.nii.gz")
    ref = nib.load(ref_path)
    labels = np.asarray(ref.dataobj).astype(np.uint8)
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir()
    for case in ("good", "zero_spacing", "elsewhere"):
        shutil.copy(ref_path, refs / f"{case}.nii.gz")
    save_volume_like(labels, ref.affine, preds / "good.nii.gz")
    damaged = write_raw_nifti(preds / "zero_spacing.nii", labels, ref.affine, {3: 0.0}, sform_code=0)
    moved = ref.affine.copy()
    moved[:3, 3] += [0.0, 0.0, 500.0]  # the same labels half a metre away
    save_volume_like(labels, moved, preds / "elsewhere.nii.gz")
    result = runner.invoke(app, ["score", str(preds), str(refs), "--resample-to-ref", "--json"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert str(damaged) in errors[1] and "z 0 mm" in errors[1]
    assert "elsewhere" in errors[0] and "do not overlap in space" in errors[0]
    aggregate = json.loads(result.stdout)
    assert aggregate["n_scored"] == 1 and aggregate["classes"]["liver"]["dice"]["mean"] == 1.0


def save_volume_like(labels: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    from liverseg.io import Volume

    return save_volume(Volume(labels, affine), path)


# ---------------------------------------------------------------------------------------------
# The one rule, on random headers: a mask on the input's exact grid, or one line and exit 2

_EXAMPLES = int(os.environ.get("LIVERSEG_HYPOTHESIS_EXAMPLES", "25"))  # more: a longer search
_DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]
# (scl_slope, scl_inter): NIfTI reads slope 0 or NaN as "no scaling".
_SCALINGS = [(1.0, 0.0), (1.0, -1024.0), (0.5, -1024.0), (10.0, -1024.0), (0.0, 0.0), (np.nan, np.nan),
             (2.0, 100.0)]
_DAMAGED = st.sampled_from([0.0, -2.5, np.nan, np.inf, 1e-5])


@st.composite
def nifti_inputs(draw: st.DrawFn) -> dict:
    """A plausible NIfTI: shapes down to 1 voxel (with trailing dimensions of 1 or 2), integer and
    float storage with slope/intercept, any of the 48 axis orientations (sometimes tilted), qform
    and sform codes in use or not, disagreeing now and then; a voxel size sometimes damaged."""
    # sampled_from draws evenly (integers and floats favour their bounds): one axis in ~8 has a
    # single voxel, one extent in ~18 is a slab thinner than a liver (< 30 mm).
    shape = tuple(draw(st.sampled_from([1, *range(2, 13), *range(2, 13)])) for _ in range(3))
    shape += draw(st.sampled_from([(), (), (), (), (), (1,), (1,), (2,)]))
    spacing = [draw(st.sampled_from(range(20, 201, 10))) / n for n in shape[:3]]
    rotation = np.eye(3)[list(draw(st.permutations([0, 1, 2])))] * draw(
        st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    tilt = np.radians(draw(st.sampled_from([0.0, 0.0, 20.0])))
    about_z = np.array([[np.cos(tilt), -np.sin(tilt), 0], [np.sin(tilt), np.cos(tilt), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = about_z @ rotation @ np.diag(spacing)
    affine[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
    return {
        "shape": shape, "affine": affine, "dtype": draw(st.sampled_from(_DTYPES)),
        "scaling": draw(st.sampled_from(_SCALINGS)), "qform_code": draw(st.sampled_from([0, 1, 1, 2])),
        "sform_code": draw(st.sampled_from([0, 1, 2, 4])),
        "qform_shift": draw(st.sampled_from([0.0, 0.0, 0.0, 7.5])),  # qform elsewhere (mm)
        "pixdim": {axis: draw(_DAMAGED) for axis in (1, 2, 3) if draw(st.integers(0, 14)) == 0},
        "singular_sform": draw(st.integers(0, 14)) == 0, "seed": draw(st.integers(0, 2**16)),
    }


def _write_case(case: dict, path: Path) -> Path:
    """HU-like voxels (air to bone) stored through the case's dtype and scaling, header raw."""
    rng = np.random.default_rng(case["seed"])
    hu = rng.uniform(-1024.0, 1500.0, size=case["shape"])
    slope, inter = case["scaling"]
    if not np.isfinite(slope) or slope == 0:
        slope, inter = 1.0, 0.0
    dtype = np.dtype(case["dtype"])
    raw = (hu - inter) / slope
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        raw = np.clip(np.rint(raw), info.min, info.max)
    sform = case["affine"].copy()
    if case["singular_sform"]:
        sform[:3, 2] = sform[:3, 0]
    header = nib.Nifti1Header()
    header.set_qform(case["affine"] + _shift(case["qform_shift"]), 1)
    fields = {k: header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                                      "qoffset_z")}
    pixdim = {0: float(header["pixdim"][0]), **case["pixdim"]}
    return write_raw_nifti(path, raw.astype(dtype), sform, pixdim, **fields,
                           qform_code=case["qform_code"], sform_code=case["sform_code"],
                           scl_slope=case["scaling"][0], scl_inter=case["scaling"][1])


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[2, 3] = mm
    return shift


@settings(max_examples=_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=nifti_inputs())
def test_any_nifti_gives_a_mask_on_its_grid_or_one_line_and_exit_2(case: dict, tiny_bundle: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = _write_case(case, Path(tmp) / "ct.nii")
        out = Path(tmp) / "out"
        result = runner.invoke(app, ["infer", str(source), "-o", str(out), "--model", str(tiny_bundle), "-q"])
        assert result.exit_code in (0, 2), f"{result.exit_code}: {result.output}{result.exception!r}"
        lines = result.stderr.strip().splitlines()
        event(f"exit {result.exit_code}")  # the mix of outcomes: pytest --hypothesis-show-statistics
        if result.exit_code == 2:
            assert len(lines) == 1 and lines[0].startswith(f"error: {source}: "), result.stderr
            assert not out.exists() or not any(out.iterdir())
            return
        assert all(line.startswith(f"warning: {source}: ") for line in lines), result.stderr
        given_image, mask = nib.load(source), nib.load(out / "ct.nii.gz")
        assert mask.shape == given_image.shape[:3]
        np.testing.assert_allclose(mask.affine, given_image.affine, rtol=1e-6, atol=1e-4)
        assert mask.get_data_dtype() == np.uint8
