"""Typed configuration: YAML recipes in ``configs/`` validated into pydantic models.

Configuration is plain data. Unknown keys are errors (a typo must not be silently ignored), and
command-line overrides use dotted keys: ``--set train.iterations=200``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from liverseg.errors import LiversegError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class IntensityConfig(_Strict):
    """How HU become network input.

    ``window``: clip to [lower, upper] HU and scale linearly onto ``window_range`` (MONAI
    ScaleIntensityRange; [0, 1] by default).
    ``zscore``: clip to [lower, upper] (foreground percentiles from the fingerprint) then
    subtract ``mean`` and divide by ``std`` (nnU-Net's CT normalisation).
    """

    mode: Literal["window", "zscore"] = "window"
    lower: float = -175.0
    upper: float = 250.0
    mean: float | None = None
    std: float | None = None
    # Where the window lands. Imported networks keep their own convention: Tang et al. 2020 read
    # clip(HU / 1000, -0.2, 0.2) * 2.5, i.e. the window [-200, 200] HU onto [-0.5, 0.5] (0 HU -> 0).
    window_range: tuple[float, float] = (0.0, 1.0)

    @field_validator("window_range")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] <= value[0]:
            raise ValueError(f"intensity.window_range must increase, got {list(value)}")
        return value

    @field_validator("upper")
    @classmethod
    def _ordered(cls, upper: float, info: Any) -> float:
        lower = info.data.get("lower")
        if lower is not None and upper <= lower:
            raise ValueError(f"intensity.upper ({upper}) must exceed intensity.lower ({lower})")
        return upper


class PreprocessConfig(_Strict):
    """Native CT -> model space. Saved into every bundle's plan.json."""

    orientation: Literal["RAS"] = "RAS"
    target_spacing: Triple = (3.0, 3.0, 3.0)
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    crop_body: bool = True
    body_threshold_hu: float = -500.0
    crop_margin_vox: int = 2

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, spacing: Triple) -> Triple:
        if min(spacing) <= 0:
            raise ValueError(f"target_spacing must be positive, got {spacing}")
        return spacing


class ModelConfig(_Strict):
    """The network, chosen by name; sizes come from here so CPU and GPU models share code."""

    name: Literal["dynunet", "vnet", "tang2020"] = "dynunet"
    in_channels: int = 1
    out_channels: int = 3
    filters: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    kernel_size: list[int] = Field(default_factory=lambda: [3, 3, 3, 3, 3])
    strides: list[int] = Field(default_factory=lambda: [1, 2, 2, 2, 2])
    res_block: bool = True
    deep_supervision: bool = True
    deep_supr_num: int = 2
    norm: Literal["instance", "batch"] = "instance"
    dropout: float = 0.0
    # Start from these weights (a bundle folder or a shipped model's name, e.g. liver_tang2020) instead
    # of a random initialisation; layers whose shapes differ (a new output head) are adapted or fresh.
    pretrained: str | None = None


class TrainConfig(_Strict):
    iterations: int = Field(default=1000, ge=1)
    val_every: int = Field(default=100, ge=1)
    patch_size: IntTriple = (96, 96, 96)
    batch_size: int = Field(default=2, ge=1)
    seed: int = 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = 1e-5
    momentum: float = 0.99
    lr_schedule: Literal["poly", "constant"] = "poly"
    poly_power: float = 0.9
    grad_clip: float = 12.0
    pos_fraction: float = Field(default=0.67, ge=0.0, le=1.0)
    class_weights: list[float] | None = None
    augment: bool = True
    # Mirror axes for augmentation (RAS model space: 0 left-right, 1 front-back, 2 head-feet).
    # Mirroring left-right teaches the network that a liver may sit on the left, which invites
    # spleen confusions when training data is scarce; the shipped recipe turns flips off.
    flip_axes: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # Probability that a patch gets 1-3 synthetic hypodense tumours painted into its liver
    # (liverseg/synthetic.py); 0 turns it off.
    synthetic_tumours: float = Field(default=0.0, ge=0.0, le=1.0)
    # Probability that a synthetic tumour is centred just inside the liver's surface and bulges out
    # into the soft tissue next to it, as large real tumours do (labelled tumour: liver Dice counts it).
    synthetic_tumour_bulge: float = Field(default=0.0, ge=0.0, le=1.0)
    # Probability that a patch gets a decoy: a dark, thin-walled pouch (a stomach-like mass) painted
    # just outside the liver and labelled background, the counterweight to bulging tumours.
    synthetic_decoys: float = Field(default=0.0, ge=0.0, le=1.0)
    # Robustness augmentation (liverseg/robustness.py): scans from elsewhere simulated on each batch
    # on its device. Each is the probability that a patch gets it; 0 turns it off.
    # A contrast phase: arterial, equilibrium or unenhanced (the liver's HU moved using the label).
    contrast_phase: float = Field(default=0.0, ge=0.0, le=1.0)
    # Global HU scale (0.9..1.1) and shift (-15..15 HU), and a gamma (0.8..1.25) over the window.
    hu_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    # A source with slices slice_thickness_mm thick (drawn per patch) resampled to our grid.
    slice_thickness: float = Field(default=0.0, ge=0.0, le=1.0)
    slice_thickness_mm: tuple[float, float] = (3.0, 5.0)
    # Low-dose noise: Gaussian, noise_hu HU std (drawn per patch), white to slightly correlated.
    low_dose_noise: float = Field(default=0.0, ge=0.0, le=1.0)
    noise_hu: tuple[float, float] = (5.0, 25.0)
    # Field of view: the scan cut at random levels above and/or below; beyond the cut the image is
    # what the sliding window pads with and the labels are background.
    fov_cut: float = Field(default=0.0, ge=0.0, le=1.0)
    num_workers: int = Field(default=0, ge=0)
    cache_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    # Mixed precision on CUDA: bf16 autocast where the GPU supports it (no gradient scaler needed),
    # else fp16 with a gradient scaler.
    amp: bool = True
    # bf16 autocast on the CPU: fast where the CPU has AVX512-BF16 or AMX (pipelines/bench_train.py),
    # emulated and about 70x slower elsewhere; "auto" uses it only where it is native.
    amp_cpu: Literal["auto"] | bool = False
    # Channels-last (NDHWC) memory layout for the network and its input.
    channels_last: bool = False
    # torch.compile the network for training (the first steps pay for compiling).
    compile: bool = False
    # Instance norm computed by torch's group-norm kernel (networks.for_inference: same parameters,
    # same results to float rounding; faster on CPU).
    fast_norm: bool = False
    deterministic: bool = False
    checkpoint_every: int = Field(default=100, ge=1)
    # Wall-clock budget: stop early (and still write the bundle) once this many seconds have
    # passed; None trains for all iterations. Timed runs are not reproducible step for step.
    max_seconds: float | None = Field(default=None, gt=0)
    # With max_seconds: after a few timed steps, fit the schedule's length to the time left, so the
    # learning rate anneals fully by the deadline (the fitted length is kept in the checkpoint).
    fit_to_time: bool = False
    # Distillation (liverseg/teacher.py): weight of the cross-entropy between the student's foreground
    # probability and the teacher's soft targets saved in the cache; 0 (or a cache without them): off.
    teacher_weight: float = Field(default=0.0, ge=0.0)

    @field_validator("slice_thickness_mm", "noise_hu")
    @classmethod
    def _range(cls, value: tuple[float, float], info: Any) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"train.{info.field_name} must be [low, high] with 0 <= low <= high, "
                             f"got {list(value)}")
        return value

    @field_validator("amp_cpu", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        if value not in (True, False, "auto"):  # one message, not one per member of the union
            raise ValueError(f"train.amp_cpu must be true, false or auto, got {value!r}")
        return value


class InferConfig(_Strict):
    roi_size: IntTriple = (128, 128, 128)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    # Windows per forward pass. Batching them changes no result (normalisation is per window) and
    # on CPU cuts the time of a scan with many windows by about a third; each extra 64^3 window
    # costs DynUNet (16..256 filters) about 100 MB while it runs.
    sw_batch_size: int = Field(default=4, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    # Nested classes (tumour lies inside liver): a voxel is foreground when the background
    # probability is below one half, then gets its most likely foreground class. Plain argmax
    # drops a voxel whose foreground probability is split between liver and tumour.
    nested_classes: bool = False
    # Keep windows at roi_size even where the image is smaller (the sliding window pads it). A
    # network whose normalisation takes each window's statistics (the imported tang2020) gives
    # other answers on a tight window than on the large, padded one it was trained on.
    fixed_window: bool = False
    # The network's arithmetic. "auto": bfloat16 where the device computes it natively (a CPU with
    # AVX-512 BF16 or AMX, a CUDA GPU with bf16), float32 elsewhere. On such a CPU bfloat16 runs
    # the default model's windows 2.5x faster, and its masks agree with float32's at Dice 0.9998
    # (README, "Speed"); the softmax and the blending stay float32.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


class PostprocessConfig(_Strict):
    largest_component: bool = True
    fill_holes: bool = True
    tumour_inside_liver: bool = True


class Config(_Strict):
    """A whole recipe: what ``liverseg train`` reads and what a bundle's plan records."""

    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    labels: dict[int, str] = Field(default_factory=lambda: {0: "background", 1: "liver", 2: "tumour"})


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (so 3, 0.5, true, [1,2,3] get their types)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict, refusing keys the schema lacks."""
    for item in overrides:
        if "=" not in item:
            raise LiversegError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: dict = data
        model: type[BaseModel] | None = Config
        for depth, part in enumerate(parts):
            fields = model.model_fields if model is not None else {}
            if part not in fields:
                where = ".".join(parts[:depth]) or "the config"
                known = ", ".join(sorted(fields))
                raise LiversegError(f"unknown setting '{key}': '{part}' is not in {where} "
                                    f"(known: {known})")
            annotation = fields[part].annotation
            if depth == len(parts) - 1:
                node[part] = _parse_value(raw)
            else:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    raise LiversegError(f"unknown setting '{key}': '{part}' has no sub-keys")
                node = node.setdefault(part, {})
                model = annotation
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults) and apply dotted overrides; errors are one line."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LiversegError("config file not found; give a YAML file such as configs/default.yaml", p)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise LiversegError(f"config is not valid YAML ({str(exc).splitlines()[0]})", p) \
                from None
        if not isinstance(data, dict):
            raise LiversegError("config must be a mapping of sections (preprocess, model, ...)", p)
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        source = f"{path}: " if path else ""
        raise LiversegError(f"{source}bad config value at '{where}': {first['msg']}") from None
