"""Synthetic tumours: painted inside the liver (or bulging from its surface into soft tissue only),
darker than it, labelled tumour, reproducible. Decoys: dark pouches beside the liver, background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import REPO, TRAINED_CASE
from scipy import ndimage

from liverseg.config import load_config
from liverseg.synthetic import (
    LIVER,
    TUMOUR,
    RandSyntheticDecoyd,
    RandSyntheticTumourd,
    depth_inside,
    paint_decoy,
    paint_tumour,
)


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


def test_decoy_is_a_dark_walled_pouch_beside_the_liver_labelled_background() -> None:
    image, label = _phantom()
    image[:, :, :6] = 0.0  # air on one side: a decoy must not paint it
    original_image, original_label = image.copy(), label.copy()
    assert paint_decoy(image, label, np.random.RandomState(2), min_radius=5, max_radius=7)
    np.testing.assert_array_equal(label, original_label)
    changed = image != original_image
    assert changed.sum() > 50
    assert not (changed & (original_label > 0)).any(), "the decoy painted over the liver"
    air = original_image < 0.2
    assert not (changed & air).any(), "the decoy painted air"
    # Beside the liver: its nearest voxel is at most a voxel or two away.
    distance = ndimage.distance_transform_edt(original_label == 0)
    assert distance[changed].min() <= 2.0
    # Dark content inside a wall about as bright as the liver.
    content = changed & ndimage.binary_erosion(changed)
    wall = changed & ~content
    assert content.sum() > 0 and wall.sum() > 0
    liver_level = float(np.median(original_image[original_label == LIVER]))
    assert image[content].mean() < liver_level - 0.08
    assert image[wall].mean() > image[content].mean() + 0.03
    assert ndimage.label(changed)[1] == 1


def test_decoy_transform_is_reproducible_and_keeps_the_label() -> None:
    image, label = _phantom()
    patch = {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None])}
    decoys = RandSyntheticDecoyd(prob=1.0)
    results = []
    for _ in range(2):
        decoys.set_random_state(seed=5)
        results.append(decoys(patch))
    assert torch.equal(results[0]["image"], results[1]["image"])
    assert not torch.equal(results[0]["image"], patch["image"])
    assert torch.equal(results[0]["label"], patch["label"])
    no_liver = {"image": patch["image"], "label": torch.zeros_like(patch["label"])}
    assert torch.equal(decoys(no_liver)["image"], patch["image"])


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


def _real_patches(cache: Path, overrides: list[str]) -> list[dict]:
    """The first four training patches of real CT (cpu_small recipe, augmentation off)."""
    from liverseg.train import PatchStream, _load_case, _transforms

    config = load_config(REPO / "configs" / "cpu_small.yaml",
                         ["train.pos_fraction=1.0", "train.augment=false", *overrides])
    fixed, random_part = _transforms(config)
    stream = PatchStream([fixed(_load_case(cache, TRAINED_CASE))], random_part, seed=0)
    return [stream[g] for g in range(4)]


def test_training_patches_of_real_ct_get_tumours(small_liver_cache: Path) -> None:
    """train.synthetic_tumours reaches the patch stream: patches of real CT gain dark tumours."""
    tumour_voxels = [[int((patch["label"] == TUMOUR).sum())
                      for patch in _real_patches(small_liver_cache, [f"train.synthetic_tumours={p}"])]
                     for p in (0.0, 1.0)]
    assert sum(tumour_voxels[1]) > sum(tumour_voxels[0]) + 100, tumour_voxels


def test_training_patches_of_real_ct_get_decoys(small_liver_cache: Path) -> None:
    """train.synthetic_decoys reaches the patch stream: images change beside the liver, labels do not."""
    plain = _real_patches(small_liver_cache, ["train.synthetic_decoys=0.0"])
    decoyed = _real_patches(small_liver_cache, ["train.synthetic_decoys=1.0"])
    painted = 0
    for before, after in zip(plain, decoyed, strict=True):
        assert torch.equal(before["label"], after["label"])
        changed = before["image"] != after["image"]
        assert not (changed & (before["label"] > 0)).any()
        painted += int(changed.sum())
    assert painted > 100, painted


def test_depth_inside_equals_scipys_edt_on_the_whole_array() -> None:
    """The bounding-box shortcut gives exactly the whole-array EDT: blobs inside, touching the
    array's faces, filling it, and none at all."""
    rng = np.random.default_rng(3)
    masks = []
    for _ in range(20):
        noise = ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), 3.0)
        masks.append(noise > np.quantile(noise, rng.uniform(0.6, 0.97)))
    edge = np.zeros((20, 20, 20), bool)
    edge[:, 5:12, 14:] = True  # touches three faces
    masks += [edge, np.ones((8, 9, 10), bool), np.zeros((8, 9, 10), bool)]
    for mask in masks:
        assert np.array_equal(depth_inside(mask), ndimage.distance_transform_edt(mask))
