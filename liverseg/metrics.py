"""Scoring segmentations against references: per-case metrics, case matching and aggregates.

Classes follow LiTS: **liver** is ``label > 0`` (liver including tumour) and **tumour** is
``label == 2``. Both masks are first cropped to the bounding box of their union (+1 voxel margin):
no metric depends on background far from both masks, and cropping keeps surface metrics fast on
512x512xN volumes. Dice, IoU and volumes come from exact integer voxel counts (TP/FP/FN); the
surface metrics (HD95, ASSD, normalised surface Dice) use MONAI's edge extraction and
nearest-edge distances in mm (``monai.metrics.utils``), computed once per class and reduced exactly
as ``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)``
and ``compute_surface_dice`` do; the tests check equality with those functions.

Empty masks (see docs/scoring.md):

* both empty: Dice = IoU = NSD = 1, HD95 = ASSD = 0, RVD = 0 (nothing to find, nothing found);
* reference empty, prediction not: Dice = IoU = NSD = 0, HD95 = ASSD = NaN, RVD = NaN;
* prediction empty, reference not: Dice = IoU = NSD = 0, HD95 = ASSD = NaN, RVD = -1.

NaN means "undefined" (no surface to measure to); it is written as ``null`` in JSON and an empty
cell in CSV, and aggregates of a metric skip it (each aggregate reports how many values it used).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverseg.errors import LiversegError
from liverseg.io import IMAGE_SUFFIXES, Volume, case_name, is_image_file, read_label, same_grid
from liverseg.qc import read_sidecar_qc

#: Class name -> how it is selected from a label map (LiTS convention).
CLASSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "liver": lambda labels: labels > 0,
    "tumour": lambda labels: labels == 2,
}
CLASS_DEFINITIONS = {"liver": "label > 0", "tumour": "label == 2"}
DEFAULT_TOLERANCE_MM = 2.0
#: Metrics that are averaged in the aggregate (counts are summed instead).
SUMMARY_METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "rvd", "ref_volume_ml",
                   "pred_volume_ml")
COUNT_METRICS = ("tp", "fp", "fn")
METRIC_NAMES = (*SUMMARY_METRICS[:6], "ref_volume_ml", "pred_volume_ml", *COUNT_METRICS)


# --------------------------------------------------------------------------------------------
# One pair of binary masks
# --------------------------------------------------------------------------------------------

def union_bbox(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``a | b`` grown by ``margin`` voxels (clipped), None if empty."""
    union = a | b
    # One pass over the volume for the first two axes, then only the (small) box for the last.
    plane = union.reshape(union.shape[0], union.shape[1], -1).any(axis=2)
    hits = [np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))]
    if hits[0].size == 0:
        return None
    inner = union[hits[0][0]:hits[0][-1] + 1, hits[1][0]:hits[1][-1] + 1]
    hits.append(np.flatnonzero(inner.reshape(-1, inner.shape[2]).any(axis=0)))
    return tuple(slice(max(int(h[0]) - margin, 0), min(int(h[-1]) + margin + 1, n))
                 for h, n in zip(hits, union.shape, strict=True))


def score_binary(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    voxel_volume_ml: float | None = None,
) -> dict[str, float | int]:
    """All metrics for one binary prediction against one binary reference on the same grid.

    ``spacing`` is the voxel size in mm along each array axis; ``voxel_volume_ml`` defaults to
    the product of the spacing (pass ``Volume.voxel_volume_ml`` for sheared grids). Returns
    dice, iou, hd95_mm, assd_mm, nsd (at ``tolerance_mm``), ref_volume_ml, pred_volume_ml, rvd
    (signed: (pred - ref) / ref), tp, fp, fn. See the module docstring for empty masks.
    """
    from monai.metrics.utils import get_mask_edges

    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    sp = [float(s) for s in spacing]
    if voxel_volume_ml is None:
        voxel_volume_ml = float(np.prod(sp)) / 1000.0

    box = union_bbox(pred, ref)
    if box is None:  # both empty
        return _result(1.0, 1.0, 0.0, 0.0, 1.0, 0, 0, 0, voxel_volume_ml)
    p, r = pred[box], ref[box]
    tp = int(np.count_nonzero(p & r))
    n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    fp, fn = n_pred - tp, n_ref - tp
    if n_pred == 0 or n_ref == 0:  # one side empty: overlap 0, distances undefined
        return _result(0.0, 0.0, np.nan, np.nan, 0.0, tp, fp, fn, voxel_volume_ml)

    dice = 2.0 * tp / (n_pred + n_ref)
    iou = tp / (tp + fp + fn)
    # MONAI's surface metrics, computed once: compute_hausdorff_distance,
    # compute_average_surface_distance and compute_surface_dice each find the same edges
    # (mask XOR its erosion) and the same nearest-edge distances (KD-tree, in mm), so we take those
    # from MONAI once and reduce them exactly as the three functions do (tests check equality).
    edges_pred, edges_ref = get_mask_edges(p, r, crop=False)
    d_pr = _surface_distances(edges_pred, edges_ref, sp)
    d_rp = _surface_distances(edges_ref, edges_pred, sp)
    hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assd = float(np.concatenate([d_pr, d_rp]).mean())
    nsd = float((np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm))
                / (d_pr.size + d_rp.size))
    return _result(dice, iou, hd95, assd, nsd, tp, fp, fn, voxel_volume_ml)


def _surface_distances(edges_from: np.ndarray, edges_to: np.ndarray, spacing: list[float]) -> np.ndarray:
    """Distance (mm) from each ``edges_from`` voxel to the nearest ``edges_to`` voxel.

    Real surfaces (up to a million edge voxels) go through a KD-tree over the edge voxels; a
    speckled prediction (an untrained model) has millions of edge voxels, and then the exact
    Euclidean distance transform of the box (SciPy; linear in voxels) is faster. Both give the
    exact distances MONAI's surface metrics use (the tests check equality).
    """
    n_from, n_to = np.count_nonzero(edges_from), np.count_nonzero(edges_to)
    if n_from + n_to <= _KDTREE_MAX_POINTS:
        # Exact nearest-edge distances between voxel centres in mm (as MONAI's), via a KD-tree
        # over the edge voxels: much faster than a transform of the whole box for real surfaces.
        from scipy.spatial import cKDTree

        scale = np.asarray(spacing, dtype=np.float64)
        tree = cKDTree(np.argwhere(edges_to) * scale)
        distances, _ = tree.query(np.argwhere(edges_from) * scale, workers=-1)
        return np.asarray(distances, dtype=np.float64)
    from scipy import ndimage

    return ndimage.distance_transform_edt(~edges_to, sampling=spacing)[edges_from].astype(np.float64)


_KDTREE_MAX_POINTS = 1_000_000  # edge voxels above which the dense EDT of the box is faster


def _result(dice: float, iou: float, hd95: float, assd: float, nsd: float, tp: int, fp: int,
            fn: int, voxel_ml: float) -> dict[str, float | int]:
    ref_ml = (tp + fn) * voxel_ml
    pred_ml = (tp + fp) * voxel_ml
    rvd = (pred_ml - ref_ml) / ref_ml if ref_ml > 0 else (0.0 if pred_ml == 0 else np.nan)
    return {"dice": dice, "iou": iou, "hd95_mm": hd95, "assd_mm": assd, "nsd": nsd,
            "ref_volume_ml": ref_ml, "pred_volume_ml": pred_ml, "rvd": float(rvd),
            "tp": tp, "fp": fp, "fn": fn}


def score_labels(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    voxel_volume_ml: float | None = None,
    classes: Iterable[str] = tuple(CLASSES),
) -> dict[str, dict[str, float | int]]:
    """Metrics per class (liver = label > 0, tumour = label 2) for two label maps on one grid."""
    return {name: score_binary(CLASSES[name](pred), CLASSES[name](ref), spacing, tolerance_mm,
                               voxel_volume_ml)
            for name in classes}


# --------------------------------------------------------------------------------------------
# Cases and batches
# --------------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    """One case's outcome: metrics per class, or an error saying what went wrong."""

    case: str
    prediction_file: str | None
    reference_file: str | None
    metrics: dict[str, dict[str, float | int]] = field(default_factory=dict)
    error: str | None = None
    shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    image_file: str | None = None
    has_tumour: bool = False
    qc: dict | None = None  # the prediction's QC (liverseg.qc), when known

    @property
    def ok(self) -> bool:
        return self.error is None


_NNUNET_CHANNEL = re.compile(r"_\d{4}$")
_LITS = re.compile(r"^(?:test-)?(?:segmentation|volume|prediction|pred|seg|label)-(\d+)$", re.I)
_ROLE_SUFFIX = re.compile(r"[_-](?:pred|prediction|seg|segmentation|label|labels|mask|gt)$", re.I)


def match_key(path: str | Path) -> str:
    """The name two files of the same case share: ``case_0000`` -> ``case``; LiTS
    ``segmentation-7`` / ``volume-7`` / ``prediction-7`` -> ``lits-7``; a trailing role word
    (``_pred``, ``_seg``, ``_label``, ``_mask``, ``_gt``) is dropped."""
    name = case_name(path)
    lits = _LITS.match(name)
    if lits:
        return f"lits-{int(lits.group(1))}"
    name = _NNUNET_CHANNEL.sub("", name)
    return _ROLE_SUFFIX.sub("", name) or name


def _mask_files(folder: Path, role: str) -> list[Path]:
    """Mask files in a folder: ``labelsTr/`` of a dataset root, LiTS ``segmentation-N`` files
    (volumes beside them are images, not masks), else every image file in the folder."""
    if (folder / "labelsTr").is_dir() and not any(is_image_file(p) for p in folder.iterdir()):
        folder = folder / "labelsTr"
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if role == "reference":
        lits_segs = sorted(p for p in folder.rglob("segmentation-*") if is_image_file(p))
        if lits_segs:
            return lits_segs
    else:
        lits_volumes = [p for p in files if case_name(p).lower().startswith("volume-")]
        others = [p for p in files if p not in lits_volumes]
        if lits_volumes and any(case_name(p).lower().startswith("segmentation-") for p in others):
            files = others  # a LiTS folder holding predictions beside the CT volumes
    return files


def pair_files(pred: str | Path, ref: str | Path) -> tuple[list[tuple[str, Path, Path]],
                                                             list[CaseResult]]:
    """Match prediction and reference files by case; returns (pairs, failures for the unmatched).

    Two files are one pair whatever their names; two folders are matched with :func:`match_key`.
    """
    pred_path, ref_path = Path(pred), Path(ref)
    for path, role in ((pred_path, "prediction"), (ref_path, "reference")):
        if not path.exists():
            raise LiversegError(f"{role} not found; check the path", path)
    if pred_path.is_file() != ref_path.is_file():
        raise LiversegError(
            f"give two mask files or two folders (prediction {pred_path} is a "
            f"{'file' if pred_path.is_file() else 'folder'}, reference {ref_path} is a "
            f"{'file' if ref_path.is_file() else 'folder'})")
    if pred_path.is_file():
        return [(case_name(ref_path), pred_path, ref_path)], []

    def index(files: list[Path], role: str, root: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in files:
            key = match_key(f)
            if key in out:
                raise LiversegError(f"two {role} files map to case '{key}' ({out[key].name}, {f.name});"
                                    " rename one so each case has one file", root)
            out[key] = f
        return out

    preds = index(_mask_files(pred_path, "prediction"), "prediction", pred_path)
    refs = index(_mask_files(ref_path, "reference"), "reference", ref_path)
    if not refs:
        raise LiversegError(f"no mask files ({', '.join(IMAGE_SUFFIXES)}) in the reference folder",
                            ref_path)
    pairs = [(key, preds[key], refs[key]) for key in sorted(refs) if key in preds]
    failures = [CaseResult(key, None, str(refs[key]),
                           error=f"missing prediction: no file for case '{key}' in {pred_path} "
                                 f"(reference {refs[key]})")
                for key in sorted(refs) if key not in preds]
    failures += [CaseResult(key, str(preds[key]), None,
                            error=f"missing reference: no file for case '{key}' in {ref_path} "
                                  f"(prediction {preds[key]})")
                 for key in sorted(preds) if key not in refs]
    return pairs, failures


def resample_nearest(moving: Volume, target: Volume) -> np.ndarray:
    """A label map resampled onto another grid by nearest neighbour (outside -> 0)."""
    from scipy import ndimage

    matrix = np.linalg.inv(moving.affine) @ target.affine  # target voxel -> moving voxel
    return ndimage.affine_transform(moving.array, matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=target.shape, order=0, cval=0, mode="constant")


def _grid_text(volume: Volume) -> str:
    origin = [round(float(v), 2) for v in volume.affine[:3, 3]]
    return (f"shape {list(volume.shape)}, spacing {[round(s, 3) for s in volume.spacing]}, "
            f"{volume.axcodes}, origin {origin}")


def _overlap(a: Volume, b: Volume) -> bool:
    """Whether two grids share any space: a's voxel box, mapped into b's voxel indices, meets b's."""
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, a.shape[0] - 0.5) for j in (-0.5, a.shape[1] - 0.5)
                        for k in (-0.5, a.shape[2] - 0.5)]).T
    inside_b = (np.linalg.inv(b.affine) @ a.affine @ corners)[:3]
    return bool(np.all(inside_b.max(axis=1) > -0.5) and
                np.all(inside_b.min(axis=1) < np.asarray(b.shape) - 0.5))


def score_volumes(case: str, pred: Volume, ref: Volume, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                  resample_to_ref: bool = False) -> CaseResult:
    """Score two label volumes; a grid mismatch is an error unless ``resample_to_ref``."""
    result = CaseResult(case, pred.source or None, ref.source or None,
                        shape=list(ref.shape), spacing_mm=[round(s, 6) for s in ref.spacing])
    pred_labels = pred.array
    if not same_grid(pred, ref):
        if not resample_to_ref:
            result.error = (
                f"prediction {pred.source} ({_grid_text(pred)}) and reference {ref.source} "
                f"({_grid_text(ref)}) are on different grids; export the prediction on the reference "
                "grid or pass --resample-to-ref")
            return result
        if not _overlap(pred, ref):
            result.error = (
                f"prediction {pred.source} ({_grid_text(pred)}) and reference {ref.source} "
                f"({_grid_text(ref)}) do not overlap in space, so no resampling can compare them; they "
                "belong to different scans, or one has a wrong origin or orientation in its header")
            return result
        pred_labels = resample_nearest(pred, ref)
    result.has_tumour = bool((ref.array == 2).any() or (pred_labels == 2).any())
    result.metrics = score_labels(pred_labels, ref.array, ref.spacing, tolerance_mm,
                                  ref.voxel_volume_ml)
    return result


def score_files(case: str, pred_file: Path, ref_file: Path,
                tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                resample_to_ref: bool = False) -> CaseResult:
    """Read and score one pair; unreadable files become the case's error, not an exception."""
    try:
        ref = read_label(ref_file)
        pred = read_label(pred_file)
    except LiversegError as exc:
        return CaseResult(case, str(pred_file), str(ref_file), error=str(exc))
    result = score_volumes(case, pred, ref, tolerance_mm, resample_to_ref)
    result.prediction_file, result.reference_file = str(pred_file), str(ref_file)
    result.qc = read_sidecar_qc(pred_file)  # recorded by `liverseg infer`, when there
    return result


def score_paths(
    pred: str | Path,
    ref: str | Path,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    resample_to_ref: bool = False,
    wrap: Callable[[Iterable], Iterable] | None = None,
) -> list[CaseResult]:
    """Score a prediction file/folder against a reference file/folder; one result per case,
    failures (unreadable, different grids, missing counterparts) included as results with an
    error. ``wrap`` wraps the case iterator (e.g. a progress bar)."""
    pairs, failures = pair_files(pred, ref)
    iterator: Iterable = pairs if wrap is None else wrap(pairs)
    results = [score_files(case, p, r, tolerance_mm, resample_to_ref) for case, p, r in iterator]
    return sorted(results + failures, key=lambda c: c.case)


# --------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------

def scored_classes(results: Sequence[CaseResult]) -> list[str]:
    """Liver always; tumour only when some case has label 2 in its reference or prediction."""
    names = ["liver"]
    if any(r.ok and r.has_tumour for r in results):
        names.append("tumour")
    return names


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()),
            "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def aggregate(results: Sequence[CaseResult]) -> dict:
    """Mean, median, standard deviation (population), min, max and n per class and metric, plus
    LiTS global Dice (2 sum TP / (2 sum TP + sum FP + sum FN) pooled over all scored cases)."""
    scored = [r for r in results if r.ok]
    out: dict = {"n_cases": len(results), "n_scored": len(scored),
                 "n_failed": len(results) - len(scored), "classes": {}}
    for name in scored_classes(results):
        rows = [r.metrics[name] for r in scored if name in r.metrics]
        entry: dict = {metric: _stats([row[metric] for row in rows]) for metric in SUMMARY_METRICS}
        tp, fp, fn = (int(sum(row[k] for row in rows)) for k in COUNT_METRICS)
        entry["global_dice"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
        entry["tp"], entry["fp"], entry["fn"] = tp, fp, fn
        entry["n_both_empty"] = sum(1 for row in rows if row["tp"] + row["fp"] + row["fn"] == 0)
        out["classes"][name] = entry
    return out
