"""Metrics with known answers: analytic spheres and shifted cubes, identical and empty masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import shared_file
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage

from liverseg.io import read_label
from liverseg.metrics import (
    CaseResult,
    aggregate,
    match_key,
    score_binary,
    score_labels,
    union_bbox,
)


def _lens_volume(r1: float, r2: float, d: float) -> float:
    """Volume of the intersection of two spheres (radii r1, r2, centres d apart, partial overlap)."""
    return (math.pi * (r1 + r2 - d) ** 2
            * (d * d + 2 * d * r2 - 3 * r2 * r2 + 2 * d * r1 + 6 * r2 * r1 - 3 * r1 * r1) / (12 * d))


def test_two_spheres_dice_iou_and_volumes_match_the_analytic_overlap() -> None:
    spacing = (0.45, 0.5, 0.6)  # anisotropic: spheres in mm are ellipsoids in voxels
    r_ref, r_pred = 24.0, 18.0
    offset = np.array([9.0, 4.0, -6.0])
    shape = tuple(math.ceil(64 / s) for s in spacing)
    centre = np.array([30.13, 31.07, 29.91])  # off-lattice, so no symmetric rounding luck
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    ref = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= r_ref ** 2
    pred = sum((g - c) ** 2 for g, c in zip(grid, centre + offset, strict=True)) <= r_pred ** 2

    m = score_binary(pred, ref, spacing)
    v_ref, v_pred = 4 / 3 * math.pi * r_ref ** 3, 4 / 3 * math.pi * r_pred ** 3
    inter = _lens_volume(r_ref, r_pred, float(np.linalg.norm(offset)))
    assert m["dice"] == pytest.approx(2 * inter / (v_ref + v_pred), abs=1e-3)
    assert m["iou"] == pytest.approx(inter / (v_ref + v_pred - inter), abs=1e-3)
    assert m["ref_volume_ml"] == pytest.approx(v_ref / 1000, rel=1e-3)
    assert m["pred_volume_ml"] == pytest.approx(v_pred / 1000, rel=1e-3)
    assert m["rvd"] == pytest.approx((v_pred - v_ref) / v_ref, abs=1e-3)
    assert m["tp"] + m["fn"] == int(ref.sum()) and m["tp"] + m["fp"] == int(pred.sum())


def _shifted_cube_distances(n: int, k: int, axis: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """Analytic nearest-surface distances (mm) from each surface voxel of an n-voxel cube to the
    surface of the same cube shifted by k voxels along ``axis`` (the same multiset both ways).

    Along the shift axis u, the other axes v, w: shell voxels with u < k are (k - u) * s_u from
    the shifted cube's near face; shell voxels with u >= k on a side face lie on the shifted
    cube's side face (0); the remaining far-face voxels (u = n - 1, v, w interior) are inside the
    shifted box, so their distance is the smallest distance to one of its six faces along an axis.
    """
    s_u = spacing[axis]
    s_v, s_w = (spacing[i] for i in range(3) if i != axis)
    idx = np.arange(n)
    u, v, w = np.meshgrid(idx, idx, idx, indexing="ij")
    shell = (u == 0) | (u == n - 1) | (v == 0) | (v == n - 1) | (w == 0) | (w == n - 1)
    side = (v == 0) | (v == n - 1) | (w == 0) | (w == n - 1)
    inside_face = np.minimum.reduce([
        np.full(u.shape, k * s_u), (u - k) * s_u, v * s_v, (n - 1 - v) * s_v, w * s_w,
        (n - 1 - w) * s_w]).astype(np.float64)
    dist = np.where(u < k, (k - u) * s_u, np.where(side, 0.0, inside_face))
    return dist[shell]


@pytest.mark.parametrize(("axis", "k", "spacing"), [
    (1, 2, (1.5, 0.7, 2.0)),   # shift along the fine axis: far-face points go k*0.7 mm
    (2, 1, (1.5, 0.7, 2.0)),   # shift along the coarse axis: side faces are nearer for some
    (0, 3, (0.8, 1.1, 2.5)),
])
def test_cube_shifted_by_k_voxels_hd95_assd_nsd_in_mm(axis: int, k: int,
                                                      spacing: tuple[float, float, float]) -> None:
    n = 14
    ref = np.zeros((n + 10, n + 12, n + 8), dtype=bool)
    start = [3, 4, 2]
    ref[tuple(slice(s, s + n) for s in start)] = True
    pred = np.roll(ref, k, axis=axis)

    m = score_binary(pred, ref, spacing, tolerance_mm=1.0)
    d = _shifted_cube_distances(n, k, axis, spacing)
    both = np.concatenate([d, d])
    assert m["dice"] == pytest.approx((n - k) / n, abs=1e-3)
    assert m["iou"] == pytest.approx((n - k) / (n + k), abs=1e-3)
    assert m["hd95_mm"] == pytest.approx(float(np.percentile(d, 95)), abs=1e-3)
    assert m["assd_mm"] == pytest.approx(float(both.mean()), abs=1e-3)
    assert m["nsd"] == pytest.approx(float((both <= 1.0).mean()), abs=1e-3)
    assert (m["tp"], m["fp"], m["fn"]) == ((n - k) * n * n, k * n * n, k * n * n)
    assert m["rvd"] == 0.0
    # The distances really are in mm: the far-face distance along the shift axis appears.
    assert np.isclose(d, k * spacing[axis]).any()
    assert m["assd_mm"] > 0


def test_our_single_pass_equals_monai_metric_functions_on_real_labels() -> None:
    label = read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))
    ref = label.array > 0
    pred = ndimage.binary_dilation(ref, iterations=2) & ~ndimage.binary_erosion(ref, iterations=6)
    pred = np.roll(pred, 2, axis=2)
    spacing = (3.0, 2.2, 4.1)  # deliberately anisotropic
    m = score_binary(pred, ref, spacing, tolerance_mm=3.0)

    yp = torch.from_numpy(pred)[None, None].float()
    yr = torch.from_numpy(ref)[None, None].float()
    assert m["dice"] == pytest.approx(float(compute_dice(yp, yr, include_background=True)), abs=1e-6)
    hd = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(yp, yr, include_background=True, symmetric=True,
                                            spacing=spacing)
    nsd = compute_surface_dice(yp, yr, [3.0], include_background=True, spacing=spacing)
    assert m["hd95_mm"] == pytest.approx(float(hd), abs=1e-4)
    assert m["assd_mm"] == pytest.approx(float(assd), abs=1e-4)
    assert m["nsd"] == pytest.approx(float(nsd), abs=1e-6)


def test_speckled_prediction_uses_the_dense_transform_with_the_same_answer() -> None:
    rng = np.random.default_rng(0)
    ref = np.zeros((40, 36, 30), dtype=bool)
    ref[8:30, 6:28, 5:24] = True
    pred = rng.random(ref.shape) < 0.3  # speckle: far more edge voxels than the KD-tree path takes
    spacing = (0.9, 1.3, 2.1)
    m = score_binary(pred, ref, spacing)
    yp, yr = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    hd = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(yp, yr, include_background=True, symmetric=True,
                                            spacing=spacing)
    assert m["hd95_mm"] == pytest.approx(float(hd), abs=1e-4)
    assert m["assd_mm"] == pytest.approx(float(assd), abs=1e-4)


def test_identical_masks_score_perfectly() -> None:
    label = read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))
    m = score_labels(label.array, label.array, label.spacing)["liver"]
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["nsd"] == 1.0
    assert m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0 and m["rvd"] == 0.0
    assert m["fp"] == 0 and m["fn"] == 0 and m["tp"] == int((label.array > 0).sum())
    assert m["ref_volume_ml"] == pytest.approx(m["tp"] * 27 / 1000)


def test_empty_masks_follow_the_documented_convention() -> None:
    ref = np.zeros((20, 20, 20), dtype=bool)
    ref[5:12, 6:14, 4:10] = True
    empty = np.zeros_like(ref)
    spacing = (0.8, 0.8, 2.0)

    pred_empty = score_binary(empty, ref, spacing)
    assert pred_empty["dice"] == 0.0 and pred_empty["iou"] == 0.0 and pred_empty["nsd"] == 0.0
    assert math.isnan(pred_empty["hd95_mm"]) and math.isnan(pred_empty["assd_mm"])
    assert pred_empty["rvd"] == -1.0 and pred_empty["fn"] == int(ref.sum())

    ref_empty = score_binary(ref, empty, spacing)
    assert ref_empty["dice"] == 0.0 and math.isnan(ref_empty["hd95_mm"])
    assert math.isnan(ref_empty["rvd"]) and ref_empty["fp"] == int(ref.sum())

    both = score_binary(empty, empty, spacing)
    assert (both["dice"], both["iou"], both["nsd"], both["hd95_mm"], both["assd_mm"],
            both["rvd"]) == (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    assert union_bbox(empty, empty) is None


def test_aggregate_skips_undefined_distances_and_pools_global_dice() -> None:
    def case(name: str, dice: float, hd: float, tp: int, fp: int, fn: int) -> CaseResult:
        metrics = {"dice": dice, "iou": 0.0, "hd95_mm": hd, "assd_mm": hd, "nsd": 0.0, "rvd": 0.0,
                   "ref_volume_ml": 1.0, "pred_volume_ml": 1.0, "tp": tp, "fp": fp, "fn": fn}
        return CaseResult(name, "p", "r", metrics={"liver": metrics, "tumour": dict(metrics)},
                          has_tumour=False)

    results = [case("a", 0.5, 4.0, 10, 10, 10), case("b", 0.0, float("nan"), 0, 0, 30),
               case("c", 1.0, 2.0, 60, 0, 0), CaseResult("d", None, "r", error="missing")]
    agg = aggregate(results)
    assert (agg["n_cases"], agg["n_scored"], agg["n_failed"]) == (4, 3, 1)
    assert list(agg["classes"]) == ["liver"]  # no case has label 2
    liver = agg["classes"]["liver"]
    assert liver["dice"]["mean"] == pytest.approx(0.5) and liver["dice"]["min"] == 0.0
    assert liver["dice"]["std"] == pytest.approx(np.std([0.5, 0.0, 1.0]))
    assert liver["hd95_mm"]["n"] == 2 and liver["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert liver["global_dice"] == pytest.approx(2 * 70 / (2 * 70 + 10 + 40))


@pytest.mark.parametrize(("name", "key"), [
    ("case_001.nii.gz", "case_001"), ("case_001_0000.nii.gz", "case_001"),
    ("segmentation-12.nii", "lits-12"), ("volume-12.nii", "lits-12"),
    ("prediction-12.nii.gz", "lits-12"), ("ircadb01_pred.nii.gz", "ircadb01"),
    ("ircadb01.mha", "ircadb01"),
])
def test_case_names_match_across_conventions(name: str, key: str) -> None:
    assert match_key(name) == key
