"""Synthetic tumours: painted inside the liver (or bulging from its surface into soft tissue only),
darker than it, labelled tumour, reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import REPO, TRAINED_CASE
from scipy import ndimage

from liverseg.config import load_config
from liverseg.synthetic import LIVER, TUMOUR, RandSyntheticTumourd, paint_tumour


def _phantom(shape: tuple[int, int, int] = (48, 48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A liver-like ellipsoid (0.7 in window units) in soft tissue (0.5), with noise."""
    rng = np.random.default_rng(0)
    zz = np.ogrid[tuple(slice(0, s) for s in shape)]
    inside = sum(((g - s / 2) / (s / 3)) ** 2 for g, s in zip(zz, shape, strict=True)) < 1
    image = np.where(inside, 0.7, 0.5) + rng.normal(0, 0.01, shape)
    return image.astype(np.float32), inside.astype(np.float32) * LIVER


def test_tumour_is_inside_the_liver_darker_and_labelled() -> None:
    image, label = _phantom()
    original_image, original_label = image.copy(), label.copy()
    rng = np.random.RandomState(1)
    assert paint_tumour(image, label, rng, min_radius=4, max_radius=8)
    tumour = label == TUMOUR
    assert tumour.sum() > 50
    assert np.all(original_label[tumour] == LIVER), "tumour outside the liver"
    assert image[tumour].mean() < original_image[tumour].mean() - 0.08
    outside = original_label == 0
    np.testing.assert_array_equal(image[outside], original_image[outside])
    np.testing.assert_array_equal(label[outside], 0)
    # Liver voxels that did not become tumour keep their label.
    assert np.all(label[(original_label == LIVER) & ~tumour] == LIVER)


def test_bulging_tumour_grows_out_of_the_surface_into_soft_tissue_only() -> None:
    image, label = _phantom()
    # Air on one side of the phantom: a bulge must not paint it.
    image[:, :, :6] = 0.0
    original_image, original_label = image.copy(), label.copy()
    assert paint_tumour(image, label, np.random.RandomState(3), min_radius=6, max_radius=8, bulge=True)
    tumour = label == TUMOUR
    inside, outside = tumour & (original_label == LIVER), tumour & (original_label == 0)
    assert inside.sum() > 50 and outside.sum() > 50, (inside.sum(), outside.sum())
    # The outside part is the same mass: it takes the inside part's level, not the tissue's it covers.
    assert abs(image[outside].mean() - image[inside].mean()) < 0.05
    assert image[inside].mean() < original_image[inside].mean() - 0.08
    # One mass: the inside and outside parts are connected.
    assert ndimage.label(tumour)[1] == 1
    air = original_image < 0.2
    np.testing.assert_array_equal(label[air], 0)
    np.testing.assert_array_equal(image[air], original_image[air])


def test_no_liver_no_tumour() -> None:
    image, label = _phantom()
    label[:] = 0
    before = image.copy()
    assert not paint_tumour(image, label, np.random.RandomState(0))
    np.testing.assert_array_equal(image, before)


def test_transform_is_reproducible_and_respects_probability() -> None:
    image, label = _phantom()
    patch = {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None])}
    always = RandSyntheticTumourd(prob=1.0)
    results = []
    for _ in range(2):
        always.set_random_state(seed=7)
        results.append(always(patch))
    assert torch.equal(results[0]["image"], results[1]["image"])
    assert (results[0]["label"] == TUMOUR).any()
    assert not (patch["label"] == TUMOUR).any(), "the input patch was modified in place"
    never = RandSyntheticTumourd(prob=0.0)
    assert never(patch)["image"] is patch["image"]


def test_training_patches_of_real_ct_get_tumours(small_liver_cache: Path) -> None:
    """train.synthetic_tumours reaches the patch stream: patches of real CT gain dark tumours."""
    from liverseg.train import PatchStream, _load_case, _transforms

    labels = {}
    for probability in (0.0, 1.0):
        config = load_config(REPO / "configs" / "cpu_small.yaml",
                             [f"train.synthetic_tumours={probability}", "train.pos_fraction=1.0"])
        fixed, random_part = _transforms(config)
        case = fixed(_load_case(small_liver_cache, TRAINED_CASE))
        stream = PatchStream([case], random_part, seed=0)
        labels[probability] = [stream[g]["label"] for g in range(4)]
    tumour_voxels = [[int((lab == TUMOUR).sum()) for lab in labels[p]] for p in (0.0, 1.0)]
    assert sum(tumour_voxels[1]) > sum(tumour_voxels[0]) + 100, tumour_voxels
