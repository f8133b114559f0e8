"""Degraded copies of the shared liver CTs, to show that the QC flags point at the bad cases.

    python pipelines/qc_degraded.py -o /tmp/liverseg_qc_data
    liverseg evaluate /tmp/liverseg_qc_data -o /tmp/liverseg_qc_report

writes an MSD dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``) outside the repository:
each case of ``../shared/data/liver`` as it is (a symbolic link, nothing copied) and four
degraded copies, each with its reference label carried onto the degraded grid:

* ``CASE_fov``: field of view cut through the middle of the liver (the slices above the
  liver's mid-height dropped), as when a scan is planned too low;
* ``CASE_thick``: slices averaged in groups into 10 mm thick ones (what a thick reconstruction
  measures: the mean over the slab), labels by majority over the slab;
* ``CASE_noise``: Gaussian noise of 120 HU standard deviation, blurred to a 1.5 mm grain as
  real CT noise is (a dose far too low for abdominal CT);
* ``CASE_noise300``: 300 HU with a 3 mm grain, far beyond any diagnostic scan (a stress test
  that breaks the shipped model).

The evaluate report then gives liver Dice per QC flag state (summary.json ``qc``, report.html).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "liver"
THICK_MM = 10.0
NOISE = {"noise": (120.0, 1.5), "noise300": (300.0, 3.0)}  # standard deviation (HU), grain (mm)
SEED = 17


def superior_axis(affine: np.ndarray) -> tuple[int, bool]:
    """The voxel axis closest to the patient's superior direction, and whether it runs towards
    superior (True) or inferior."""
    axis = int(np.argmax(np.abs(affine[2, :3])))
    return axis, bool(affine[2, axis] > 0)


def save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(path))


def cut_fov(image: np.ndarray, label: np.ndarray, affine: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the slices above the liver's mid-height."""
    axis, up = superior_axis(affine)
    occupied = np.flatnonzero(np.any(label > 0, axis=tuple(a for a in range(3) if a != axis)))
    middle = int((occupied[0] + occupied[-1]) // 2)
    keep = slice(0, middle + 1) if up else slice(middle, label.shape[axis])
    index = [slice(None)] * 3
    index[axis] = keep
    shift = np.eye(4)
    shift[axis, 3] = keep.start
    return image[tuple(index)], label[tuple(index)], affine @ shift


def thicken(image: np.ndarray, label: np.ndarray, affine: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average slabs of slices along the slice axis into THICK_MM slices; labels by majority."""
    axis, _ = superior_axis(affine)
    step = float(np.linalg.norm(affine[:3, axis]))
    group = max(2, round(THICK_MM / step))
    n = image.shape[axis] // group
    moved = np.moveaxis(image, axis, -1)[..., : n * group].astype(np.float32)
    thick = moved.reshape(*moved.shape[:2], n, group).mean(axis=-1)
    lab = np.moveaxis(label, axis, -1)[..., : n * group].reshape(*moved.shape[:2], n, group)
    votes = np.stack([(lab == c).sum(axis=-1) for c in range(3)])
    thick_label = votes.argmax(axis=0).astype(np.uint8)
    scale = np.eye(4)
    scale[axis, axis] = group
    scale[axis, 3] = (group - 1) / 2.0  # the slab's centre
    return np.moveaxis(thick, -1, axis), np.moveaxis(thick_label, -1, axis), affine @ scale


def add_noise(image: np.ndarray, affine: np.ndarray, seed: int, sigma_hu: float,
              grain_mm: float) -> np.ndarray:
    """Correlated Gaussian noise: white noise blurred to ``grain_mm``, rescaled to ``sigma_hu``."""
    rng = np.random.default_rng(seed)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=grain_mm / spacing / 2.0)
    noise *= sigma_hu / float(noise.std())
    return image.astype(np.float32) + noise


def build(data: Path, out: Path) -> list[dict]:
    listed = json.loads((data / "dataset.json").read_text())["training"]
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for n, entry in enumerate(listed):
        image_path, label_path = data / entry["image"], data / entry["label"]
        case = label_path.name.removesuffix(".nii.gz")
        print(f"{case} ...", file=sys.stderr, flush=True)
        for sub, src in (("imagesTr", image_path), ("labelsTr", label_path)):
            link = out / sub / f"{case}.nii.gz"
            link.unlink(missing_ok=True)
            link.symlink_to(src.resolve())
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        ct, ref = nib.load(str(image_path)), nib.load(str(label_path))
        image = np.asarray(ct.get_fdata(dtype=np.float32))
        label = np.asarray(ref.dataobj).astype(np.uint8)
        affine = ct.affine
        variants = {
            "fov": cut_fov(image, label, affine),
            "thick": thicken(image, label, affine),
        }
        for name, (sigma, grain) in NOISE.items():
            variants[name] = (add_noise(image, affine, SEED + n, sigma, grain), label, affine)
        for name, (img, lab, aff) in variants.items():
            save(np.rint(img), aff, out / "imagesTr" / f"{case}_{name}.nii.gz", np.int16)
            save(lab, aff, out / "labelsTr" / f"{case}_{name}.nii.gz", np.uint8)
            training.append({"image": f"./imagesTr/{case}_{name}.nii.gz",
                             "label": f"./labelsTr/{case}_{name}.nii.gz"})
    (out / "dataset.json").write_text(json.dumps({
        "name": "liverseg-qc-degraded",
        "description": "the shared liver CTs and degraded copies (pipelines/qc_degraded.py)",
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": len(training), "training": training}, indent=2) + "\n")
    return training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="folder for the degraded dataset (outside the repository)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    out = args.output.resolve()
    if out == REPO or REPO in out.parents:
        parser.error(f"{out} is inside the repository; write the degraded data elsewhere (e.g. /tmp)")
    cases = build(args.data, out)
    print(f"wrote {len(cases)} cases to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
