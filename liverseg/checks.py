"""What the reader refuses, and what it reads with a note: one place for every command.

``io.read_ct``/``io.read_label`` call these on every image, so ``infer``, ``preprocess``,
``train``, ``score`` and ``evaluate`` judge inputs the same way. A refusal is a
:class:`LiversegError` (one line: the file, what is wrong, what to do; the CLI exits 2 before
writing anything). A usable but doubtful image is read and a short note is returned for
``Volume.warnings``. DICOM series are checked in ``dicom.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from liverseg.errors import LiversegError

if TYPE_CHECKING:
    from liverseg.io import Volume

# A CT is refused when it is thinner than this along any of its axes. An adult liver spans about
# 150 mm head to foot, 150-200 mm across and 100-150 mm front to back; 30 mm is a fifth of its
# smallest extent, and the 3-4 mm model grids see fewer than 10 voxels there. Below it the image
# is a slab or a crop in which a liver cannot be told from spleen or kidney by its shape, and any
# volume in mL reported from it would be meaningless. (Scans cut through the liver but thicker
# than this are segmented; the part of the liver outside the field of view is missing.)
MIN_LIVER_EXTENT_MM = 30.0
# ... and when it spans more than a human body along any axis: its voxel size is wrong (e.g. in
# micrometres), and resampling it to the model's grid would exhaust memory.
MAX_EXTENT_MM = 2500.0


def check_affine(affine: np.ndarray, path: str | Path | None = None) -> None:
    """Refuse a voxel-to-world affine that is non-finite, has a zero voxel size or is singular."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise LiversegError("the image's voxel-to-world affine holds NaN or infinite values; the "
                            "header is damaged, re-export the image", path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if spacing.min() <= 1e-6:
        raise LiversegError(f"voxel size {_mm(spacing)} mm has a zero axis; the header is damaged, "
                            "set the voxel size or re-export the image", path)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise LiversegError("the image's voxel axes are parallel (singular affine), so voxels have no "
                            "place in space; the header is damaged, re-export the image", path)


def check_finite(array: np.ndarray, path: str | Path | None = None) -> None:
    """Refuse NaN or infinite voxels (min/max see them without a copy of the array)."""
    if np.issubdtype(array.dtype, np.integer):
        return
    if np.isfinite(array.min()) and np.isfinite(array.max()):
        return
    bad = int(np.count_nonzero(~np.isfinite(array)))
    raise LiversegError(f"{bad} voxels ({100.0 * bad / array.size:.3g}%) are NaN or infinite; "
                        "replace them (e.g. with -1024, air) or re-export the image", path)


def check_extent(volume: Volume, min_extent_mm: float | None = MIN_LIVER_EXTENT_MM) -> None:
    """Refuse a CT too thin to hold a liver, or larger than a body (see MIN_LIVER_EXTENT_MM)."""
    extent = np.asarray(volume.shape, dtype=np.float64) * np.asarray(volume.spacing)
    found = f"{_mm(extent)} mm ({'x'.join(str(s) for s in volume.shape)} voxels of {_mm(volume.spacing)} mm)"
    if min_extent_mm is not None and extent.min() < min_extent_mm:
        raise LiversegError(f"image covers only {found}: too small to hold a liver, which needs at least "
                            f"{min_extent_mm:g} mm along every axis (a whole liver spans about 150 mm); "
                            "give the whole abdominal CT, not a slab or a crop", volume.source or None)
    if extent.max() > MAX_EXTENT_MM:
        raise LiversegError(f"image covers {found}: larger than a human body ({MAX_EXTENT_MM:g} mm); the "
                            "voxel size in the header is wrong, fix it or re-export the image",
                            volume.source or None)


def _mm(values: np.ndarray | tuple[float, ...]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def raw_nifti_header(path: Path) -> nib.Nifti1Header:
    """The NIfTI-1/2 header as stored, without the fix-ups nibabel applies when it loads a file
    (a zero voxel size silently becomes 1 mm, a negative one positive, a bad qfac 1)."""
    with nib.openers.ImageOpener(str(path)) as handle:
        block = handle.read(540)
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for endian in ("<", ">"):
            if len(block) >= size and int(np.frombuffer(block[:4], dtype=f"{endian}i4")[0]) == size:
                return klass(binaryblock=block[:size], endianness=endian, check=False)
    raise ValueError("no NIfTI header (sizeof_hdr is neither 348 nor 540)")


def check_nifti_header(header: nib.Nifti1Header, path: str | Path | None = None) -> list[str]:
    """Refuse a raw NIfTI header whose geometry nibabel would use is damaged; notes for doubtful ones.

    nibabel takes the sform when its code is set, else the qform (pixdim and a quaternion), else
    pixdim alone with no orientation (ANALYZE); only the transform in use must be intact.
    """
    notes: list[str] = []
    codes = set(nib.nifti1.xform_codes.value_set())
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    for name, code in (("qform_code", qcode), ("sform_code", scode)):
        if code not in codes:
            raise LiversegError(f"{name} is {code}, not a NIfTI transform code; the header is damaged, "
                                "re-export the image", path)
    pixdim = np.asarray(header["pixdim"][:4], dtype=np.float64)
    bad = [f"{axis} {v:g}" for axis, v in zip("xyz", pixdim[1:4], strict=True)
           if not (np.isfinite(v) and v > 0)]
    if scode > 0:
        sform = np.eye(4)
        sform[:3] = np.vstack([header["srow_x"], header["srow_y"], header["srow_z"]])
        check_affine(sform, path)
        if bad:
            notes.append(f"pixdim holds an invalid voxel size ({', '.join(bad)} mm); used the sform's "
                         f"({_mm(np.linalg.norm(sform[:3, :3], axis=0))} mm)")
        elif qcode > 0 and _valid_qform(header, pixdim):
            shape = np.asarray(header.get_data_shape()[:3], dtype=np.float64)
            shape = np.concatenate([shape, np.ones(3 - len(shape))]) if len(shape) < 3 else shape
            corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                                for k in (0, shape[2] - 1)]).T
            apart = float(np.abs((header.get_qform() - sform) @ corners).max())
            if apart > 0.1:
                notes.append(f"qform and sform disagree by up to {apart:.3g} mm; used the sform (as "
                             "nibabel does), viewers that use the qform place the image elsewhere")
        return notes
    if bad:
        raise LiversegError(f"voxel size in the header (pixdim) is invalid: {', '.join(bad)} mm; it must "
                            "be positive and finite (nibabel would silently take 1 mm); fix the header or "
                            "re-export the image", path)
    if qcode > 0 and not _valid_qform(header, pixdim):
        raise LiversegError("the qform (quaternion, offset or qfac in pixdim[0]) holds invalid values, so "
                            "the image's orientation is unknown; the header is damaged, re-export the image",
                            path)
    if qcode == 0:
        notes.append("header has no orientation (qform_code and sform_code are 0): read as ANALYZE "
                     "(LAS), left and right may be swapped")
    return notes


def _valid_qform(header: nib.Nifti1Header, pixdim: np.ndarray) -> bool:
    quaternion = np.array([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=np.float64)
    offset = np.array([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=np.float64)
    return bool(np.isfinite(quaternion).all() and np.isfinite(offset).all()
                and float(quaternion @ quaternion) <= 1.0 + 1e-6 and pixdim[0] in (0.0, 1.0, -1.0)
                and np.isfinite(pixdim[1:4]).all() and (pixdim[1:4] > 0).all())


