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
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from liverseg.config import IntensityConfig, PreprocessConfig
from liverseg.io import Volume, spacing_of
from liverseg.resample import (
    Box,
    axis_operator,
    box_in_target,
    resize_block,
    resize_native,
    rows_touching,
    world_resample,
    world_sample,
)


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
    # True: the native grid is oblique and the fields above describe the world-aligned grid it was
    # sampled onto (see to_model_space(upright=True)); native_* are the input's own grid.
    oblique: bool = False

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


def plan_geometry(volume: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, ...]]:
    """Orientation transform to RAS and the shape after reorientation."""
    transform = ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(cfg.orientation)))
    # apply_orientation on a zero-stride dummy gives the permuted shape without allocating.
    dummy = np.broadcast_to(np.zeros((), dtype=np.bool_), volume.shape)
    return transform, tuple(int(n) for n in apply_orientation(dummy, transform).shape)


def to_model_space(volume: Volume, cfg: PreprocessConfig, *, upright: bool = False
                   ) -> tuple[torch.Tensor, SpatialRecord]:
    """CT in HU -> (1, X, Y, Z) normalised float32 tensor in model space, and its record.

    ``upright``: an oblique volume is first sampled onto a world-aligned grid at the plan spacing
    (:func:`aligned_proxy`), so the network sees upright anatomy as in training; the record then
    says so (``oblique``), and :func:`to_native` samples straight back onto the oblique grid.
    """
    if upright and is_oblique(volume.affine):
        image, record = to_model_space(aligned_proxy(volume, cfg.target_spacing), cfg)
        record.native_shape = list(volume.shape)
        record.native_affine = np.asarray(volume.affine, dtype=np.float64).tolist()
        record.oblique = True
        return image, record
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
    best = probs[0]
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels.masked_fill_(better, c)
        if c + 1 < probs.shape[0]:
            best = torch.maximum(best, probs[c])
    return labels


def decide_labels(probs: torch.Tensor, nested: bool = False) -> torch.Tensor:
    """(C, ...) class probabilities (summing to 1 per voxel) -> uint8 labels.

    ``nested=False``: argmax. ``nested=True``: classes 1..C-1 nest inside one foreground
    (tumour inside liver), so foreground is decided first, as ``P(background) < 0.5``, and a
    foreground voxel takes its most likely foreground class.
    """
    if not nested or probs.shape[0] < 3:
        return argmax_channels(probs)
    labels = argmax_channels(probs[1:]).add_(1)
    return labels.masked_fill_(probs[0] >= 0.5, 0)


def label_to_model_space(label: np.ndarray, record: SpatialRecord, num_classes: int) -> np.ndarray:
    """A native label map -> model space labels (uint8), resampled through one-hot channels.

    Averaging one-hot channels and taking the argmax is a majority vote when downsampling and
    avoids the holes and stair-steps that nearest-neighbour sampling leaves in thin structures.
    """
    probs = label_to_model_probabilities(label, record, num_classes)
    return argmax_channels(probs).numpy()


def map_to_model_space(values: np.ndarray, record: SpatialRecord) -> torch.Tensor:
    """A native-grid float map (a one-hot channel, a probability) -> the model grid, as the image
    went: resized in the native axis order (area average down, linear up), reoriented, cropped."""
    transform = np.asarray(record.to_canonical)
    target = native_order(tuple(record.resampled_shape), transform)
    (x0, x1), (y0, y1), (z0, z1) = record.crop_box
    small = resize_native(np.asarray(values, dtype=np.float32), target)
    canonical = np.ascontiguousarray(apply_orientation(small, transform))
    return torch.from_numpy(canonical)[x0:x1, y0:y1, z0:z1]


def label_to_model_probabilities(label: np.ndarray, record: SpatialRecord,
                                 num_classes: int) -> torch.Tensor:
    label = np.asarray(label)
    # One foreground channel at a time, resized in the native axis order and reoriented when
    # small (see to_model_space): the peak is one native-size float channel, not all of them.
    # Background is 1 - the rest, exactly, since area averaging and linear interpolation are linear.
    channels = [map_to_model_space((label == c).astype(np.float32), record) for c in range(1, num_classes)]
    if channels:
        background = (1.0 - torch.stack(channels).sum(0)).clamp_(0.0, 1.0)
    else:
        background = torch.ones(tuple(b - a for a, b in record.crop_box))
    return torch.stack([background, *channels]).contiguous()


# --------------------------------------------------------------------------------------------
# Back to the native grid


@dataclass
class NativeLabels:
    """Labels on the native grid and the box of it outside which every label is background."""

    labels: np.ndarray  # uint8, the native grid's shape
    box: tuple[slice, slice, slice]  # native voxel ranges; empty when nothing can be foreground
    probabilities: torch.Tensor | None = None  # (C, native grid) float32, when asked for


def _foreground_box(probs: torch.Tensor, nested: bool) -> Box | None:
    """The box of the voxels whose label is not background, or None.

    Outside it, every voxel is background by a margin that resampling keeps: each native value is
    a convex combination of model-grid values, and ``P(background) >= 0.5`` (nested rule) or
    ``P(background) >= P(c)`` for every class (argmax) survives convex combinations.
    """
    candidate = decide_labels(probs, nested) > 0
    if not bool(candidate.any()):
        return None
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        found = torch.nonzero(candidate.any(dim=others[1]).any(dim=others[0])).flatten()
        box.append((int(found[0]), int(found[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


class _Separable:
    """Native values of a non-oblique record: the separable resize of :func:`resize_block`,
    worked out on the reoriented (canonical) grid; only uint8 labels or single slabs get reoriented."""

    def __init__(self, probs: torch.Tensor, record: SpatialRecord) -> None:
        self.record = record
        self.coarse = torch.zeros((probs.shape[0], *record.resampled_shape), dtype=torch.float32)
        self.coarse[0] = 1.0  # outside the body crop there is only background
        (x0, x1), (y0, y1), (z0, z1) = record.crop_box
        self.coarse[:, x0:x1, y0:y1, z0:z1] = probs
        self.shape = tuple(record.canonical_shape)
        self.operators = [axis_operator(n_in, n_out)
                          for n_in, n_out in zip(record.resampled_shape, self.shape, strict=True)]
        self.back = ornt_transform(axcodes2ornt("RAS"), io_orientation(np.asarray(record.native_affine)))

    def box_of(self, coarse_box: Box) -> Box:
        return tuple(rows_touching(op, start, stop)  # type: ignore[return-value]
                     for op, (start, stop) in zip(self.operators, coarse_box, strict=True))

    def values(self, box: Box) -> torch.Tensor:
        return resize_block(self.coarse, self.operators, box)

    def native(self, box: Box) -> tuple[slice, slice, slice]:
        transform = np.asarray(self.record.to_canonical)
        slices = []
        for axis, size in enumerate(self.record.native_shape):
            start, stop = box[int(transform[axis, 0])]
            flipped = transform[axis, 1] < 0
            slices.append(slice(size - stop, size - start) if flipped else slice(start, stop))
        return tuple(slices)  # type: ignore[return-value]

    def orient(self, array: np.ndarray) -> np.ndarray:
        return apply_orientation(array, self.back)


class _Oblique:
    """Native values of an oblique record: trilinear samples of the world-aligned model grid at
    the native voxels' world positions (one resampling, no intermediate grid)."""

    def __init__(self, probs: torch.Tensor, record: SpatialRecord) -> None:
        self.coarse = probs
        self.model_affine = np.asarray(record.model_affine)
        self.native_affine = np.asarray(record.native_affine)
        self.shape = tuple(record.native_shape)
        self.fill = [1.0] + [0.0] * (probs.shape[0] - 1)  # background outside the model grid

    def box_of(self, coarse_box: Box) -> Box:
        return box_in_target(coarse_box, self.model_affine, self.native_affine, self.shape)

    def values(self, box: Box) -> torch.Tensor:
        return world_sample(self.coarse, self.model_affine, self.native_affine, box, self.fill)

    def native(self, box: Box) -> tuple[slice, slice, slice]:
        return tuple(slice(start, stop) for start, stop in box)  # type: ignore[return-value]

    def orient(self, array: np.ndarray) -> np.ndarray:
        return array


def _slabs(box: Box, voxels: int) -> list[Box]:
    """``box`` cut along its last axis into slabs of about ``voxels`` voxels each."""
    (x0, x1), (y0, y1), (z0, z1) = box
    step = max(1, voxels // max(1, (x1 - x0) * (y1 - y0)))
    return [((x0, x1), (y0, y1), (k, min(z1, k + step))) for k in range(z0, z1, step)]


def to_native(probs: torch.Tensor, record: SpatialRecord, nested: bool = False, *,
              keep_probabilities: bool = False, slab_voxels: int = 1 << 21) -> NativeLabels:
    """(C, model grid) probabilities -> labels (and optionally probabilities) on the native grid.

    Probabilities, not model-resolution labels, are resampled and the labels decided on the native
    grid (:func:`decide_labels`), slab by slab (``slab_voxels`` per slab), and only inside the box
    where a label can differ from background (:func:`_foreground_box`): memory and time follow
    the slab and the liver, not the scan's length. Kept probabilities cover the whole grid.
    """
    sampler = _Oblique(probs, record) if record.oblique else _Separable(probs, record)
    labels = np.zeros(tuple(record.native_shape), dtype=np.uint8)
    coarse_box = _foreground_box(sampler.coarse, nested)
    box = sampler.box_of(coarse_box) if coarse_box is not None else None
    if box is not None and any(stop <= start for start, stop in box):
        box = None
    kept = None
    if keep_probabilities:  # everywhere, and the labels from exactly these values
        kept = torch.empty((probs.shape[0], *record.native_shape), dtype=torch.float32)
        whole: Box = tuple((0, n) for n in sampler.shape)  # type: ignore[assignment]
        for slab in _slabs(whole, slab_voxels):
            values = sampler.values(slab)
            target = sampler.native(slab)
            kept[(slice(None), *target)] = torch.from_numpy(
                np.stack([sampler.orient(channel) for channel in values.numpy()]))
            labels[target] = sampler.orient(decide_labels(values, nested).numpy())
    elif box is not None:
        for slab in _slabs(box, slab_voxels):
            labels[sampler.native(slab)] = sampler.orient(
                decide_labels(sampler.values(slab), nested).numpy())
    native_box = sampler.native(box) if box is not None else (slice(0, 0),) * 3
    return NativeLabels(labels=labels, box=native_box, probabilities=kept)


def probabilities_to_native(probs: torch.Tensor, record: SpatialRecord) -> torch.Tensor:
    """(C, model grid) class probabilities -> (C, native grid)."""
    native = to_native(probs, record, keep_probabilities=True).probabilities
    assert native is not None
    return native


def labels_to_native(probs: torch.Tensor, record: SpatialRecord, nested: bool = False) -> np.ndarray:
    """(C, model grid) probabilities -> uint8 labels on the native grid (see :func:`to_native`)."""
    return to_native(probs, record, nested).labels


# --------------------------------------------------------------------------------------------
# Oblique grids


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True when the voxel axes are not aligned with the world (RAS) axes up to permutation/flip."""
    directions = np.abs(np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return bool(np.any((directions > tol) & (directions < 1.0 - tol)))


def aligned_proxy(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """An oblique CT at ``spacing`` on a grid aligned with the world (RAS) axes covering it.

    The network learnt upright anatomy; feeding it an oblique grid unchanged would show it
    rotated anatomy. The volume is first area-averaged at ``spacing`` on its own grid
    (anti-aliasing, as the normal path does), then sampled trilinearly onto the aligned grid;
    outside the scan is air.
    """
    coarse_shape = resampled_shape(volume.shape, volume.spacing, spacing)
    coarse = resize_native(np.asarray(volume.array, dtype=np.float32), coarse_shape)
    coarse_affine = _affine_after_resize(volume.affine, volume.shape, coarse_shape)
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
    return Volume(array=array.numpy(), affine=affine, source=volume.source)
