"""Prediction on one CT volume, and the batch runner behind ``liverseg infer``.

One case runs: intensity sanity check -> model space (the bundle's plan: RAS, plan spacing, window,
body crop) -> MONAI ``sliding_window_inference`` (gaussian blending, windows on ``device``,
stitching in CPU memory), optionally averaged over flips -> class probabilities resampled once
up to the native grid, then argmax -> postprocessing -> statistics.

An oblique scan (voxel axes rotated against the patient/world axes) is first resampled onto a
world-aligned grid at the plan spacing, so the network sees upright anatomy as in training; its
probabilities come back through the same coarse oblique grid.

At 3 to 4 mm a body-cropped abdomen fits in a few windows of the plan's size; the window is
shrunk to the (stride-padded) image so a small image is not padded up to a full ROI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from liverseg.bundle import Bundle
from liverseg.config import PostprocessConfig
from liverseg.errors import LiversegError
from liverseg.io import NIFTI_SUFFIXES, Volume, case_name, write_mask, write_text_atomic
from liverseg.modelspace import (
    decide_labels,
    labels_to_native,
    probabilities_to_native,
    resize,
    to_model_space,
)
from liverseg.networks import network_stride
from liverseg.postprocess import LIVER, TUMOUR, postprocess_labels

DEFAULT_OUTPUT = Path("liverseg_out")
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


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
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


def check_ct_intensities(volume: Volume) -> None:
    """Refuse images that are not CT in Hounsfield units, before wasting time on them."""
    low, high = float(volume.array.min()), float(volume.array.max())
    if low > _CT_MAX_MINIMUM_HU or high - low < _CT_MIN_RANGE_HU:
        raise LiversegError(
            f"does not look like CT in Hounsfield units (intensities {low:g}..{high:g}, but CT "
            "has air/fat below -50 HU); give a CT with rescale slope/intercept applied, not MR "
            "or a normalised image", volume.source or None)


def _window(shape: tuple[int, ...], roi: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """The ROI shrunk to the image (rounded up to the network stride) where the image is smaller."""
    return tuple(min(r, -(-s // stride) * stride) for s, r in zip(shape, roi, strict=True))


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
                        sw_batch_size: int | None = None) -> torch.Tensor:
    """(1, X, Y, Z) model-space image -> (C, X, Y, Z) float32 softmax probabilities on the CPU."""
    from monai.inferers import sliding_window_inference

    plan = bundle.plan.infer
    overlap = plan.overlap if overlap is None else overlap
    if not 0.0 <= overlap < 1.0:
        raise LiversegError(f"overlap must be in [0, 1), got {overlap}")
    tta = plan.tta if tta is None else tta
    batch = plan.sw_batch_size if sw_batch_size is None else sw_batch_size
    roi = _window(tuple(image.shape[1:]), tuple(plan.roi_size), network_stride(bundle.plan.model))
    network = bundle.network
    net_device = next(network.parameters()).device
    if net_device.type != torch.device(device).type:
        network.to(device)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return torch.softmax(network(window), dim=1)

    x = image[None]
    total: torch.Tensor | None = None
    flips = _flips(tta, bundle)
    with torch.inference_mode():
        for axes in flips:
            inp = torch.flip(x, axes) if axes else x
            probs = sliding_window_inference(
                inp, roi_size=roi, sw_batch_size=batch, predictor=predictor, overlap=overlap,
                mode=plan.mode, sw_device=device, device="cpu")
            probs = torch.as_tensor(probs)  # a MetaTensor only when given one; keep plain tensors
            if axes:
                probs = torch.flip(probs, axes)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(flips) > 1:
            total.div_(len(flips))
        return total[0].float().contiguous()


def is_oblique(affine: np.ndarray, tol: float = 1e-3) -> bool:
    """True when the voxel axes are not aligned with the world (RAS) axes up to permutation/flip."""
    directions = np.abs(np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return bool(np.any((directions > tol) & (directions < 1.0 - tol)))


def _world_resample(source: torch.Tensor, source_affine: np.ndarray, target_affine: np.ndarray,
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


def _aligned_proxy(volume: Volume, spacing: tuple[float, float, float]
                   ) -> tuple[Volume, np.ndarray, tuple[int, int, int]]:
    """An oblique CT at ``spacing`` on a grid aligned with the world (RAS) axes covering it.

    The network learnt upright anatomy; feeding it an oblique grid unchanged would show it
    rotated anatomy. The volume is first area-averaged at ``spacing`` on its own grid
    (anti-aliasing, as the normal path does), then sampled trilinearly onto the aligned grid;
    outside the scan is air. Returns the proxy and the coarse grid (affine, shape) on which
    probabilities come back before the fast separable upsampling to the native grid.
    """
    from liverseg.modelspace import resampled_shape, resize_native

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
    array = _world_resample(torch.from_numpy(np.ascontiguousarray(coarse))[None], coarse_affine, affine,
                            shape, fill=[-1024.0])[0]
    return Volume(array=array.numpy(), affine=affine, source=volume.source), coarse_affine, coarse_shape


def volume_stats(volume: Volume, labels: np.ndarray) -> dict[str, float | None]:
    """Liver volume (liver + tumour, as in LiTS) and tumour volume in mL; mean HU of the liver
    parenchyma (label 1, tumours excluded)."""
    counts = np.bincount(labels.ravel(), minlength=3)
    voxel_ml = volume.voxel_volume_ml
    parenchyma = labels == LIVER
    mean_hu = float(volume.array[parenchyma].mean(dtype=np.float64)) if counts[LIVER] else None
    return {
        "liver_volume_ml": round(float(counts[LIVER] + counts[TUMOUR]) * voxel_ml, 3),
        "tumour_volume_ml": round(float(counts[TUMOUR]) * voxel_ml, 3),
        "mean_liver_hu": round(mean_hu, 2) if mean_hu is not None else None,  # None: no liver found
    }


def predict_volume(volume: Volume, bundle: Bundle, *, device: str = "cpu", overlap: float | None = None,
                   tta: bool | None = None, sw_batch_size: int | None = None,
                   keep_probabilities: bool = False, postprocess: PostprocessConfig | bool | None = None,
                   check_intensities: bool = True) -> Prediction:
    """Segment one CT volume with a bundle; labels come back on exactly the input's grid.

    ``overlap``, ``tta`` and ``sw_batch_size`` default to the bundle's plan. ``postprocess``:
    None uses the plan's choices, False turns all steps off, or pass a config.
    """
    timings: dict[str, float] = {}
    if check_intensities:
        check_ct_intensities(volume)
    oblique = is_oblique(volume.affine)
    probabilities: np.ndarray | None
    with _timed(timings, "preprocess"):
        source = volume
        if oblique:
            spacing = bundle.plan.preprocess.target_spacing
            source, coarse_affine, coarse_shape = _aligned_proxy(volume, spacing)
        image, record = to_model_space(source, bundle.plan.preprocess)
    with _timed(timings, "predict"):
        probs = model_probabilities(image, bundle, device=device, overlap=overlap, tta=tta,
                                    sw_batch_size=sw_batch_size)
    del image
    nested = bundle.plan.infer.nested_classes
    with _timed(timings, "resample"):
        # Probabilities go up to the native grid once; the labels are decided there.
        if oblique:
            aligned = probabilities_to_native(probs, record)  # on the small aligned proxy grid
            fill = [1.0] + [0.0] * (aligned.shape[0] - 1)
            # World-space sampling only on the coarse oblique grid; upsampling is separable.
            coarse = _world_resample(aligned, source.affine, coarse_affine, coarse_shape, fill)
            native = resize(coarse, volume.shape)
            labels = decide_labels(native, nested).numpy()
            probabilities = native.numpy() if keep_probabilities else None
            del native
        elif keep_probabilities:
            native = probabilities_to_native(probs, record)
            labels = decide_labels(native, nested).numpy()
            probabilities = native.numpy()
        else:
            labels = labels_to_native(probs, record, nested)
            probabilities = None
    del probs
    if postprocess is None:
        post_cfg = bundle.plan.postprocess
    elif postprocess is False:
        post_cfg = PostprocessConfig(largest_component=False, fill_holes=False, tumour_inside_liver=False)
    elif postprocess is True:
        post_cfg = PostprocessConfig()
    else:
        post_cfg = postprocess
    with _timed(timings, "postprocess"):
        labels = postprocess_labels(labels, post_cfg)
    with _timed(timings, "stats"):
        stats = volume_stats(volume, labels)
    return Prediction(labels=labels, probabilities=probabilities, timings=timings, stats=stats)


# --------------------------------------------------------------------------------------------
# Batch runner


@dataclass
class CaseResult:
    case: str
    input: str
    output: str
    status: str  # "done", "skipped" or "failed"
    error: str = ""
    seconds: float = 0.0


@dataclass
class InferReport:
    cases: list[CaseResult] = field(default_factory=list)
    model_id: str = ""
    model_version: str = ""

    def _with(self, status: str) -> list[CaseResult]:
        return [c for c in self.cases if c.status == status]

    @property
    def done(self) -> list[CaseResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[CaseResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseResult]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{len(self.done)} done, {len(self.skipped)} skipped (already finished), "
                f"{len(self.failed)} failed")

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "model_version": self.model_version,
                "done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "cases": [asdict(c) for c in self.cases]}


@dataclass(frozen=True)
class CaseJob:
    case: str
    image: Path
    mask: Path

    @property
    def sidecar(self) -> Path:
        return _sibling(self.mask, ".json")

    @property
    def probabilities(self) -> Path:
        return _sibling(self.mask, "_probabilities.nii.gz")

    @property
    def preview(self) -> Path:
        return _sibling(self.mask, ".png")


def _sibling(mask: Path, suffix: str) -> Path:
    name = mask.name
    for ext in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return mask.with_name(name + suffix)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N, as Slurm array and Kubernetes indexed-job indices) -> (I, N)."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise LiversegError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise LiversegError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return index, count


def collect_cases(inputs: list[Path]) -> list[tuple[str, Path]]:
    """(case name, image path) for every input file, DICOM series folder or folder of those."""
    from liverseg.datasets import find_dataset

    cases: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() != ".csv":
            cases.append((case_name(path), path))  # read (and judged) later, as its own case
            continue
        if not path.exists():
            raise LiversegError("input not found; check the path", path)
        dataset = find_dataset(path)
        cases.extend((c.case_id, c.image) for c in dataset.cases)
    names = [name for name, _ in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LiversegError(f"several inputs share the case name(s) {', '.join(duplicates[:5])}; "
                            "their outputs would overwrite each other, rename or run them apart")
    return cases


def plan_jobs(inputs: list[Path], output: Path | None, shard: tuple[int, int] | None = None) -> list[CaseJob]:
    """Where each case's mask goes: OUT itself for one input and OUT ending in .nii/.nii.gz,
    else OUT/<case>.nii.gz (default ./liverseg_out/)."""
    cases = collect_cases(inputs)
    single_file = output is not None and output.name.lower().endswith(NIFTI_SUFFIXES)
    if single_file and len(cases) != 1:
        raise LiversegError(f"-o names one mask file but there are {len(cases)} cases; give a folder",
                            output)
    folder = output if output is not None else DEFAULT_OUTPUT
    jobs = [CaseJob(name, image, output if single_file else folder / f"{name}.nii.gz")  # type: ignore[arg-type]
            for name, image in sorted(cases)]
    if shard is not None:
        index, count = shard
        jobs = jobs[index::count]
    return jobs


def _finished(job: CaseJob) -> bool:
    # The sidecar is written last (atomically), so its presence means the case is complete.
    return job.mask.is_file() and job.sidecar.is_file()


def _write_probabilities(probabilities: np.ndarray, reference: Volume, path: Path) -> None:
    """(C, x, y, z) probabilities as a 4D NIfTI (x, y, z, C) on the input grid, 8-bit with a
    scale factor of 1/255 (readers apply it), which keeps files small."""
    import nibabel as nib

    from liverseg.io import atomic_path

    data = np.clip(np.rint(np.moveaxis(probabilities, 0, -1) * 255.0), 0, 255).astype(np.uint8)
    image = nib.Nifti1Image(data, reference.affine)
    image.set_qform(reference.affine, 1)
    image.set_sform(reference.affine, 1)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def infer_case(job: CaseJob, bundle: Bundle, *, device: str = "cpu", overlap: float | None = None,
               tta: bool | None = None, sw_batch_size: int | None = None,
               save_probabilities: bool = False, preview: bool = False,
               postprocess: bool = True) -> dict:
    """Read, predict and write one case (mask, optional probabilities and preview, sidecar)."""
    from liverseg import __version__
    from liverseg.io import read_ct

    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _timed(timings, "read"):
        volume = read_ct(job.image)
    prediction = predict_volume(volume, bundle, device=device, overlap=overlap, tta=tta,
                                sw_batch_size=sw_batch_size, keep_probabilities=save_probabilities,
                                postprocess=None if postprocess else False)
    timings.update(prediction.timings)
    written: list[Path] = []
    try:
        with _timed(timings, "write"):
            write_mask(prediction.labels, volume, job.mask)
            written.append(job.mask)
            if prediction.probabilities is not None:
                _write_probabilities(prediction.probabilities, volume, job.probabilities)
                written.append(job.probabilities)
        if preview:
            from liverseg.pictures import save_overlay_png

            with _timed(timings, "preview"):
                save_overlay_png(volume.array, prediction.labels, volume.spacing, job.preview,
                                 title=f"{job.case} ({bundle.model_id})", affine=volume.affine)
                written.append(job.preview)
    except BaseException:
        for path in written:  # a failed case leaves no outputs behind
            path.unlink(missing_ok=True)
        raise
    timings["total"] = round(time.perf_counter() - start, 4)
    sidecar = {
        "case": job.case,
        "input": str(job.image),
        "mask": str(job.mask),
        "labels": {str(k): v for k, v in bundle.plan.labels.items()},
        **prediction.stats,
        "seconds": timings,
        "model_id": bundle.model_id,
        "model_version": bundle.model_version,
        "model_path": str(bundle.path),
        "liverseg_version": __version__,
        "device": device,
        "geometry": volume.geometry(),
    }
    if save_probabilities:
        sidecar["probabilities"] = str(job.probabilities)
    if preview:
        sidecar["preview"] = str(job.preview)
    write_text_atomic(job.sidecar, json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def run_inference(inputs: list[Path], output: Path | None, *, model: Path | None = None,
                  device: str = "auto", overlap: float | None = None, tta: bool | None = None,
                  sw_batch_size: int | None = None, save_probabilities: bool = False,
                  preview: bool = False, shard: tuple[int, int] | None = None, force: bool = False,
                  postprocess: bool = True,
                  progress: Callable[[Iterable[CaseJob], int], Iterable[CaseJob]] | None = None,
                  on_error: Callable[[CaseResult], None] | None = None) -> InferReport:
    """Segment every case; finished cases are skipped unless ``force``; a failing case is recorded
    and the batch goes on. Setup errors (no model, no inputs) raise LiversegError before any write.
    """
    from liverseg.bundle import load_bundle

    device = resolve_device(device)
    jobs = plan_jobs(inputs, output, shard)
    bundle = load_bundle(model, device=device)
    report = InferReport(model_id=bundle.model_id, model_version=bundle.model_version)
    iterable: Iterable[CaseJob] = progress(jobs, len(jobs)) if progress is not None else jobs
    for job in iterable:
        if not force and _finished(job):
            report.cases.append(CaseResult(job.case, str(job.image), str(job.mask), "skipped"))
            continue
        start = time.perf_counter()
        try:
            infer_case(job, bundle, device=device, overlap=overlap, tta=tta, sw_batch_size=sw_batch_size,
                       save_probabilities=save_probabilities, preview=preview, postprocess=postprocess)
        except LiversegError as exc:
            result = CaseResult(job.case, str(job.image), str(job.mask), "failed", str(exc))
        except (RuntimeError, ValueError, MemoryError, OSError) as exc:
            # Not a user error we foresaw; still one line, and the batch goes on.
            message = " ".join(f"{job.image}: {type(exc).__name__}: {exc}".split())[:400]
            result = CaseResult(job.case, str(job.image), str(job.mask), "failed", message)
        else:
            result = CaseResult(job.case, str(job.image), str(job.mask), "done",
                                seconds=round(time.perf_counter() - start, 3))
        report.cases.append(result)
        if result.status == "failed" and on_error is not None:
            on_error(result)
    return report
