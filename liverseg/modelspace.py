"""Native CT grid <-> model space, and back, exactly.

Model space is the input's voxel grid reoriented to RAS (a permutation/flip of axes, so oblique
inputs stay oblique and nothing is interpolated by it), resampled to the plan's spacing and
cropped to the body. :class:`SpatialRecord` holds everything needed to put model-space arrays
(labels or class probabilities) back onto the original grid, and is plain data for JSON sidecars.

Resampling keeps the two grids' extents identical (voxel-corner alignment, ``align_corners=False``):
the model grid's voxel centres lie at ``(i + 0.5) * native_shape / model_shape - 0.5`` in native
voxel units, which the inverse uses as is. Downsampling averages (area), which anti-aliases;
upsampling is trilinear.

An oblique input (voxel axes rotated against the world axes) needs more than that: the network
learnt upright anatomy, so :func:`aligned_proxy` first samples it onto a world-aligned grid
(:func:`world_resample`), and probabilities come back by sampling at the same world positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from liverseg.config import IntensityConfig, PreprocessConfig
from liverseg.io import Volume, spacing_of


@dataclass
class SpatialRecord:
    """How a native grid became the model grid (everything needed to undo it)."""

    native_shape: list[int]
    native_affine: list[list[float]]
    to_canonical: list[list[float]]  # nibabel orientation transform native -> RAS
    canonical_shape: list[int]
    resampled_shape: list[int]
    crop_box: list[list[int]]  # [[start, stop], ...] in the resampled grid
    model_affine: list[list[float]]

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.crop_box)  # type: ignore[return-value]

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return spacing_of(np.asarray(self.model_affine))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpatialRecord:
        return cls(**data)


def resize(array: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize a (C, X, Y, Z) float tensor to ``shape`` with aligned grid extents.

    Axes that shrink are area-averaged first (anti-aliasing), axes that grow are then
    interpolated trilinearly; both use the same voxel-corner alignment.
    """
    src = tuple(array.shape[1:])
    shape = tuple(int(s) for s in shape)
    if src == shape:
        return array
    x = array.unsqueeze(0)
    shrunk = tuple(min(s, t) for s, t in zip(src, shape, strict=True))
    if shrunk != src:
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != shape:
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x[0]


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...],
                    target: tuple[float, ...]) -> tuple[int, int, int]:
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))  # type: ignore[return-value]


def normalise_intensity(hu: np.ndarray | torch.Tensor, cfg: IntensityConfig) -> torch.Tensor:
    """HU -> network input, as float32 (window to [0, 1], or clipped z-score)."""
    x = torch.as_tensor(hu, dtype=torch.float32)
    x = x.clamp(cfg.lower, cfg.upper)
    if cfg.mode == "window":
        low, high = cfg.window_range
        return (x - cfg.lower) * ((high - low) / (cfg.upper - cfg.lower)) + low
    if cfg.mean is None or cfg.std is None or cfg.std <= 0:
        raise ValueError("intensity.mode zscore needs mean and std (take them from the fingerprint)")
    return (x - cfg.mean) / cfg.std


def intensity_to_hu(x: torch.Tensor, cfg: IntensityConfig) -> torch.Tensor:
    """The inverse of :func:`normalise_intensity` inside [lower, upper] HU (clipped values stay
    at the window's edges): augmentations that speak HU work on network input through it."""
    if cfg.mode == "window":
        low, high = cfg.window_range
        return (x - low) * ((cfg.upper - cfg.lower) / (high - low)) + cfg.lower
    if cfg.mean is None or cfg.std is None:
        raise ValueError("intensity.mode zscore needs mean and std (take them from the fingerprint)")
    return x * cfg.std + cfg.mean


def _body_box(hu: torch.Tensor, cfg: PreprocessConfig) -> list[list[int]]:
    """Bounding box (with margin) of the largest connected region above the body threshold."""
    shape = tuple(hu.shape)
    full = [[0, n] for n in shape]
    if not cfg.crop_body:
        return full
    # The body is found on every second voxel: its box is as good once the margin covers the
    # coarser step, and the opening and labelling cost an eighth.
    step = 2 if min(shape) >= 32 else 1
    body = (hu[::step, ::step, ::step] > cfg.body_threshold_hu).numpy()
    # An opening detaches the table and thin clothing from the body before picking the largest.
    body = ndimage.binary_opening(body, iterations=1)
    labels, count = ndimage.label(body)
    if count == 0:
        return full
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    slices = ndimage.find_objects(labels)[int(sizes.argmax()) - 1]  # boxes of all, no mask copy
    m = cfg.crop_margin_vox + step - 1
    return [[max(0, s.start * step - m), min(n, s.stop * step + m)]
            for s, n in zip(slices, shape, strict=True)]


def _affine_after_resize(affine: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    scale = np.array(src, dtype=np.float64) / np.array(dst, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1.0) / 2.0
    return affine @ index_map


def _affine_after_crop(affine: np.ndarray, box: list[list[int]]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [start for start, _ in box]
    return affine @ shift


def native_order(shape: tuple[int, ...], transform: np.ndarray) -> tuple[int, int, int]:
    """A canonical-order shape in the native axis order (``transform`` maps native -> canonical)."""
    return tuple(int(shape[int(transform[i, 0])]) for i in range(3))  # type: ignore[return-value]


def resize_native(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a 3D float32 array to ``shape`` (as :func:`resize`), whatever its memory order.

    nibabel gives Fortran-ordered arrays; their transpose is a C-ordered view, and resizing that
    view (with the shape reversed) avoids a full-size copy and is about 3x faster.
    """
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        out = resize(torch.from_numpy(array.T)[None], tuple(reversed(shape)))[0]
        return out.numpy().T
    return resize(torch.from_numpy(np.ascontiguousarray(array))[None], tuple(shape))[0].numpy()


def plan_geometry(volume: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, ...]]:
    """Orientation transform to RAS and the shape after reorientation."""
    transform = ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(cfg.orientation)))
    # apply_orientation on a zero-stride dummy gives the permuted shape without allocating.
    dummy = np.broadcast_to(np.zeros((), dtype=np.bool_), volume.shape)
    return transform, tuple(int(n) for n in apply_orientation(dummy, transform).shape)


def to_model_space(volume: Volume, cfg: PreprocessConfig) -> tuple[torch.Tensor, SpatialRecord]:
    """CT in HU -> (1, X, Y, Z) normalised float32 tensor in model space, and its record."""
    transform, canonical_shape = plan_geometry(volume, cfg)
    canonical_affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    target_shape = resampled_shape(canonical_shape, spacing_of(canonical_affine), cfg.target_spacing)
    # Resize first, then reorient the small result: both resizes are separable and symmetric under
    # axis flips, so the order does not matter, and reorienting (copying) a full-size volume with
    # flipped strides costs more than the resampling itself.
    small = resize_native(np.asarray(volume.array, dtype=np.float32),
                          native_order(target_shape, transform))
    hu = torch.from_numpy(np.ascontiguousarray(apply_orientation(small, transform)))
    box = _body_box(hu, cfg)
    hu = hu[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
    image = normalise_intensity(hu, cfg.intensity)[None].contiguous()
    model_affine = _affine_after_crop(
        _affine_after_resize(canonical_affine, canonical_shape, target_shape), box)
    record = SpatialRecord(
        native_shape=list(volume.shape),
        native_affine=np.asarray(volume.affine, dtype=np.float64).tolist(),
        to_canonical=transform.tolist(),
        canonical_shape=list(canonical_shape),
        resampled_shape=list(target_shape),
        crop_box=box,
        model_affine=model_affine.tolist(),
    )
    return image, record


def argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the first (channel) axis as uint8.

    A running comparison over the few channels; torch's argmax over a leading axis of a
    large 3D volume is about 20x slower on CPU. Ties go to the lower class, as with argmax.
    """
    best = probs[0].clone()
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        torch.maximum(best, probs[c], out=best)
    return labels


def decide_labels(probs: torch.Tensor, nested: bool = False) -> torch.Tensor:
    """(C, ...) class probabilities (summing to 1 per voxel) -> uint8 labels.

    ``nested=False``: argmax. ``nested=True``: classes 1..C-1 nest inside one foreground
    (tumour inside liver), so foreground is decided first, as ``P(background) < 0.5``, and a
    foreground voxel takes its most likely foreground class.
    """
    if not nested or probs.shape[0] < 3:
        return argmax_channels(probs)
    labels = argmax_channels(probs[1:]) + 1
    labels[probs[0] >= 0.5] = 0
    return labels


def label_to_model_space(label: np.ndarray, record: SpatialRecord, num_classes: int) -> np.ndarray:
    """A native label map -> model space labels (uint8), resampled through one-hot channels.

    Averaging one-hot channels and taking the argmax is a majority vote when downsampling and
    avoids the holes and stair-steps that nearest-neighbour sampling leaves in thin structures.
    """
    probs = label_to_model_probabilities(label, record, num_classes)
    return argmax_channels(probs).numpy()


def label_to_model_probabilities(label: np.ndarray, record: SpatialRecord,
                                 num_classes: int) -> torch.Tensor:
    transform = np.asarray(record.to_canonical)
    target = native_order(tuple(record.resampled_shape), transform)
    (x0, x1), (y0, y1), (z0, z1) = record.crop_box
    label = np.asarray(label)
    # One foreground channel at a time, resized in the native axis order and reoriented when
    # small (see to_model_space): the peak is one native-size float channel, not all of them.
    # Background is 1 - the rest, exactly, since area averaging and linear interpolation are linear.
    channels = []
    for c in range(1, num_classes):
        onehot = resize_native((label == c).astype(np.float32), target)
        canonical = np.ascontiguousarray(apply_orientation(onehot, transform))
        channels.append(torch.from_numpy(canonical)[x0:x1, y0:y1, z0:z1])
    if channels:
        background = (1.0 - torch.stack(channels).sum(0)).clamp_(0.0, 1.0)
    else:
        background = torch.ones(tuple(b - a for a, b in record.crop_box))
    return torch.stack([background, *channels]).contiguous()


def _canonical_probabilities(probs: torch.Tensor, record: SpatialRecord) -> torch.Tensor:
    """(C, model grid) -> (C, reoriented native grid), background outside the body crop."""
    num_classes = probs.shape[0]
    full = torch.zeros((num_classes, *record.resampled_shape), dtype=probs.dtype)
    full[0] = 1.0  # outside the body crop there is only background
    (x0, x1), (y0, y1), (z0, z1) = record.crop_box
    full[:, x0:x1, y0:y1, z0:z1] = probs
    return resize(full, tuple(record.canonical_shape))


def _from_canonical(array: np.ndarray, record: SpatialRecord) -> np.ndarray:
    """Undo the reorientation of a 3D array: canonical (RAS) axes -> the input's own axes."""
    native_ornt = io_orientation(np.asarray(record.native_affine))
    back = ornt_transform(axcodes2ornt("RAS"), native_ornt)
    return np.ascontiguousarray(apply_orientation(array, back))


def probabilities_to_native(probs: torch.Tensor, record: SpatialRecord) -> torch.Tensor:
    """(C, model grid) class probabilities -> (C, native grid)."""
    canonical = _canonical_probabilities(probs, record).numpy()
    return torch.from_numpy(np.stack([_from_canonical(c, record) for c in canonical]))


def labels_to_native(probs: torch.Tensor, record: SpatialRecord, nested: bool = False) -> np.ndarray:
    """(C, model grid) probabilities -> uint8 labels on the native grid.

    Probabilities (not model-resolution labels) are resampled, then the labels are decided
    (``decide_labels``); the reorientation is a pure axis permutation/flip, so it is applied
    to the cheap uint8 result.
    """
    canonical = decide_labels(_canonical_probabilities(probs, record), nested).numpy()
    return _from_canonical(canonical, record)


# --------------------------------------------------------------------------------------------
# Oblique grids


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True when the voxel axes are not aligned with the world (RAS) axes up to permutation/flip."""
    directions = np.abs(np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return bool(np.any((directions > tol) & (directions < 1.0 - tol)))


def world_resample(source: torch.Tensor, source_affine: np.ndarray, target_affine: np.ndarray,
                    target_shape: tuple[int, ...], fill: list[float], chunk: int = 8) -> torch.Tensor:
    """(C, source grid) -> (C, target grid) by trilinear sampling at the same world positions;
    ``fill[c]`` outside the source. Works in slabs of ``chunk`` slices to bound memory."""
    index_map = torch.as_tensor(np.linalg.inv(source_affine) @ target_affine, dtype=torch.float32)
    channels = source.shape[0]
    src = (source - torch.tensor(fill, dtype=source.dtype).view(-1, 1, 1, 1))[None]
    sizes = torch.tensor(source.shape[1:], dtype=torch.float32)
    scale = 2.0 / torch.clamp(sizes - 1.0, min=1.0)
    out = torch.empty((channels, *target_shape), dtype=torch.float32)
    i, j = torch.meshgrid(torch.arange(target_shape[0], dtype=torch.float32),
                          torch.arange(target_shape[1], dtype=torch.float32), indexing="ij")
    for k0 in range(0, target_shape[2], chunk):
        k1 = min(target_shape[2], k0 + chunk)
        k = torch.arange(k0, k1, dtype=torch.float32)
        ijk = torch.stack(torch.broadcast_tensors(i[..., None], j[..., None], k), dim=-1)
        coords = ijk @ index_map[:3, :3].T + index_map[:3, 3]  # source voxel indices
        grid = (coords * scale - 1.0).flip(-1)[None]  # grid_sample wants (z, y, x) = (W, H, D)
        sampled = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=True)
        out[:, :, :, k0:k1] = sampled[0]
    return out.add_(torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1, 1))


def aligned_proxy(volume: Volume, spacing: tuple[float, float, float]
                   ) -> tuple[Volume, np.ndarray, tuple[int, int, int]]:
    """An oblique CT at ``spacing`` on a grid aligned with the world (RAS) axes covering it.

    The network learnt upright anatomy; feeding it an oblique grid unchanged would show it
    rotated anatomy. The volume is first area-averaged at ``spacing`` on its own grid
    (anti-aliasing, as the normal path does), then sampled trilinearly onto the aligned grid;
    outside the scan is air. Returns the proxy and the coarse grid (affine, shape) on which
    probabilities come back before the fast separable upsampling to the native grid.
    """
    coarse_shape = resampled_shape(volume.shape, volume.spacing, spacing)
    coarse = resize_native(np.asarray(volume.array, dtype=np.float32), coarse_shape)
    scale = np.array(volume.shape, dtype=np.float64) / np.array(coarse_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1.0) / 2.0
    coarse_affine = volume.affine @ index_map
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, volume.shape[0] - 0.5)
                        for b in (-0.5, volume.shape[1] - 0.5) for c in (-0.5, volume.shape[2] - 0.5)])
    world = (volume.affine @ corners.T)[:3]
    low, high = world.min(axis=1), world.max(axis=1)
    step = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(np.ceil((h - lo) / s)) for lo, h, s in zip(low, high, step, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(step)
    affine[:3, 3] = low + 0.5 * step
    array = world_resample(torch.from_numpy(np.ascontiguousarray(coarse))[None], coarse_affine, affine,
                            shape, fill=[-1024.0])[0]
    return Volume(array=array.numpy(), affine=affine, source=volume.source), coarse_affine, coarse_shape
