"""Per-case quality control: which masks a person should look at before trusting them.

Computed during inference from what is already there, cheaply: the model-space class
probabilities (small: the plan's 4 mm grid), the final mask, the grid's geometry and the HU.
:func:`assess` returns ``{"flags": [...], "measures": {...}}`` for the sidecar JSON. Every
threshold is anatomical or physical, not fitted to one model's outputs; docs/qc.md gives each
flag with its threshold and reason.

Flags:

* ``liver_volume_implausible``: liver (label > 0) outside 600..4000 mL.
* ``liver_cut_by_field_of_view``: at least 1 cm² of liver on a border slice of the grid.
* ``liver_above_diaphragm``: at least 20 mL of liver above the lung bases (into chest or heart).
* ``several_large_components``: before postprocessing, a second separate liver-like region of
  at least 50 mL (a second organ taken for liver).
* ``low_confidence``: the undecided volume (foreground probability between 0.2 and 0.8) is more
  than half the predicted liver's volume (an edge undecided over 8 mm all round).
* ``liver_hu_unusual``: mean parenchyma HU outside the range for the phase.
* ``thick_slices``: voxels longer than 5 mm along some axis.
* ``small_extent``: less than 100 mm of the body covered along the slice axis.
* ``input_doubtful``: the reader accepted the input with a warning (``Volume.warnings``: a NIfTI
  whose qform and sform disagree or whose pixdim is invalid, a DICOM folder of several series),
  so which image and geometry were used deserves a look too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from liverseg.io import Volume

LIVER_ML_RANGE = (600.0, 4000.0)
EDGE_AREA_CM2 = 1.0
ABOVE_DIAPHRAGM_ML = 20.0
DIAPHRAGM_TOLERANCE_MM = 10.0
DIAPHRAGM_RADIUS_MM = 80.0
LUNG_HU = -400.0
LUNG_MIN_ML = 30.0
LUNG_ABOVE_LIVER_MM = 15.0
SECOND_COMPONENT_ML = 50.0
UNDECIDED_P = (0.2, 0.8)
LOW_CONFIDENCE_RATIO = 0.5
HU_RANGE = {"contrast": (50.0, 200.0), "unknown": (20.0, 200.0)}
THICK_SLICE_MM = 5.0
MIN_EXTENT_MM = 100.0
COARSE_MM = 4.0  # the grid of the anatomical checks (lungs, diaphragm): the model's own scale

FLAGS = ("liver_volume_implausible", "liver_cut_by_field_of_view", "liver_above_diaphragm",
         "several_large_components", "low_confidence", "liver_hu_unusual", "thick_slices",
         "small_extent", "input_doubtful")
_FACES = ndimage.generate_binary_structure(3, 1)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def model_space_measures(probs: torch.Tensor, spacing: tuple[float, float, float],
                         nested: bool = False) -> dict[str, float | int | None]:
    """Measures of the raw network output on the model grid (before postprocessing).

    ``probs`` is (C, X, Y, Z) softmax output, ``spacing`` the model grid's voxel size in mm.
    Components: the predicted foreground (liver or tumour, decided as the plan decides) split
    into face-connected regions. Confidence: the volume where the foreground probability is
    undecided (within UNDECIDED_P) over the volume where it is above one half; partial volume
    makes the edge undecided in any model, in a band about one voxel thick, which for an adult
    liver (about 1.5 L, 900 cm² of surface) at 4 mm is a ratio of about 0.25. Also the mean
    normalised entropy (0: certain, 1: uniform) over the foreground, for information.
    """
    from liverseg.modelspace import decide_labels

    voxel_ml = float(np.prod(spacing)) / 1000.0
    foreground = (decide_labels(probs, nested) > 0).numpy()
    components, count = ndimage.label(foreground, structure=_FACES)
    sizes = np.sort(np.bincount(components.ravel())[1:])[::-1] * voxel_ml
    p_fg = (1.0 - probs[0]).numpy()
    above_half = int(np.count_nonzero(p_fg > 0.5))
    undecided = np.count_nonzero((p_fg > UNDECIDED_P[0]) & (p_fg < UNDECIDED_P[1]))
    ratio = float(undecided) / above_half if above_half else None
    entropy = None
    if foreground.any():
        p = probs[:, torch.from_numpy(foreground)].clamp_min(1e-7)
        entropy = float((-(p * p.log()).sum(0) / math.log(probs.shape[0])).mean())
    return {
        "components_before_postprocessing": int(count),
        "largest_component_ml": _round(sizes[0] if count else 0.0, 1),
        "second_component_ml": _round(sizes[1] if count > 1 else 0.0, 1),
        "undecided_volume_ratio": _round(ratio, 4),
        "mean_foreground_entropy": _round(entropy, 4),
    }


def _superior_axis(affine: np.ndarray) -> int:
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def edge_areas_cm2(labels: np.ndarray, volume: Volume) -> dict[str, float]:
    """Liver (label > 0) area on each border slice of the grid, in cm², named by anatomy:
    ``superior``/``inferior`` for the ends of the axis closest to head-feet, ``in_plane`` the
    largest of the four other faces."""
    liver = labels > 0
    spacing = volume.spacing
    s_axis = _superior_axis(volume.affine)
    up = volume.affine[2, s_axis] > 0
    out = {"superior": 0.0, "inferior": 0.0, "in_plane": 0.0}
    for axis in range(3):
        face_cm2 = float(np.prod([spacing[a] for a in range(3) if a != axis])) / 100.0
        for end in (0, -1):
            area = float(np.count_nonzero(np.take(liver, end, axis=axis))) * face_cm2
            if axis == s_axis:
                out["superior" if (end == -1) == up else "inferior"] = round(area, 2)
            else:
                out["in_plane"] = round(max(out["in_plane"], area), 2)
    return out


def coarse_ras(volume: Volume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU and liver mask sampled every ~COARSE_MM (every n-th voxel, no interpolation) and
    reoriented to RAS; returns (hu, liver, spacing in mm)."""
    import nibabel as nib

    steps = [max(1, round(COARSE_MM / s)) for s in volume.spacing]
    index = tuple(slice(None, None, s) for s in steps)
    ornt = nib.orientations.io_orientation(volume.affine)
    hu = nib.orientations.apply_orientation(np.asarray(volume.array)[index], ornt)
    liver = nib.orientations.apply_orientation(np.asarray(labels)[index] > 0, ornt)
    spacing = np.empty(3)
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = volume.spacing[axis] * steps[axis]
    return np.ascontiguousarray(hu), np.ascontiguousarray(liver), spacing


def lungs(hu: np.ndarray, liver: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """Lung on a RAS grid, or None when the diaphragm is out of view (no liver, or the scan ends
    less than LUNG_ABOVE_LIVER_MM above the liver).

    Lung is air (< LUNG_HU, opened by one voxel) inside the body (not connected to the in-plane
    border, where the outside air is), in regions of at least LUNG_MIN_ML that rise at least
    LUNG_ABOVE_LIVER_MM above the liver's top. Stomach and bowel gas lie below the diaphragm,
    hence below the liver's dome, so the height rule keeps them out. A scan that starts less
    than that above the liver shows too little lung over the dome to place the diaphragm.
    """
    if not liver.any():
        return None
    liver_top = int(np.flatnonzero(liver.any(axis=(0, 1)))[-1])
    rise = round(LUNG_ABOVE_LIVER_MM / spacing[2])
    if liver_top + rise >= liver.shape[2]:
        return None
    # The opening cuts the thin links (a 3-5 mm diaphragm, sampled every 4 mm) through which lung
    # and the stomach's gas under it would otherwise join.
    air = ndimage.binary_opening(hu < LUNG_HU, structure=_FACES)
    components, count = ndimage.label(air, structure=_FACES)
    border = np.unique(np.concatenate([components[0].ravel(), components[-1].ravel(),
                                       components[:, 0].ravel(), components[:, -1].ravel()]))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_ml
    tops = np.array([-1] + [box[2].stop - 1 for box in ndimage.find_objects(components)])
    keep = (sizes >= LUNG_MIN_ML) & (tops >= liver_top + rise)
    keep[0] = False
    keep[border] = False
    return keep[components]


def liver_above_diaphragm_ml(hu: np.ndarray, liver: np.ndarray, spacing: np.ndarray) -> float | None:
    """Volume (mL) of liver above the diaphragm, on a RAS grid; None when the diaphragm is out of
    view (no lung found, or the scan ends less than LUNG_ABOVE_LIVER_MM above the liver).

    The lung base of a head-feet column (its lowest lung voxel) is the diaphragm's height there.
    Where the diaphragm is steep (the costophrenic recesses reach down behind and beside the
    liver) and where there is no lung (under the heart), a column's own base says little, so
    each column is bounded by the highest lung base within DIAPHRAGM_RADIUS_MM: the top of the
    nearby dome. Liver higher than that by DIAPHRAGM_TOLERANCE_MM (partial volume, the 4 mm
    grid) lies in the chest: the heart sits on the diaphragm and rises some 10 cm above it.
    """
    lung = lungs(hu, liver, spacing)
    if lung is None or not lung.any():
        return None
    has_lung = lung.any(axis=2)
    base = np.where(has_lung, lung.argmax(axis=2), -1).astype(np.float64)  # lowest lung voxel
    radius = DIAPHRAGM_RADIUS_MM / spacing[:2]
    ii, jj = np.mgrid[-int(radius[0]):int(radius[0]) + 1, -int(radius[1]):int(radius[1]) + 1]
    disk = (ii / max(radius[0], 1e-6)) ** 2 + (jj / max(radius[1], 1e-6)) ** 2 <= 1.0
    bound = ndimage.maximum_filter(base, footprint=disk, mode="constant", cval=-1)
    limit = bound + DIAPHRAGM_TOLERANCE_MM / spacing[2]
    heights = np.arange(liver.shape[2])[None, None, :]
    above = liver & (bound[..., None] >= 0) & (heights > limit[..., None])
    return float(np.count_nonzero(above)) * float(np.prod(spacing)) / 1000.0


def input_measures(volume: Volume) -> dict[str, float]:
    """Largest voxel size and the grid's extent along the head-feet axis, in mm."""
    s_axis = _superior_axis(volume.affine)
    return {"max_voxel_mm": round(max(volume.spacing), 3),
            "craniocaudal_extent_mm": round(volume.shape[s_axis] * volume.spacing[s_axis], 1)}


def contrast_from_dicom(folder: str) -> bool | None:
    """True when a DICOM series says contrast was given (Contrast/Bolus Agent filled in); None
    when it does not say (the attribute is type 2: empty means unknown, not 'none')."""
    import pydicom

    from liverseg.io import dicom_series_files

    try:
        files = dicom_series_files(folder)  # type: ignore[arg-type]
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception:  # QC only: an unreadable header means 'unknown'
        return None
    agent = str(header.get("ContrastBolusAgent", "") or "").strip().upper()
    return True if agent and agent not in ("NONE", "NO") else None


def assess(volume: Volume, labels: np.ndarray, model_measures: dict, stats: dict,
           contrast: bool | None = None) -> dict:
    """The case's QC: ``{"flags": [...], "measures": {...}}`` (see the module docstring)."""
    measures: dict = dict(model_measures)
    liver_ml = float(stats.get("liver_volume_ml") or 0.0)
    measures["liver_volume_ml"] = liver_ml
    edges = edge_areas_cm2(labels, volume)
    measures["liver_on_border_cm2"] = edges
    hu, liver, spacing = coarse_ras(volume, labels)
    measures["liver_above_diaphragm_ml"] = _round(liver_above_diaphragm_ml(hu, liver, spacing), 1)
    phase = "contrast" if contrast else "unknown"
    measures["phase"] = phase
    measures["mean_liver_hu"] = stats.get("mean_liver_hu")
    measures.update(input_measures(volume))

    flags = []
    if not LIVER_ML_RANGE[0] <= liver_ml <= LIVER_ML_RANGE[1]:
        flags.append("liver_volume_implausible")
    if max(edges.values()) >= EDGE_AREA_CM2:
        flags.append("liver_cut_by_field_of_view")
    if (measures["liver_above_diaphragm_ml"] or 0.0) >= ABOVE_DIAPHRAGM_ML:
        flags.append("liver_above_diaphragm")
    if (measures.get("second_component_ml") or 0.0) >= SECOND_COMPONENT_ML:
        flags.append("several_large_components")
    if (measures.get("undecided_volume_ratio") or 0.0) > LOW_CONFIDENCE_RATIO:
        flags.append("low_confidence")
    mean_hu = measures["mean_liver_hu"]
    low, high = HU_RANGE[phase]
    if mean_hu is not None and not low <= mean_hu <= high:
        flags.append("liver_hu_unusual")
    if measures["max_voxel_mm"] > THICK_SLICE_MM:
        flags.append("thick_slices")
    if measures["craniocaudal_extent_mm"] < MIN_EXTENT_MM:
        flags.append("small_extent")
    measures["input_warnings"] = len(volume.warnings)
    if volume.warnings:
        flags.append("input_doubtful")
    return {"flags": flags, "measures": measures}



def read_sidecar_qc(mask_file: str | Path) -> dict | None:
    """The QC that ``liverseg infer`` recorded in a mask's JSON sidecar (``CASE.json`` beside
    ``CASE.nii.gz``), or None when there is none."""
    import json

    mask = Path(mask_file)
    name = mask.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    sidecar = mask.with_name(name + ".json")
    try:
        qc = json.loads(sidecar.read_text(encoding="utf-8")).get("qc")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and isinstance(qc.get("flags"), list) else None


def dice_by_flag(rows: list[tuple[float, list[str]]]) -> list[dict]:
    """Liver Dice per flag state, from (dice, flags) per scored case: for each flag (and 'any
    flag'), how many cases carry it and their mean Dice, against the cases that do not."""
    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    table = []
    names = [*FLAGS, *sorted({f for _, flags in rows for f in flags} - set(FLAGS))]
    for name in ["any flag", *names]:
        def has(flags: list[str], name: str = name) -> bool:
            return bool(flags) if name == "any flag" else name in flags
        flagged = [d for d, flags in rows if has(flags)]
        clear = [d for d, flags in rows if not has(flags)]
        table.append({"flag": name, "n_flagged": len(flagged), "dice_flagged": mean(flagged),
                      "min_dice_flagged": round(min(flagged), 4) if flagged else None,
                      "n_clear": len(clear), "dice_clear": mean(clear),
                      "min_dice_clear": round(min(clear), 4) if clear else None})
    return table
