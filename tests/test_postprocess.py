"""Postprocessing: one liver, no enclosed holes, tumour only inside the liver."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import shared_file
from scipy import ndimage

from liverseg.config import PostprocessConfig
from liverseg.io import read_label
from liverseg.postprocess import _FACES, LIVER, TUMOUR, _fill_holes, postprocess_labels

ALL_ON = PostprocessConfig()
ALL_OFF = PostprocessConfig(largest_component=False, fill_holes=False, tumour_inside_liver=False)


@pytest.fixture(scope="module")
def real_label() -> np.ndarray:
    """A real liver mask (TotalSegmentator example, 3 mm), reduced to its largest component."""
    label = read_label(shared_file("liver/labelsTr/tsexample.nii.gz")).array
    liver = label > 0
    components, _ = ndimage.label(liver)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = np.zeros_like(label)
    out[components == sizes.argmax()] = LIVER
    assert out.sum() > 10_000  # a real organ, not an empty file
    return out


def _far_box(label: np.ndarray, size: int = 6) -> tuple[slice, ...]:
    """A cube in the corner farthest from the liver's centre of mass."""
    centre = ndimage.center_of_mass(label > 0)
    corner = [0 if c > n / 2 else n - size - 1 for c, n in zip(centre, label.shape, strict=True)]
    return tuple(slice(c, c + size) for c in corner)


def test_planted_blob_far_from_liver_is_removed(real_label: np.ndarray) -> None:
    planted = real_label.copy()
    box = _far_box(real_label)
    assert not planted[box].any()
    planted[box] = LIVER
    cleaned = postprocess_labels(planted, PostprocessConfig(fill_holes=False))
    assert not cleaned[box].any()
    np.testing.assert_array_equal(cleaned, real_label)  # the liver itself is untouched


def test_tumour_outside_liver_is_removed_inside_kept(real_label: np.ndarray) -> None:
    planted = real_label.copy()
    # A tumour inside the liver: a small cube around a liver voxel far from the liver's surface.
    depth = ndimage.distance_transform_edt(real_label > 0)
    inside = np.unravel_index(int(depth.argmax()), depth.shape)
    inner = tuple(slice(i - 2, i + 3) for i in inside)
    planted[inner] = TUMOUR
    outer = _far_box(real_label)
    planted[outer] = TUMOUR
    # Only the tumour rule on: the far tumour goes although the largest-component step is off.
    cleaned = postprocess_labels(planted, PostprocessConfig(largest_component=False, fill_holes=False))
    assert not cleaned[outer].any()
    assert (cleaned[inner] == TUMOUR).all()
    assert (cleaned[real_label > 0] > 0).all()
    # All steps on: same outcome.
    cleaned_all = postprocess_labels(planted, ALL_ON)
    assert not cleaned_all[outer].any() and (cleaned_all[inner] == TUMOUR).all()


def test_enclosed_holes_are_filled_open_gaps_kept() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[5:35, 5:35, 5:35] = LIVER
    labels[15:20, 15:20, 15:20] = 0  # enclosed cavity (e.g. a missed vessel) -> liver
    labels[25:28, 25:28, 25:28] = TUMOUR
    labels[26, 26, 26] = 0  # hole in a tumour -> tumour
    labels[0:35, 30:32, 18:20] = 0  # a channel open to the outside stays open
    cleaned = postprocess_labels(labels, ALL_ON)
    assert (cleaned[15:20, 15:20, 15:20] == LIVER).all()
    assert cleaned[26, 26, 26] == TUMOUR
    assert not cleaned[0:35, 30:32, 18:20].any()
    assert postprocess_labels(labels, ALL_OFF)[17, 17, 17] == 0  # switched off: untouched


def test_fill_holes_matches_scipy_including_at_the_border() -> None:
    """The labelling-based hole filling gives exactly ``ndimage.binary_fill_holes``'s result, also
    where the mask and its cavities touch the array's border (a crop cutting through the liver)."""
    rng = np.random.default_rng(1)
    for density in (0.65, 0.75, 0.9):  # dense enough that background pockets are enclosed
        mask = rng.random((30, 31, 32)) < density
        mask[:, :, 0] = True  # a face of the array fully covered by the mask
        expected = ndimage.binary_fill_holes(mask, structure=_FACES)
        assert (expected & ~mask).any(), "the case must have cavities to fill"
        np.testing.assert_array_equal(_fill_holes(mask), expected)


def test_all_off_and_empty_are_identity() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(20, 21, 22)).astype(np.uint8)
    np.testing.assert_array_equal(postprocess_labels(labels, ALL_OFF), labels)
    empty = np.zeros((10, 10, 10), dtype=np.uint8)
    np.testing.assert_array_equal(postprocess_labels(empty, ALL_ON), empty)
    assert postprocess_labels(labels, ALL_ON) is not labels  # never edits the caller's array


def test_fast_on_full_resolution_ct() -> None:
    """512 x 512 x 150 with a liver-sized object and noise blobs: well under a few seconds."""
    labels = np.zeros((512, 512, 150), dtype=np.uint8)
    labels[100:300, 150:350, 40:120] = LIVER
    labels[180:200, 200:220, 60:80] = TUMOUR
    labels[400:410, 400:410, 10:20] = LIVER  # stray blob
    start = time.perf_counter()
    cleaned = postprocess_labels(labels, ALL_ON)
    elapsed = time.perf_counter() - start
    assert not cleaned[400:410, 400:410, 10:20].any()
    assert elapsed < 10.0, f"postprocessing took {elapsed:.1f} s"
