"""Native grid <-> model space: labels come back on the identical grid, in the right place."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import shared_file

from liverseg.config import IntensityConfig, PreprocessConfig
from liverseg.io import Volume, read_ct, read_label, save_volume, write_mask
from liverseg.modelspace import (
    argmax_channels,
    decide_labels,
    intensity_to_hu,
    label_to_model_probabilities,
    label_to_model_space,
    labels_to_native,
    normalise_intensity,
    to_model_space,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def liver_crop() -> tuple[Volume, Volume]:
    """IRCADb patient 1 around the liver (about 20 mm margin), in-plane every 2nd voxel (1.14 mm).

    Real CT and its expert label, small enough that each round trip takes about a second.
    """
    ct = read_ct(shared_file("liver/imagesTr/ircadb01.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/ircadb01.nii.gz"))
    idx = np.argwhere(label.array > 0)
    margin = np.array([35, 35, 12])  # voxels: 20 mm in-plane, 19 mm along z
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin, ct.shape)
    step = np.array([2, 2, 1])
    sl = tuple(slice(int(a), int(b), int(s)) for a, b, s in zip(lo, hi, step, strict=True))
    index = np.eye(4)
    index[:3, :3] = np.diag(step)
    index[:3, 3] = lo
    affine = ct.affine @ index
    return (Volume(ct.array[sl].copy(), affine, "ircadb01-crop"),
            Volume(label.array[sl].copy(), affine, "ircadb01-crop-label"))


def _rot_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


def _variant(ct: Volume, label: Volume, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same real CT re-gridded: (image array, label array, affine)."""
    if kind == "lps":  # IRCADb is stored LPS (identity DICOM direction)
        assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
        return ct.array, label.array, ct.affine
    if kind == "ras":
        image = nib.as_closest_canonical(nib.Nifti1Image(ct.array, ct.affine))
        lab = nib.as_closest_canonical(nib.Nifti1Image(label.array, label.affine))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        return np.asarray(image.dataobj), np.asarray(lab.dataobj), image.affine
    if kind == "oblique":  # the patient rotated 20 degrees about z in world space
        return ct.array, label.array, _rot_z(20) @ ct.affine
    if kind == "anisotropic":  # every 4th slice: 1.14 x 1.14 x 6.4 mm
        affine = ct.affine @ np.diag([1, 1, 4, 1])
        return ct.array[:, :, ::4], label.array[:, :, ::4], affine
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "anisotropic"])
def test_round_trip_identical_grid_and_liver_dice(liver_crop: tuple[Volume, Volume], kind: str,
                                                  tmp_path: Path) -> None:
    image, label, affine = _variant(*liver_crop, kind)
    ct_path = save_volume(Volume(image.astype(np.int16), affine), tmp_path / f"{kind}.nii.gz")
    lab_path = save_volume(Volume(label.astype(np.uint8), affine), tmp_path / f"{kind}_label.nii.gz")
    ct, lab = read_ct(ct_path), read_label(lab_path)

    cfg = PreprocessConfig(target_spacing=(3.0, 3.0, 3.0))
    model_image, record = to_model_space(ct, cfg)
    assert tuple(model_image.shape[1:]) == record.model_shape
    np.testing.assert_allclose(record.model_spacing, 3.0, rtol=0.06)
    probs = label_to_model_probabilities(lab.array, record, num_classes=3)
    native = labels_to_native(probs, record)
    out = write_mask(native, ct, tmp_path / f"{kind}_back.nii.gz")

    back = nib.load(out)
    original = nib.load(ct_path)
    assert back.shape == original.shape
    np.testing.assert_array_equal(back.affine, original.affine)
    back_labels = np.asarray(back.dataobj)
    assert dice(back_labels > 0, lab.array > 0) >= 0.98
    # Tumour (label 2) survives too, if less exactly: it is small and lies in thin 3 mm voxels.
    assert dice(back_labels == 2, lab.array == 2) >= 0.75


@pytest.mark.parametrize("kind", ["lps", "oblique", "anisotropic"])
def test_model_space_is_in_the_right_place(liver_crop: tuple[Volume, Volume], kind: str) -> None:
    """The model-space liver sits where the native liver is, in world millimetres.

    A round trip alone cannot catch a transform that is wrong in the same way both ways.
    """
    image, label, affine = _variant(*liver_crop, kind)
    ct = Volume(image.astype(np.float32), affine)
    model_image, record = to_model_space(ct, PreprocessConfig())
    model_label = label_to_model_space(label, record, 3)
    assert nib.aff2axcodes(np.asarray(record.model_affine)) == ("R", "A", "S") or kind == "oblique"

    def centroid(mask: np.ndarray, aff: np.ndarray) -> np.ndarray:
        ijk = np.argwhere(mask).mean(0)
        return (np.asarray(aff) @ np.array([*ijk, 1.0]))[:3]

    native_c = centroid(label > 0, affine)
    model_c = centroid(model_label > 0, record.model_affine)
    assert np.linalg.norm(native_c - model_c) < 1.0  # mm, with 3 mm voxels
    # Liver volume (mL) is preserved by one-hot resampling.
    native_ml = (label > 0).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
    model_ml = (model_label > 0).sum() * np.prod(record.model_spacing) / 1000
    assert abs(model_ml - native_ml) / native_ml < 0.02
    # The CT values in model space are the same anatomy: liver is soft tissue in the window.
    liver_values = model_image[0].numpy()[model_label == 1]
    assert 0.3 < np.median(liver_values) < 0.8


def test_body_crop_removes_air_but_keeps_body() -> None:
    ct = read_ct(shared_file("liver/imagesTr/tsexample.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))
    padded = np.full(tuple(n + 40 for n in ct.shape), -1000.0, dtype=np.float32)
    padded[20:-20, 20:-20, 20:-20] = ct.array
    lab = np.zeros(padded.shape, np.uint8)
    lab[20:-20, 20:-20, 20:-20] = label.array
    shift = np.eye(4)
    shift[:3, 3] = -20
    volume = Volume(padded, ct.affine @ shift)
    cropped, record = to_model_space(volume, PreprocessConfig())
    full, _ = to_model_space(volume, PreprocessConfig(crop_body=False))
    assert np.prod(cropped.shape) < 0.75 * np.prod(full.shape)
    model_label = label_to_model_space(lab, record, 3)
    assert (model_label > 0).sum() == pytest.approx((lab > 0).sum(), rel=0.01)  # same 3 mm spacing


def test_window_and_zscore_normalisation() -> None:
    hu = torch.tensor([-1000.0, -175.0, 37.5, 250.0, 3000.0])
    window = normalise_intensity(hu, IntensityConfig(mode="window", lower=-175, upper=250))
    np.testing.assert_allclose(window.numpy(), [0, 0, 0.5, 1, 1], atol=1e-6)
    z = normalise_intensity(hu, IntensityConfig(mode="zscore", lower=-5, upper=171, mean=83, std=41))
    np.testing.assert_allclose(z.numpy(), (np.clip(hu.numpy(), -5, 171) - 83) / 41, atol=1e-6)
    with pytest.raises(ValueError, match="mean and std"):
        normalise_intensity(hu, IntensityConfig(mode="zscore"))


def test_window_range_and_its_inverse() -> None:
    hu = torch.tensor([-1000.0, -200.0, 0.0, 100.0, 200.0, 900.0])
    # Tang et al. 2020: clip(HU / 1000, -0.2, 0.2) * 2.5
    tang = IntensityConfig(mode="window", lower=-200, upper=200, window_range=(-0.5, 0.5))
    x = normalise_intensity(hu, tang)
    np.testing.assert_allclose(x.numpy(), np.clip(hu.numpy() / 1000, -0.2, 0.2) * 2.5, atol=1e-6)
    np.testing.assert_allclose(intensity_to_hu(x, tang).numpy(), np.clip(hu.numpy(), -200, 200), atol=1e-4)
    z = IntensityConfig(mode="zscore", lower=-5, upper=171, mean=83, std=41)
    np.testing.assert_allclose(intensity_to_hu(normalise_intensity(hu, z), z).numpy(),
                               np.clip(hu.numpy(), -5, 171), atol=1e-4)
    with pytest.raises(ValueError, match="must increase"):
        IntensityConfig(window_range=(1.0, 0.0))


def test_argmax_channels_matches_torch() -> None:
    probs = torch.rand(3, 20, 21, 22)
    probs[:, 0, 0, 0] = 0.5  # a tie goes to the lower class, like torch.argmax
    np.testing.assert_array_equal(argmax_channels(probs).numpy(), probs.argmax(0).numpy())


def test_nested_decision_keeps_split_foreground() -> None:
    # Voxels: background wins outright; foreground split between liver and tumour (argmax says
    # background, the nested rule liver); tumour most likely; a tie at exactly one half.
    probs = torch.tensor([[0.6, 0.4, 0.3, 0.5],
                          [0.2, 0.35, 0.3, 0.3],
                          [0.2, 0.25, 0.4, 0.2]])
    assert argmax_channels(probs).tolist() == [0, 0, 2, 0]
    assert decide_labels(probs, nested=True).tolist() == [0, 1, 2, 0]
    assert decide_labels(probs, nested=False).tolist() == [0, 0, 2, 0]
    # Two classes: both rules are the argmax.
    assert decide_labels(probs[:2], nested=True).tolist() == argmax_channels(probs[:2]).tolist()


def _smooth_probabilities(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(3, *shape) softmax of smooth random fields: blobs of foreground (tumour inside some) in
    one corner of the grid, background elsewhere, so that the foreground box is off-centre."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((1, 3, *(max(2, s // 4) for s in shape)), generator=generator) * 4.0
    logits = torch.nn.functional.interpolate(logits, size=shape, mode="trilinear", align_corners=False)[0]
    logits -= torch.tensor([2.0, 0.0, 1.0]).view(3, 1, 1, 1)
    corner = tuple(slice(s // 5, s // 5 + s // 2) for s in shape)
    outside = torch.ones(shape, dtype=torch.bool)
    outside[corner] = False
    logits[0][outside] += 20.0
    return torch.softmax(logits, dim=0)


@pytest.mark.parametrize("nested", [False, True])
def test_native_labels_in_slabs_equal_the_whole_grid_resize(nested: bool) -> None:
    """Labels decided slab by slab inside the foreground box are those of resizing the whole grid
    at once; outside the box everything is background. LPS input (axes flipped), one axis finer
    than the model grid (upsampled) and one coarser (area-averaged), body crop inside the grid."""
    from liverseg.modelspace import SpatialRecord, to_native
    from liverseg.resample import resize

    native_shape = (90, 70, 13)  # x, y finer than the model grid; z (6 mm) coarser than 4 mm
    affine = np.diag([-1.0, -1.2, 6.0, 1.0])
    volume = Volume(np.zeros(native_shape, np.float32), affine)
    record = SpatialRecord(
        native_shape=list(native_shape), native_affine=affine.tolist(),
        to_canonical=[[0, -1], [1, -1], [2, 1]], canonical_shape=list(native_shape),
        resampled_shape=[23, 21, 20], crop_box=[[2, 21], [0, 21], [3, 18]], model_affine=np.eye(4).tolist())
    assert volume.axcodes == "LPS"
    probs = _smooth_probabilities(tuple(b - a for a, b in record.crop_box))
    full = torch.zeros((3, *record.resampled_shape))
    full[0] = 1.0
    full[:, 2:21, 0:21, 3:18] = probs
    expected = decide_labels(resize(full, native_shape), nested).numpy()[::-1, ::-1]  # RAS -> LPS
    result = to_native(probs, record, nested, slab_voxels=4000)  # many slabs
    assert 0.01 < (expected > 0).mean() < 0.3
    assert (result.labels != expected).mean() < 1e-4  # only float ties may differ
    outside = np.ones(native_shape, bool)
    outside[result.box] = False
    assert not result.labels[outside].any() and not expected[outside].any()
    assert result.labels[result.box].size < 0.5 * result.labels.size
    kept = to_native(probs, record, nested, keep_probabilities=True)
    np.testing.assert_allclose(kept.probabilities.numpy(), resize(full, native_shape).numpy()[:, ::-1, ::-1],
                               atol=1e-5)
    np.testing.assert_array_equal(kept.labels, decide_labels(kept.probabilities, nested).numpy())


def test_oblique_native_labels_sample_the_model_grid_once() -> None:
    """An oblique record's labels are the model-grid probabilities sampled at the native voxels'
    world positions (one trilinear resampling), slab by slab inside the foreground box."""
    from liverseg.modelspace import SpatialRecord, to_native
    from liverseg.resample import world_resample

    model_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    model_affine[:3, 3] = [-40.0, -30.0, -20.0]
    native_affine = _rot_z(20) @ np.diag([1.5, 1.5, 2.0, 1.0])
    native_affine[:3, 3] = [-50.0, -60.0, -25.0]
    native_shape = (80, 75, 28)
    probs = _smooth_probabilities((20, 18, 12), seed=1)
    record = SpatialRecord(
        native_shape=list(native_shape), native_affine=native_affine.tolist(),
        to_canonical=[[0, 1], [1, 1], [2, 1]], canonical_shape=[20, 18, 12],
        resampled_shape=[20, 18, 12], crop_box=[[0, 20], [0, 18], [0, 12]],
        model_affine=model_affine.tolist(), oblique=True)
    whole = world_resample(probs, model_affine, native_affine, native_shape, fill=[1.0, 0.0, 0.0])
    expected = decide_labels(whole, nested=True).numpy()
    result = to_native(probs, record, nested=True, slab_voxels=5000)
    assert 0.01 < (expected > 0).mean() < 0.3
    assert (result.labels != expected).mean() < 1e-4
    outside = np.ones(native_shape, bool)
    outside[result.box] = False
    assert not expected[outside].any()
