"""Per-case QC: each flag fires where its condition holds and stays quiet where it does not, on
real CT with expert livers and on phantoms built to hold one fault each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_file
from scipy import ndimage

from liverseg import qc
from liverseg.infer import volume_stats
from liverseg.io import Volume, read_ct, read_label


def assess_labels(volume: Volume, labels: np.ndarray, contrast: bool | None = None) -> dict:
    """QC of a given mask (no model measures: those are tested on their own below)."""
    return qc.assess(volume, labels, {}, volume_stats(volume, labels), contrast=contrast)


@pytest.fixture(scope="module")
def ircadb01() -> tuple[Volume, np.ndarray]:
    """A complete liver (expert label) in a scan that shows the lung bases above it."""
    return (read_ct(shared_file("liver/imagesTr/ircadb01.nii.gz")),
            read_label(shared_file("liver/labelsTr/ircadb01.nii.gz")).array)


def test_a_complete_expert_liver_raises_no_flag(ircadb01: tuple[Volume, np.ndarray]) -> None:
    volume, labels = ircadb01
    report = assess_labels(volume, labels)
    assert report["flags"] == []
    measures = report["measures"]
    assert 600 < measures["liver_volume_ml"] < 4000
    assert measures["liver_on_border_cm2"] == {"superior": 0.0, "inferior": 0.0, "in_plane": 0.0}
    # The scan starts 6 mm above the dome: too little lung over it to place the diaphragm.
    assert measures["liver_above_diaphragm_ml"] is None


def test_a_field_of_view_cut_through_the_liver_is_flagged(ircadb01: tuple[Volume, np.ndarray]) -> None:
    volume, labels = ircadb01  # LPS: k runs towards the head
    top = int(np.flatnonzero(labels.any(axis=(0, 1)))[-1])
    cut = top - 40  # 64 mm below the dome
    cropped = Volume(volume.array[:, :, :cut], volume.affine)
    report = assess_labels(cropped, labels[:, :, :cut])
    assert "liver_cut_by_field_of_view" in report["flags"]
    assert report["measures"]["liver_on_border_cm2"]["superior"] > 50
    assert report["measures"]["liver_above_diaphragm_ml"] is None  # the dome is out of view


def test_a_scan_ending_before_the_liver_tip_is_flagged() -> None:
    """chaos03 'ends before the tip of the right lobe' (shared data README): its expert label
    touches the inferior end."""
    volume = read_ct(shared_file("liver/imagesTr/chaos03.nii.gz"))
    labels = read_label(shared_file("liver/labelsTr/chaos03.nii.gz")).array
    report = assess_labels(volume, labels)
    assert "liver_cut_by_field_of_view" in report["flags"]
    edges = report["measures"]["liver_on_border_cm2"]
    assert edges["inferior"] >= qc.EDGE_AREA_CM2 and edges["superior"] == 0.0


def chest_phantom() -> tuple[Volume, np.ndarray, np.ndarray]:
    """A trunk at 4 mm (RAS): air outside, soft tissue inside, two lungs above a domed diaphragm,
    a heart between them resting on it, and a liver under the right dome. Returns the CT, the
    liver label and the heart mask."""
    shape = (80, 70, 90)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    body = ((i - 40) / 36) ** 2 + ((j - 35) / 28) ** 2 <= 1.0
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    dome = 50.0 - 0.012 * (i - 40) ** 2 - 0.01 * (j - 35) ** 2  # diaphragm height per column
    chest = body & (k > dome) & (((i - 40) / 33) ** 2 + ((j - 35) / 25) ** 2 <= 1.0)
    heart = (((i - 44) / 9) ** 2 + ((j - 42) / 9) ** 2 + ((k - dome - 11) / 10) ** 2) <= 1.0
    mediastinum = np.abs(i - 42) < 8
    hu[chest & ~heart & ~mediastinum] = -850.0
    liver = body & (i < 36) & (k <= dome - 1) & (k > dome - 40)
    hu[liver] = 60.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    return Volume(hu, affine), liver.astype(np.uint8), heart & chest


def test_a_liver_grown_into_the_heart_is_flagged() -> None:
    volume, liver, heart = chest_phantom()
    clean = assess_labels(volume, liver)
    assert clean["measures"]["liver_above_diaphragm_ml"] == 0.0
    assert "liver_above_diaphragm" not in clean["flags"]
    leaked = liver.copy()
    leaked[heart] = 1
    report = assess_labels(volume, leaked)
    assert "liver_above_diaphragm" in report["flags"]
    heart_ml = heart.sum() * 0.064
    assert heart_ml * 0.4 < report["measures"]["liver_above_diaphragm_ml"] <= heart_ml


def probabilities(foreground: np.ndarray, blur: float) -> torch.Tensor:
    """(3, ...) softmax-like probabilities: liver where ``foreground``, edges smoothed by
    ``blur`` voxels (0: certain everywhere)."""
    p_fg = ndimage.gaussian_filter(foreground.astype(np.float32), blur) if blur else foreground.astype(
        np.float32)
    return torch.from_numpy(np.stack([1.0 - p_fg, p_fg, np.zeros_like(p_fg)]))


def ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2


def test_model_space_measures_count_organs_and_doubt() -> None:
    shape = (60, 60, 60)
    liver = ball(shape, (25, 30, 30), 17.0)  # 4 mm voxels: about 1.3 L
    sharp = qc.model_space_measures(probabilities(liver, 0.0), (4.0, 4.0, 4.0))
    assert sharp["components_before_postprocessing"] == 1 and sharp["second_component_ml"] == 0.0
    assert sharp["undecided_volume_ratio"] == 0.0
    # A second organ-sized region (a spleen of about 230 mL) taken for liver.
    two = liver | ball(shape, (52, 30, 30), 6.0)
    measures = qc.model_space_measures(probabilities(two, 0.0), (4.0, 4.0, 4.0))
    assert measures["components_before_postprocessing"] == 2
    assert measures["second_component_ml"] >= qc.SECOND_COMPONENT_ML
    # A model unsure of the edge over several voxels all round.
    blurred = qc.model_space_measures(probabilities(liver, 4.0), (4.0, 4.0, 4.0))
    partial = qc.model_space_measures(probabilities(liver, 0.7), (4.0, 4.0, 4.0))
    assert partial["undecided_volume_ratio"] < qc.LOW_CONFIDENCE_RATIO < blurred["undecided_volume_ratio"]
    assert blurred["mean_foreground_entropy"] > partial["mean_foreground_entropy"]

    volume = Volume(np.zeros(shape, dtype=np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    labels = liver.astype(np.uint8)
    flags = qc.assess(volume, labels, measures | {"undecided_volume_ratio": 0.6},
                      volume_stats(volume, labels))["flags"]
    assert {"several_large_components", "low_confidence"} <= set(flags)


def test_input_and_intensity_flags() -> None:
    shape = (64, 64, 40)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:50, 10:50, 5:35] = 1
    thick = Volume(np.full(shape, 110.0, dtype=np.float32), np.diag([0.8, 0.8, 8.0, 1.0]))
    report = assess_labels(thick, labels)
    assert "thick_slices" in report["flags"] and "small_extent" not in report["flags"]
    assert "input_doubtful" not in report["flags"] and report["measures"]["input_warnings"] == 0
    thick.warnings = ["qform and sform disagree by up to 3 mm; used the sform"]
    report = assess_labels(thick, labels)
    assert "input_doubtful" in report["flags"] and report["measures"]["input_warnings"] == 1
    short = Volume(np.full(shape, 110.0, dtype=np.float32), np.diag([0.8, 0.8, 2.0, 1.0]))
    report = assess_labels(short, labels)
    assert "small_extent" in report["flags"] and report["measures"]["craniocaudal_extent_mm"] == 80.0
    # 30 HU: a possible unenhanced (fatty) liver, not an enhanced one.
    pale = Volume(np.full(shape, 30.0, dtype=np.float32), np.diag([1.0, 1.0, 5.0, 1.0]))
    assert "liver_hu_unusual" not in assess_labels(pale, labels)["flags"]
    assert "liver_hu_unusual" in assess_labels(pale, labels, contrast=True)["flags"]
    blood = Volume(np.full(shape, 320.0, dtype=np.float32), np.diag([1.0, 1.0, 5.0, 1.0]))
    assert "liver_hu_unusual" in assess_labels(blood, labels)["flags"]
    # 64 x 64 x 30 mm of liver is far too small for an adult (and touches no border).
    assert "liver_volume_implausible" in assess_labels(blood, labels)["flags"]


def test_dice_by_flag_splits_cases_by_flag() -> None:
    table = {row["flag"]: row for row in qc.dice_by_flag(
        [(0.95, []), (0.90, ["thick_slices"]), (0.40, ["low_confidence", "thick_slices"])])}
    assert table["any flag"]["n_flagged"] == 2 and table["any flag"]["dice_clear"] == 0.95
    assert table["thick_slices"]["dice_flagged"] == pytest.approx(0.65)
    assert table["low_confidence"]["min_dice_flagged"] == 0.40
    assert table["low_confidence"]["n_clear"] == 2 and table["liver_above_diaphragm"]["n_flagged"] == 0
