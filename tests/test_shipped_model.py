"""The model shipped inside the package: present, small, documented, and actually segmenting livers.

A guard against broken weights or a preprocessing mismatch between the training recipe and
inference, on real CT (downsampled in-plane to keep the test quick).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_file
from typer.testing import CliRunner

from liverseg.bundle import CARD_FILE, WEIGHTS_FILE, default_bundle_path, load_bundle
from liverseg.cli import app
from liverseg.infer import predict_volume
from liverseg.io import Volume, read_ct, read_label, save_volume


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.fixture(scope="module")
def halved_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume]:
    """ircadb07 with every second voxel in-plane (1.56 x 1.56 x 1.6 mm), saved as NIfTI."""
    image = read_ct(shared_file("liver/imagesTr/ircadb07.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/ircadb07.nii.gz"))
    affine = image.affine.copy()
    affine[:3, :2] *= 2
    path = tmp_path_factory.mktemp("shipped") / "ircadb07_half.nii.gz"
    save_volume(Volume(np.ascontiguousarray(image.array[::2, ::2]), affine), path)
    return path, Volume(np.ascontiguousarray(label.array[::2, ::2]), affine)


def test_shipped_bundle_is_installed_small_and_documented() -> None:
    path = default_bundle_path()
    assert (path / WEIGHTS_FILE).is_file(), f"no shipped model at {path}"
    assert (path / WEIGHTS_FILE).stat().st_size <= 20 * 1024 * 1024
    card = json.loads((path / CARD_FILE).read_text())
    assert "non-commercial" in card["licence"]
    # held-out Dice per expert case and condition (clean and simulated shifts), beside the teacher
    per_case = card["cross_validation"]["per_case"]
    assert per_case and set(per_case) <= {"chaos01", "chaos03", "ircadb01", "ircadb07"}
    for conditions in per_case.values():
        assert 0.0 <= conditions["clean"]["model"]["liver_dice"] <= 1.0
    assert card["status"] == "meets the v2 bars" or card["bars_missed"]
    assert (path / "model_card.md").is_file()


def test_shipped_model_segments_real_liver(halved_case: tuple[Path, Volume]) -> None:
    path, reference = halved_case
    prediction = predict_volume(read_ct(path), load_bundle())
    assert prediction.labels.shape == reference.shape
    assert _dice(prediction.labels > 0, reference.array > 0) >= 0.85


def test_infer_uses_shipped_model_by_default(halved_case: tuple[Path, Volume], tmp_path: Path) -> None:
    path, reference = halved_case
    out = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(app, ["infer", str(path), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    written = nib.load(str(out))
    assert written.shape == reference.shape
    np.testing.assert_array_equal(written.affine, nib.load(str(path)).affine)
    assert _dice(np.asarray(written.dataobj) > 0, reference.array > 0) >= 0.85
