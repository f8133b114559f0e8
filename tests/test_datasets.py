"""Recognising the dataset layouts users already have."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import liver_case_ids

from liverseg.datasets import find_dataset
from liverseg.errors import LiversegError


def _nifti(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.int16), np.eye(4)), path)
    return path


def test_msd_real_dataset(liver_dataset: Path) -> None:
    ds = find_dataset(liver_dataset)
    assert ds.layout == "msd"
    assert sorted(c.case_id for c in ds.cases) == liver_case_ids()
    assert all(c.label is not None and c.label.is_file() for c in ds.cases)
    assert all(c.image.parent.name == "imagesTr" for c in ds.cases)
    assert ds.labels == {0: "background", 1: "liver", 2: "tumour"}


def test_nnunet_v2_names_and_labels(tmp_path: Path) -> None:
    for case in ("liver_001", "liver_002"):
        _nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        _nifti(tmp_path / "imagesTr" / f"{case}_0001.nii.gz")  # a second channel: not CT, ignored
    _nifti(tmp_path / "labelsTr" / "liver_001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 2,
         "file_ending": ".nii.gz"}))
    ds = find_dataset(tmp_path)
    assert ds.layout == "nnunet"
    assert [c.case_id for c in ds.cases] == ["liver_001", "liver_002"]
    assert ds.cases[0].label == tmp_path / "labelsTr" / "liver_001.nii.gz"
    assert ds.cases[1].label is None
    assert ds.labels == {0: "background", 1: "liver"}


def test_lits_names(tmp_path: Path) -> None:
    for n in (0, 12):
        _nifti(tmp_path / "batch1" / f"volume-{n}.nii")
    _nifti(tmp_path / "batch1" / "segmentation-12.nii")
    ds = find_dataset(tmp_path)
    assert ds.layout == "lits"
    by_id = {c.case_id: c for c in ds.cases}
    assert set(by_id) == {"volume-0", "volume-12"}
    assert by_id["volume-12"].label == tmp_path / "batch1" / "segmentation-12.nii"
    assert by_id["volume-0"].label is None


def test_csv_pairs_relative_to_csv(tmp_path: Path) -> None:
    _nifti(tmp_path / "data" / "a.nii.gz")
    _nifti(tmp_path / "data" / "a_seg.nii.gz")
    _nifti(tmp_path / "data" / "b.nii.gz")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,label\ndata/a.nii.gz,data/a_seg.nii.gz\n# comment\ndata/b.nii.gz,\n")
    ds = find_dataset(csv)
    assert ds.layout == "csv"
    assert [(c.case_id, c.label.name if c.label else None) for c in ds.cases] == [
        ("a", "a_seg.nii.gz"), ("b", None)]


def test_empty_folder_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(LiversegError, match="no cases found") as err:
        find_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_dicom_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "IM0001").write_bytes(b"\x00" * 300)
    with pytest.raises(LiversegError, match="no readable DICOM image series"):
        find_dataset(tmp_path)


def test_duplicate_case_names_refused(tmp_path: Path) -> None:
    _nifti(tmp_path / "x" / "ct.nii.gz")
    _nifti(tmp_path / "y" / "ct.nii.gz")
    csv = tmp_path / "pairs.csv"
    csv.write_text("x/ct.nii.gz\ny/ct.nii.gz\n")
    with pytest.raises(LiversegError, match="not unique"):
        find_dataset(csv)
