"""Prediction on one CT volume (the batch runner behind ``liverseg infer`` is :mod:`liverseg.batch`).

One case runs: intensity sanity check -> model space (the bundle's plan: RAS, plan spacing, window,
body crop) -> MONAI ``sliding_window_inference`` (gaussian blending, windows on ``device``,
stitching in CPU memory), optionally averaged over flips -> class probabilities resampled once
to the native grid where they can change the labels, which are decided there -> postprocessing
and statistics on the foreground's box. All geometry (oblique scans included) is
:mod:`liverseg.modelspace`'s.

At 3 to 4 mm a body-cropped abdomen fits in a few windows of the plan's size; the window is
shrunk to the (stride-padded) image so a small image is not padded up to a full ROI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from liverseg import qc
from liverseg.bundle import Bundle
from liverseg.config import PostprocessConfig
from liverseg.errors import LiversegError
from liverseg.io import Volume
from liverseg.modelspace import SpatialRecord, to_model_space, to_native
from liverseg.networks import cpu_computes_bf16, network_margin, network_stride
from liverseg.postprocess import LIVER, TUMOUR, postprocess_labels

# Thresholds of the "is this CT in HU?" check: any CT of a body holds air or fat (< -50 HU);
# MR, PET, unrescaled DICOM values (0..4095) and normalised images do not.
_CT_MAX_MINIMUM_HU = -50.0
_CT_MIN_RANGE_HU = 200.0


@dataclass
class Prediction:
    """The result for one volume; ``labels`` lie on the input's native grid."""

    labels: np.ndarray  # uint8 (x, y, z), after postprocessing
    probabilities: np.ndarray | None  # float32 (C, x, y, z) before postprocessing, if kept
    timings: dict[str, float]  # seconds per stage
    stats: dict[str, float | None]  # liver/tumour volume (mL), mean liver HU (None: no liver)
    qc: dict = field(default_factory=dict)  # liverseg.qc.assess: {"flags": [...], "measures": {...}}
    # Where per-case extras (QC, reports) find what the labels were made from: the native box
    # outside which every label is background, and the network's output in model space (C, model
    # grid, float32) with the record that maps it to the native grid.
    box: tuple[slice, ...] = (slice(None),) * 3
    model_probabilities: torch.Tensor | None = None
    record: SpatialRecord | None = None
    precision: str = "float32"  # the network's arithmetic (resolve_precision)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 4)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a one-line error for an unusable device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LiversegError(f"device '{device}' requested but no CUDA GPU is available; "
                            "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise LiversegError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The plan's or user's ``infer.precision`` for ``device``: "auto" becomes "bfloat16" where the
    device computes it natively, "float32" elsewhere (emulated bfloat16 would be slower)."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = cpu_computes_bf16()
    return "bfloat16" if native else "float32"


def check_ct_intensities(volume: Volume) -> None:
    """Refuse images that are not CT in Hounsfield units, before wasting time on them."""
    low, high = float(volume.array.min()), float(volume.array.max())
    if low > _CT_MAX_MINIMUM_HU or high - low < _CT_MIN_RANGE_HU:
        raise LiversegError(
            f"does not look like CT in Hounsfield units (intensities {low:g}..{high:g}, but CT "
            "has air/fat below -50 HU); give a CT with rescale slope/intercept applied, not MR "
            "or a normalised image", volume.source or None)


def _window(shape: tuple[int, ...], roi: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """The ROI shrunk to the image (rounded up to the network stride) where the image is smaller.

    ``shape`` is the image as the windows see it (padded by the network's margin, if any).
    """
    return tuple(min(r, -(-s // stride) * stride) for s, r in zip(shape, roi, strict=True))


def _interior_weights(roi: tuple[int, ...], margin: int, mode: str) -> torch.Tensor:
    """(1, 1, *roi) blending weights: the plan's mode over the part a window predicts, zero on the
    ``margin`` band that a smaller-output network does not predict."""
    from monai.data.utils import compute_importance_map

    interior = tuple(r - 2 * margin for r in roi)
    weights = compute_importance_map(interior, mode=mode, device="cpu").float()
    return torch.nn.functional.pad(weights, [margin] * 6)[None, None]


def _flips(tta: bool, bundle: Bundle) -> list[tuple[int, ...]]:
    """Spatial flips for test-time augmentation: the identity and one flip per mirrored axis.

    Only axes the model was trained mirrored on (``train.flip_axes`` in its plan) are used: a
    network that never saw a mirrored liver would be averaged with nonsense. One flip per axis
    rather than nnU-Net's eight combinations keeps the CPU cost bounded.
    """
    if not tta:
        return [()]
    axes = sorted(set(bundle.plan.train.flip_axes))
    if not axes:
        raise LiversegError("this model was trained without mirroring, so flip test-time "
                            "augmentation would only hurt; run without --tta", bundle.path)
    return [(), *((axis + 2,) for axis in axes)]


def model_probabilities(image: torch.Tensor, bundle: Bundle, *, device: str = "cpu",
                        overlap: float | None = None, tta: bool | None = None,
                        sw_batch_size: int | None = None, precision: str | None = None) -> torch.Tensor:
    """(1, X, Y, Z) model-space image -> (C, X, Y, Z) float32 softmax probabilities on the CPU.
    ``precision`` (default: the plan's) is the network's arithmetic (:func:`resolve_precision`)."""
    from monai.inferers import sliding_window_inference

    plan = bundle.plan.infer
    overlap = plan.overlap if overlap is None else overlap
    if not 0.0 <= overlap < 1.0:
        raise LiversegError(f"overlap must be in [0, 1), got {overlap}")
    tta = plan.tta if tta is None else tta
    batch = plan.sw_batch_size if sw_batch_size is None else sw_batch_size
    # A network whose output is `margin` voxels smaller per side sees the image padded by that much
    # (with 0, what the sliding window pads with too); each window then predicts its interior only,
    # which the blending weights say, and windows overlap at least enough to cover every voxel.
    margin = network_margin(bundle.plan.model)
    x = torch.nn.functional.pad(image, [margin] * 6)[None] if margin else image[None]
    roi = tuple(plan.roi_size) if plan.fixed_window else _window(
        tuple(x.shape[2:]), tuple(plan.roi_size), network_stride(bundle.plan.model))
    weights = _interior_weights(roi, margin, plan.mode) if margin else None
    overlaps = tuple(max(overlap, 2 * margin / r + 1e-6) for r in roi) if margin else overlap
    network = bundle.network
    net_device = next(network.parameters()).device
    if net_device.type != torch.device(device).type:
        network.to(device)

    low_precision = resolve_precision(precision or plan.precision, device) == "bfloat16"
    device_type = torch.device(device).type

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=low_precision):
            logits = network(window)
        probabilities = torch.softmax(logits.float(), dim=1)
        return torch.nn.functional.pad(probabilities, [margin] * 6) if margin else probabilities

    total: torch.Tensor | None = None
    flips = _flips(tta, bundle)
    with torch.inference_mode():
        for axes in flips:
            inp = torch.flip(x, axes) if axes else x
            probs = sliding_window_inference(
                inp, roi_size=roi, sw_batch_size=batch, predictor=predictor, overlap=overlaps,
                mode=plan.mode, sw_device=device, device="cpu", roi_weight_map=weights)
            probs = torch.as_tensor(probs)  # a MetaTensor only when given one; keep plain tensors
            if axes:
                probs = torch.flip(probs, axes)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(flips) > 1:
            total.div_(len(flips))
        if margin:
            total = total[..., margin:-margin, margin:-margin, margin:-margin]
        return total[0].float().contiguous()


def volume_stats(volume: Volume, labels: np.ndarray,
                 box: tuple[slice, ...] | None = None) -> dict[str, float | None]:
    """Liver volume (liver + tumour, as in LiTS) and tumour volume in mL; mean HU of the liver
    parenchyma (label 1, tumours excluded). ``box``: where all the foreground lies (counted there
    only, which is the same and much cheaper on a long scan)."""
    box = box if box is not None else (slice(None),) * 3
    sub = labels[box]
    counts = np.bincount(sub.ravel(), minlength=3)
    voxel_ml = volume.voxel_volume_ml
    # float32 values, summed pairwise by NumPy: accurate to far below the 0.01 HU reported.
    mean_hu = float(volume.array[box][sub == LIVER].mean()) if counts[LIVER] else None
    return {
        "liver_volume_ml": round(float(counts[LIVER] + counts[TUMOUR]) * voxel_ml, 3),
        "tumour_volume_ml": round(float(counts[TUMOUR]) * voxel_ml, 3),
        "mean_liver_hu": round(mean_hu, 2) if mean_hu is not None else None,  # None: no liver found
    }


def _postprocess_config(bundle: Bundle, postprocess: PostprocessConfig | bool | None) -> PostprocessConfig:
    if postprocess is None:
        return bundle.plan.postprocess
    if postprocess is False:
        return PostprocessConfig(largest_component=False, fill_holes=False, tumour_inside_liver=False)
    if postprocess is True:
        return PostprocessConfig()
    return postprocess


def predict_volume(volume: Volume, bundle: Bundle, *, device: str = "cpu", overlap: float | None = None,
                   tta: bool | None = None, sw_batch_size: int | None = None,
                   keep_probabilities: bool = False, postprocess: PostprocessConfig | bool | None = None,
                   check_intensities: bool = True, contrast: bool | None = None,
                   precision: str | None = None,
                   on_predicted: Callable[[], None] | None = None) -> Prediction:
    """Segment one CT volume with a bundle; labels come back on exactly the input's grid.

    ``overlap``, ``tta`` and ``sw_batch_size`` default to the bundle's plan. ``postprocess``:
    None uses the plan's choices, False turns all steps off, or pass a config. ``contrast``
    (True: contrast-enhanced, None: unknown) sets the HU range the QC expects of the liver.
    ``precision``: the network's arithmetic, default the plan's (:func:`resolve_precision`).
    ``on_predicted`` is called once the network is done (the batch runner starts reading the next
    CT then, beside the single-threaded stages that follow).
    """
    timings: dict[str, float] = {}
    precision = resolve_precision(precision or bundle.plan.infer.precision, device)
    if check_intensities:
        check_ct_intensities(volume)
    with timed(timings, "preprocess"):
        image, record = to_model_space(volume, bundle.plan.preprocess, upright=True)
    with timed(timings, "predict"):
        probs = model_probabilities(image, bundle, device=device, overlap=overlap, tta=tta,
                                    sw_batch_size=sw_batch_size, precision=precision)
    del image
    if on_predicted is not None:
        on_predicted()
    nested = bundle.plan.infer.nested_classes
    with timed(timings, "qc"):  # on the small model grid, before postprocessing
        model_qc = qc.model_space_measures(probs, record.model_spacing, nested)
    with timed(timings, "resample"):
        # Probabilities go to the native grid once, where the labels are decided; only inside
        # the box where anything but background is possible, unless all probabilities are kept.
        native = to_native(probs, record, nested, keep_probabilities=keep_probabilities)
    labels, box = native.labels, native.box
    with timed(timings, "postprocess"):
        # Postprocessing is local to the foreground: on its box it gives what it gives on the grid.
        labels[box] = postprocess_labels(labels[box], _postprocess_config(bundle, postprocess))
    with timed(timings, "stats"):
        stats = volume_stats(volume, labels, box)
    with timed(timings, "qc"):
        case_qc = qc.assess(volume, labels, model_qc, stats, contrast=contrast)
    probabilities = native.probabilities.numpy() if native.probabilities is not None else None
    return Prediction(labels=labels, probabilities=probabilities, timings=timings, stats=stats,
                      qc=case_qc, box=box, model_probabilities=probs, record=record,
                      precision=precision)
