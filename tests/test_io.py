"""Reading CT (NIfTI, NRRD/MHA, DICOM series) and writing masks on the exact reference grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file

from liverseg.errors import LiversegError
from liverseg.io import Volume, read_ct, read_label, same_grid, save_volume, write_mask

TS_SERIES = "dicom/tsexample_series"


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _small_ct() -> Volume:
    """A real CT crop (tsexample, 3 mm) small enough for fast tests."""
    ct = read_ct(shared_file("liver/imagesTr/tsexample.nii.gz"))
    return Volume(ct.array[20:80, 20:70, 30:70].copy(), ct.affine.copy(), ct.source)


def test_dicom_series_equals_simpleitk_voxels_and_world() -> None:
    folder = shared_file(TS_SERIES)
    ours = read_ct(folder)
    ref = _sitk_series(folder)
    expected = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    assert ours.shape == expected.shape == (512, 512, 20)
    np.testing.assert_array_equal(ours.array, expected.astype(np.float32))
    # World coordinates: SimpleITK gives LPS; ours is RAS, so x and y change sign.
    rng = np.random.default_rng(0)
    corners = [(0, 0, 0), (511, 511, 19), (511, 0, 0), (0, 511, 19)]
    points = corners + [tuple(int(v) for v in rng.integers(0, [512, 512, 20])) for _ in range(20)]
    for index in points:
        lps = np.array(ref.TransformIndexToPhysicalPoint(index))
        ras = (ours.affine @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)


def test_dicom_liver_mask_lies_on_series_grid() -> None:
    series = read_ct(shared_file(TS_SERIES))
    mask = read_label(shared_file("dicom/tsexample_series_liver.nii.gz"))
    assert same_grid(series, mask, atol=1e-3)
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, 1}
    # The liver mask must sit on liver-like tissue in this grid (soft tissue HU), not on air/bone.
    liver_hu = np.median(series.array[mask.array > 0])
    assert 0 < liver_hu < 200


def test_dicom_orders_slices_by_position_not_file_name(tmp_path: Path) -> None:
    src = shared_file(TS_SERIES)
    files = sorted(src.iterdir())
    shuffled = tmp_path / "series"
    shuffled.mkdir()
    # Reverse the name order: a reader that sorted by file name would flip the volume.
    for i, f in enumerate(files):
        shutil.copy(f, shuffled / f"slice{len(files) - i:03d}.dcm")
    a, b = read_ct(src), read_ct(shuffled)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_dicom_picks_largest_series_or_named_uid(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in shared_file(TS_SERIES).iterdir():
        shutil.copy(f, mixed / f.name)
    for f in shared_file("dicom/ct3slice_series").iterdir():
        shutil.copy(f, mixed / f"small_{f.name}")
    assert read_ct(mixed).shape == (512, 512, 20)
    small_uid = sitk.ImageFileReader()
    small_uid.SetFileName(str(mixed / "small_01.dcm"))
    small_uid.ReadImageInformation()
    uid = small_uid.GetMetaData("0020|000e").strip()
    # The 3-slice series is too thin to segment a liver; read it as a slab to check the selection.
    assert read_ct(mixed, series_uid=uid, min_extent_mm=None).shape == (512, 512, 3)
    with pytest.raises(LiversegError, match="no DICOM series with SeriesInstanceUID"):
        read_ct(mixed, series_uid="1.2.3.4")


def test_dicom_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "notdicom"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"not a dicom file" * 40)
    with pytest.raises(LiversegError, match="no readable DICOM image series") as err:
        read_ct(folder)
    assert str(folder) in str(err.value)


def test_nrrd_label_on_dicom_grid() -> None:
    series = read_ct(shared_file("dicom/ct3slice_series"), min_extent_mm=None)  # a 3 mm slab
    label = read_label(shared_file("dicom/ct3slice_liver.nrrd"))
    assert same_grid(series, label, atol=1e-3)
    assert label.array.max() == 1 and label.array.sum() > 1000


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_match_nifti(tmp_path: Path, suffix: str) -> None:
    """NIfTI -> SimpleITK -> NRRD/MHA: same voxels and RAS geometry after reading back."""
    ct = _small_ct()
    nii = save_volume(ct, tmp_path / "ct.nii.gz")
    itk_path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(itk_path))
    a, b = read_ct(nii), read_ct(itk_path)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_nifti_scaling_gives_hu(tmp_path: Path) -> None:
    ct = _small_ct()
    stored = (ct.array + 1024).astype(np.int16)  # unsigned-style storage with intercept -1024
    image = nib.Nifti1Image(stored, ct.affine)
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(read_ct(tmp_path / "scaled.nii.gz").array, ct.array)


def test_write_mask_keeps_reference_header(tmp_path: Path) -> None:
    ct = _small_ct()
    image = nib.Nifti1Image(ct.array.astype(np.int16), None)
    oblique = ct.affine.copy()
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique[:3, :3] = rot @ oblique[:3, :3]
    image.set_qform(oblique, 1)  # scanner
    image.set_sform(oblique, 2)  # aligned: unusual codes must survive
    nib.save(image, tmp_path / "ref.nii.gz")
    ref = read_ct(tmp_path / "ref.nii.gz")
    mask = (ref.array > 0).astype(np.uint8)
    out = write_mask(mask, ref, tmp_path / "out" / "mask.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert back.shape == ref.shape
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "ref.nii.gz").affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert [p.name for p in out.parent.iterdir()] == ["mask.nii.gz"]  # no temporary left
    # Deflated by ISA-L: still a plain gzip stream of a NIfTI-1 file, which other readers take.
    import gzip

    import SimpleITK as sitk

    assert gzip.decompress(out.read_bytes())[:4] == (348).to_bytes(4, "little")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0), mask)


def test_write_mask_refuses_wrong_grid_without_output(tmp_path: Path) -> None:
    ref = _small_ct()
    with pytest.raises(ValueError, match="differs from reference grid"):
        write_mask(np.zeros((3, 3, 3), np.uint8), ref, tmp_path / "mask.nii.gz")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_truncated_nifti_is_one_line_error(tmp_path: Path) -> None:
    nii = save_volume(_small_ct(), tmp_path / "ct.nii.gz")
    data = nii.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LiversegError, match="corrupt or truncated") as err:
        read_ct(cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)


@pytest.mark.parametrize("shape, words", [((60, 50), "2D"), ((60, 50, 40, 2), "4D")])
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...], words: str) -> None:
    ct = _small_ct()
    array = ct.array[:, :, 0] if len(shape) == 2 else np.stack([ct.array, ct.array], axis=-1)
    assert array.shape == shape
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(array, ct.affine), path)
    with pytest.raises(LiversegError, match=words):
        read_ct(path)


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path: Path) -> None:
    import os

    from liverseg.io import atomic_path, write_text_atomic

    target = tmp_path / "out" / "report.json"
    write_text_atomic(target, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out" / "mask.nii.gz") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]
