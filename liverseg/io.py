"""Reading CT and writing masks without ever separating voxels from their geometry.

Every image in liverseg is a :class:`Volume`: a 3D array in NIfTI voxel order (x, y, z) and the
4x4 affine that maps voxel indices to RAS+ millimetres (nibabel's convention). NIfTI is read with
nibabel; NRRD, MHA/MHD and DICOM series (see ``dicom.py``) with SimpleITK, whose LPS geometry is
converted to RAS.

The reader is where inputs are judged, once for every command: an image whose geometry is
damaged (zero, negative or non-finite voxel size, a singular or non-finite affine: checked in the
raw NIfTI header, before nibabel quietly "fixes" it), that holds non-finite voxels, or that is too
small to hold a liver is refused with a one-line error (the rules are in ``checks.py`` and
``dicom.py``). What is usable but doubtful (qform and sform disagreeing, no orientation in the
header, several DICOM series in a folder) is read, and a short note is added to
``Volume.warnings``, which ``infer`` copies into the sidecar and prints.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from liverseg.atomic import atomic_path, write_text_atomic  # noqa: F401 (re-exported)
from liverseg.checks import (
    MIN_LIVER_EXTENT_MM,
    check_affine,
    check_extent,
    check_finite,
    check_nifti_header,
    raw_nifti_header,
)
from liverseg.dicom import (  # noqa: F401 (dicom_series, dicom_series_files re-exported)
    check_dicom_file,
    dicom_series,
    dicom_series_files,
    read_series,
    sitk,
)
from liverseg.errors import LiversegError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D image and its geometry, which travel together.

    ``array`` is indexed (x, y, z) as in NIfTI; ``affine`` maps (i, j, k, 1) to RAS+ mm.
    ``header`` keeps the source NIfTI header (if any) so a mask can be written with exactly the
    same qform/sform; ``source`` names where it came from, for error messages and sidecars.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = ""
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)  # usable but doubtful: short notes

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry holding other voxels (a mask, probabilities)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array=array, affine=self.affine.copy(), source=self.source, header=self.header)

    def geometry(self) -> dict:
        """Plain-data description of the grid, for JSON sidecars."""
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "axcodes": self.axcodes,
            "affine": np.round(self.affine, 6).tolist(),
        }


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when two volumes share shape and (to ``atol`` mm) affine."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def case_name(path: str | Path) -> str:
    """The case id of an image path: file name without image suffixes (``ct.nii.gz`` -> ``ct``)."""
    p = Path(path)
    name = p.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_ct(path: str | Path, series_uid: str | None = None, *,
            min_extent_mm: float | None = MIN_LIVER_EXTENT_MM) -> Volume:
    """Read a CT image in Hounsfield units (float32) from NIfTI, NRRD/MHA or a DICOM folder.

    Refuses (LiversegError) damaged geometry, non-finite voxels and images thinner than
    ``min_extent_mm`` along any axis (None: any size, for reading slabs that are not segmented).
    """
    volume = _read_any(Path(path), series_uid, dtype=np.float32)
    check_extent(volume, min_extent_mm)
    return volume


def read_label(path: str | Path) -> Volume:
    """Read a label map as uint8 (values are checked by the caller against the declared labels)."""
    volume = _read_any(Path(path), None, dtype=None)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.allclose(rounded, array, atol=1e-3):
            raise LiversegError(
                "label map has non-integer values; pass a label map (0 background, 1 liver,"
                " 2 tumour), not an image",
                path,
            )
        array = rounded
    if array.min() < 0 or array.max() > 255:
        raise LiversegError(
            f"label values range {array.min()}..{array.max()}, outside 0..255; "
            "pass a label map (0 background, 1 liver, 2 tumour)",
            path,
        )
    volume.array = array.astype(np.uint8, copy=False)
    return volume


def _read_any(path: Path, series_uid: str | None, dtype: type | None) -> Volume:
    if not path.exists():
        raise LiversegError("file or folder not found; check the path", path)
    if path.is_dir():
        image, warnings = read_series(path, series_uid)
        volume = _from_sitk(image, str(path))
        volume.warnings = warnings
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        volume = _read_nifti(path, dtype)
    elif path.name.lower().endswith(ITK_SUFFIXES) or path.suffix.lower() == ".dcm":
        if path.suffix.lower() == ".dcm":
            check_dicom_file(path)
        volume = _from_sitk(_sitk_read(path), str(path))
    else:
        raise LiversegError(
            "unsupported file type; give a NIfTI (.nii, .nii.gz), NRRD, MHA/MHD file or a "
            "DICOM series folder",
            path,
        )
    volume.array = _as_3d(volume.array, path)
    check_affine(volume.affine, path)
    check_finite(volume.array, path)
    if dtype is not None and volume.array.dtype != dtype:
        volume.array = volume.array.astype(dtype)
    return volume


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    # Trailing singleton dimensions (x, y, z, 1) are common in NIfTI and harmless.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and min(array.shape) == 1):
        raise LiversegError(
            f"image is 2D (shape {tuple(array.shape)}); liverseg needs a 3D CT volume", path
        )
    if array.ndim != 3:
        raise LiversegError(
            f"image is {array.ndim}D (shape {tuple(array.shape)}); give a single 3D CT volume "
            "(split 4D/multi-channel files first)",
            path,
        )
    return array


def _load_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    """``nib.load``, except that a gzipped NIfTI is inflated in one go by ISA-L (``isal``), about
    twice as fast as the gzip module nibabel reads through. Whatever isal cannot inflate, or is
    not NIfTI inside, goes to ``nib.load`` as before, so bad files get nibabel's own errors."""
    if not path.name.lower().endswith(".gz"):
        return nib.load(str(path))
    try:
        raw = igzip.decompress(path.read_bytes())
    except (OSError, EOFError, isal_zlib.error):  # not gzip, truncated, corrupt: nibabel says
        return nib.load(str(path))
    header_size = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    if 348 in header_size:
        return nib.Nifti1Image.from_bytes(raw)
    if 540 in header_size:
        return nib.Nifti2Image.from_bytes(raw)
    return nib.load(str(path))


def _read_nifti(path: Path, dtype: type | None) -> Volume:
    try:
        warnings = check_nifti_header(raw_nifti_header(path), path)
        # nibabel logs its header fix-ups to stderr; the header was judged above instead.
        with _quiet_nibabel():
            image = _load_nifti(path)
            if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
                raise LiversegError("not a NIfTI image", path)
            # Integer labels stay integer; CT goes through the scaling (slope/intercept) to HU.
            if dtype is None and np.issubdtype(image.get_data_dtype(), np.integer) and not (
                _has_scaling(image)
            ):
                array = np.asarray(image.dataobj)
            else:
                array = np.asarray(image.get_fdata(dtype=np.float32))
    except LiversegError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise LiversegError(
            f"cannot read NIfTI ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated, re-export or re-download it",
            path,
        ) from None
    return Volume(array=array, affine=image.affine.astype(np.float64), source=str(path),
                  header=image.header.copy(), warnings=warnings)


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel's header fix-up messages off (its LoggingOutputSuppressor loses the handler)."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _has_scaling(image: nib.Nifti1Image) -> bool:
    slope, inter = image.header.get_slope_inter()
    return (slope not in (None, 1.0)) or (inter not in (None, 0.0))


def _sitk_read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown error"
        raise LiversegError(
            f"cannot read image ({first}); the file is corrupt or not a supported format", path
        ) from None


def _from_sitk(image: sitk.Image, source: str) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LiversegError(
            f"image has {image.GetNumberOfComponentsPerPixel()} channels; give a single-channel CT",
            source,
        )
    if image.GetDimension() != 3:
        raise LiversegError(
            f"image is {image.GetDimension()}D; liverseg needs a 3D CT volume", source
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z,y,x) -> (x,y,z)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return Volume(array=np.ascontiguousarray(array), affine=affine, source=source)


def write_mask(mask: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a uint8 mask on exactly the reference grid, atomically.

    The NIfTI header of a NIfTI reference is reused (same qform/sform and codes), so the mask's
    affine is bit-identical to the input's; other references get their affine as both qform and
    sform with code 1 (scanner coordinates).
    """
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from reference grid {reference.shape}")
    out = Path(path)
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise LiversegError("output mask must end in .nii or .nii.gz", out)
    data = np.ascontiguousarray(mask, dtype=np.uint8)
    if reference.header is not None:
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        image = nib.Nifti1Image(data, None, header=header)
        # Reuse the stored qform/sform verbatim rather than recomputing them from the affine.
        qform, qcode = reference.header.get_qform(coded=True)
        sform, scode = reference.header.get_sform(coded=True)
        if qform is not None and not np.isfinite(qform).all():
            qform = reference.affine  # a damaged qform beside the sform in use (read with a warning)
        image.set_qform(qform, int(qcode) if qcode is not None else 0)
        image.set_sform(sform, int(scode) if scode is not None else 0)
        if qform is None and sform is None:
            image.set_sform(reference.affine, 1)
    else:
        image = nib.Nifti1Image(data, reference.affine)
        image.set_qform(reference.affine, 1)
        image.set_sform(reference.affine, 1)
    image.header.set_xyzt_units("mm", "sec")
    save_nifti(image, out)
    return out


def save_nifti(image: nib.Nifti1Image, path: str | Path) -> None:
    """Write a NIfTI image atomically; ``.nii.gz`` is deflated in one go by ISA-L at level 1
    (a 512 x 512 x 129 mask: 0.01 s against nibabel's 0.07-0.3 s through the gzip module, and a
    smaller file). The bytes inside the gzip stream are nibabel's own single-file NIfTI."""
    with atomic_path(path) as tmp:
        if str(path).lower().endswith(".gz"):
            tmp.write_bytes(igzip.compress(image.to_bytes(), 1))
        else:
            nib.save(image, str(tmp))


def save_volume(volume: Volume, path: str | Path) -> Path:
    """Write any volume (e.g. a re-oriented test image) as NIfTI with its affine, atomically."""
    image = nib.Nifti1Image(np.asarray(volume.array), volume.affine)
    image.set_qform(volume.affine, 1)
    image.set_sform(volume.affine, 1)
    save_nifti(image, path)
    return Path(path)
