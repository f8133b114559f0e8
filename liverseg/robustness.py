"""Robustness augmentation: what other hospitals' scans do differently, simulated on a training batch.

Our few training CTs are portal-venous, thin-slice, normal-dose abdominal scans. Scans elsewhere
differ in four ways that cost the model liver Dice, and each has a simulation here:

* contrast phase (``train.contrast_phase``): the liver's HU moved independently of the rest using
  the label -- arterial (liver 55-80 HU, intrahepatic veins barely enhanced, bright arteries and
  aorta, tumours possibly brighter than the liver as HCC is), equilibrium (liver 80-110 HU, vessels
  close to the parenchyma) or unenhanced (liver 50-65 HU, no vessel contrast);
* scanner and window differences (``train.hu_jitter``): a global HU scale and shift, and a gamma
  over the intensity window;
* slice thickness (``train.slice_thickness``): a source with thick slices (``slice_thickness_mm``)
  resampled to our grid -- blurred along z, sampled every slice thickness and interpolated back;
* low dose (``train.low_dose_noise``): Gaussian noise of ``noise_hu`` HU, white or slightly
  correlated between neighbouring voxels;
* field of view (``train.fov_cut``): the scan ends at a random level above and/or below; beyond it
  the image is what the sliding window pads with and the labels (and teacher) are background.

They work in HU on the network input through ``modelspace.intensity_to_hu`` and
``normalise_intensity`` with the plan's intensity settings, so they hold for any window, its
``window_range`` and z-score. Voxels clipped at the window's edges carry no HU any more (air is
not -175 HU): they stay at the edges. Everything is a batched torch operation on whatever device
the batch is on, so on a GPU it costs next to nothing and on the CPU it does not slow the loader.
The random draws are a pure function of (train.seed, step, rank): ``--resume`` stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.config import IntensityConfig, TrainConfig
from liverseg.modelspace import intensity_to_hu, normalise_intensity

LIVER, TUMOUR = 1, 2
# What MONAI's sliding window pads an image with (constant 0 in network-input units): a scan cut
# short looks like this beyond its end at inference, so it does in training too.
PAD_VALUE = 0.0
# Intrahepatic vessels: liver voxels this far above the liver's mean HU count as vessel (the excess
# over it is scaled per phase); below it is parenchyma texture and noise, which is kept.
VESSEL_MARGIN_HU = 15.0
# Outside the organ, voxels from BRIGHT_FROM_HU (fully from BRIGHT_FROM_HU + BRIGHT_RAMP_HU) are
# enhanced structures: aorta, arteries, veins, kidney cortex (and some bone); phases move them.
BRIGHT_FROM_HU, BRIGHT_RAMP_HU = 110.0, 40.0
# Global jitter: HU scale about water (0 HU), HU shift, gamma over the window (log-uniform).
HU_SCALE, HU_SHIFT, GAMMA = (0.9, 1.1), (-15.0, 15.0), (0.8, 1.25)
NOISE_CORRELATION_VOX = 0.7  # sigma of the smoothing that correlates noise
FOV_MIN_KEEP = 0.25  # a cut keeps at least this fraction of the patch along z


@dataclass(frozen=True)
class Phase:
    """One contrast phase as ranges drawn per patch."""

    liver_hu: tuple[float, float]  # mean HU of the liver (label 1)
    vessel_gain: tuple[float, float]  # factor on intrahepatic vessels' excess over the parenchyma
    tumour_gain: tuple[float, float]  # factor on tumours' HU difference from the liver (< 0: brighter)
    bright_shift_hu: tuple[float, float]  # HU added to enhanced structures outside the organ


PHASES = {
    "arterial": Phase((55.0, 80.0), (0.0, 0.5), (-1.0, 1.0), (40.0, 150.0)),
    "equilibrium": Phase((80.0, 110.0), (0.2, 0.6), (0.5, 1.0), (-40.0, 0.0)),
    "unenhanced": Phase((50.0, 65.0), (-0.3, 0.1), (0.2, 0.7), (-80.0, -30.0)),
}


def _per_sample(values: list[float] | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (B, 1, 1, 1, 1) tensor on ``like``'s device."""
    return torch.as_tensor(np.asarray(values, dtype=np.float32), device=like.device).view(-1, 1, 1, 1, 1)


def clipped(x: torch.Tensor, intensity: IntensityConfig) -> torch.Tensor:
    """Voxels at the window's edges (their true HU lost to clipping): transforms leave them there."""
    low = float(normalise_intensity(torch.tensor(intensity.lower), intensity))
    high = float(normalise_intensity(torch.tensor(intensity.upper), intensity))
    eps = 1e-4 * abs(high - low)
    return (x <= low + eps) | (x >= high - eps)


def partial_volume(mask: torch.Tensor) -> torch.Tensor:
    """The share of each voxel that ``mask`` covers, roughly: the mask averaged over 3x3x3 voxels
    (1 inside, about 2/3 on its outermost voxels, 1/3 on those just outside, 0 further out), so
    moving the organ's HU moves its partial-volume edge the way a real enhancement change does."""
    return F.avg_pool3d(mask.float(), 3, stride=1, padding=1, count_include_pad=False)


def simulate_phase(hu: torch.Tensor, label: torch.Tensor, liver_hu: torch.Tensor, vessel_gain: torch.Tensor,
                   tumour_gain: torch.Tensor, bright_shift: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Move the liver (label 1) to mean ``liver_hu`` and scale its vessels and tumours (label 2) as a
    phase does; add ``bright_shift`` to enhanced structures outside; all per sample (B, 1, 1, 1, 1).
    ``keep`` marks voxels left as they are (clipped ones); the organ's edge moves with its partial
    volume (one voxel either side); a sample without liver is unchanged."""
    liver = (label == LIVER) & ~keep
    organ = (label > 0) & ~keep
    dims = (1, 2, 3, 4)
    count = liver.sum(dim=dims, keepdim=True)
    level = (hu * liver).sum(dim=dims, keepdim=True) / count.clamp(min=1)
    dev = hu - level
    excess = (dev - VESSEL_MARGIN_HU).clamp(min=0)
    # Inside the label: vessels' excess over the parenchyma scaled, tumours' difference from the liver.
    inner = torch.where(label == TUMOUR, (tumour_gain - 1) * dev, (vessel_gain - 1) * excess) * organ
    out = hu + partial_volume(organ) * ~keep * (liver_hu - level) + inner
    # The partial-volume edge and the vessel scaling move the liver's mean a little: one correction
    # over the liver puts it exactly on liver_hu.
    mean = (out * liver).sum(dim=dims, keepdim=True) / count.clamp(min=1)
    out = out + liver * (liver_hu - mean)
    bright = ((hu - BRIGHT_FROM_HU) / BRIGHT_RAMP_HU).clamp(0, 1) * ~(label > 0) * ~keep
    out = out + bright * bright_shift
    return torch.where(count > 0, out, hu)


def jitter_hu(hu: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor,
              intensity: IntensityConfig) -> torch.Tensor:
    """``hu * scale + shift``, then ``gamma`` over the window [lower, upper] (per sample)."""
    low, high = intensity.lower, intensity.upper
    t = ((hu * scale + shift - low) / (high - low)).clamp(0, 1)
    return low + (high - low) * t.pow(gamma)


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_z(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur along the last (z) axis of a (1, 1, X, Y, Z) tensor, edges replicated."""
    k = _gaussian_kernel(sigma, x.device)
    r = (k.numel() - 1) // 2
    flat = x.reshape(-1, 1, x.shape[-1])
    flat = F.conv1d(F.pad(flat, (r, r), mode="replicate"), k.view(1, 1, -1))
    return flat.reshape(x.shape)


def _sample_z(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` (..., Z) linearly interpolated at fractional z ``positions`` (clamped to the ends)."""
    positions = positions.clamp(0, x.shape[-1] - 1)
    lo = positions.floor().long()
    hi = (lo + 1).clamp(max=x.shape[-1] - 1)
    frac = positions - lo
    return x[..., lo] * (1 - frac) + x[..., hi] * frac


def thicken_slices(hu: torch.Tensor, ratio: float, phase: float) -> torch.Tensor:
    """What a source with slices ``ratio`` times our z spacing looks like after resampling to our
    grid: blurred along z to that thickness (its slice profile), sampled every ``ratio`` voxels
    starting at ``phase`` (0..1 of a slice), and linearly interpolated back. (1, 1, X, Y, Z)."""
    if ratio <= 1.0:
        return hu
    # Our voxel already has about one voxel's resolution: add the rest in quadrature (FWHM).
    sigma = math.sqrt(ratio**2 - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    blurred = _blur_z(hu, sigma)
    size = hu.shape[-1]
    start = phase * ratio
    slices = torch.arange(start - ratio, size + ratio, ratio, device=hu.device)  # covers both ends
    thick = _sample_z(blurred, slices)
    back = (torch.arange(size, device=hu.device, dtype=torch.float32) - slices[0]) / ratio
    return _sample_z(thick, back)


def low_dose_noise(shape: torch.Size, std_hu: torch.Tensor, correlation: torch.Tensor,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Zero-mean Gaussian noise with ``std_hu`` HU per sample; ``correlation`` in [0, 1] mixes in
    noise smoothed over neighbouring voxels (sigma NOISE_CORRELATION_VOX) at the same std."""
    k = _gaussian_kernel(NOISE_CORRELATION_VOX, device)
    r = (k.numel() - 1) // 2
    # White noise with a margin, smoothed without padding: the same variance up to the patch's edges.
    big = torch.randn((*shape[:2], *(s + 2 * r for s in shape[2:])), generator=generator, device=device)
    smooth = big
    for axis in range(3):  # separable 3D smoothing
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        smooth = F.conv3d(smooth, k.view(view))
    white = big[..., r:-r, r:-r, r:-r]
    norm = float(k.pow(2).sum().sqrt())
    smooth = smooth / norm**3  # unit std
    rho = (float(k[r]) / norm) ** 3  # correlation of white and smoothed noise at a voxel
    a = correlation
    std = ((1 - a) ** 2 + a**2 + 2 * a * (1 - a) * rho).sqrt()
    return std_hu * ((1 - a) * white + a * smooth) / std


def fov_levels(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample kept z range [low, high) as fractions of the patch: a cut below (low > 0), above
    (high < 1) or both, keeping at least FOV_MIN_KEEP of the patch."""
    below, above = rng.random(n) < 0.5, rng.random(n) < 0.5
    below |= ~above  # at least one cut
    room = 1.0 - FOV_MIN_KEEP * np.where(below & above, 2.0, 1.0)
    low = np.where(below, rng.uniform(0.0, 1.0, n) * room, 0.0)
    high = np.where(above, low + FOV_MIN_KEEP + rng.uniform(0.0, 1.0, n) * (1.0 - FOV_MIN_KEEP - low), 1.0)
    return low, high


def fov_keep(size: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1, Z) mask of the z slices kept between per-sample fractions [low, high)."""
    z = (torch.arange(size, device=low.device, dtype=torch.float32) + 0.5) / size
    return (z.view(1, 1, 1, 1, -1) >= low) & (z.view(1, 1, 1, 1, -1) < high)


class Robustness:
    """The configured simulations, applied to a batch on its device: ``batch = robust(batch, step)``.

    ``batch`` holds ``image`` (B, 1, X, Y, Z) network input, ``label`` (B, 1, X, Y, Z) and optionally
    ``teacher`` (B, 1, X, Y, Z); a new dict is returned and the input is not modified. Each
    simulation is on for a patch with its probability; its parameters are drawn for every patch
    either way, so the draws of one do not depend on whether another fired.
    """

    def __init__(self, train: TrainConfig, intensity: IntensityConfig, z_spacing_mm: float, *,
                 rank: int = 0) -> None:
        self.t, self.intensity, self.z_spacing, self.rank = train, intensity, z_spacing_mm, rank

    @staticmethod
    def wanted(train: TrainConfig) -> bool:
        return any(p > 0 for p in (train.contrast_phase, train.hu_jitter, train.slice_thickness,
                                   train.low_dose_noise, train.fov_cut))

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        t, image = self.t, batch["image"]
        n = image.shape[0]
        # Scalars from NumPy, fields from a generator on the batch's device; both from (seed, step, rank).
        rng = np.random.default_rng((t.seed, step, self.rank, 0x7269))
        generator = torch.Generator(device=image.device)
        generator.manual_seed(int(rng.integers(2**62)))
        keep = clipped(image, self.intensity)
        hu = intensity_to_hu(image, self.intensity)
        changed = False
        for probability, simulate in ((t.contrast_phase, self._phase), (t.hu_jitter, self._jitter),
                                      (t.slice_thickness, self._thickness), (t.low_dose_noise, self._noise)):
            if probability == 0:
                continue
            on = rng.random(n) < probability
            new = simulate(hu, batch["label"], keep, rng, generator)
            if on.any():
                hu = torch.where(_per_sample(on, hu) > 0, new, hu)
                changed = True
        out = dict(batch)
        if changed:
            out["image"] = torch.where(keep, image, normalise_intensity(hu, self.intensity))
        on = rng.random(n) < t.fov_cut
        low, high = fov_levels(rng, n)
        if t.fov_cut > 0 and on.any():
            inside = fov_keep(image.shape[-1], _per_sample(np.where(on, low, 0.0), image),
                              _per_sample(np.where(on, high, 1.0), image))
            out["image"] = torch.where(inside, out["image"], torch.full_like(image, PAD_VALUE))
            for key in ("label", "teacher"):
                if key in out:
                    out[key] = out[key] * inside
        return out

    def _phase(self, hu: torch.Tensor, label: torch.Tensor, keep: torch.Tensor, rng: np.random.Generator,
               generator: torch.Generator) -> torch.Tensor:
        names = list(PHASES)
        draws = [PHASES[names[int(rng.integers(len(names)))]] for _ in range(hu.shape[0])]

        def pick(field: str) -> torch.Tensor:
            return _per_sample([rng.uniform(*getattr(p, field)) for p in draws], hu)

        return simulate_phase(hu, label, pick("liver_hu"), pick("vessel_gain"), pick("tumour_gain"),
                              pick("bright_shift_hu"), keep)

    def _jitter(self, hu: torch.Tensor, label: torch.Tensor, keep: torch.Tensor, rng: np.random.Generator,
                generator: torch.Generator) -> torch.Tensor:
        n = hu.shape[0]
        scale, shift = rng.uniform(*HU_SCALE, n), rng.uniform(*HU_SHIFT, n)
        gamma = np.exp(rng.uniform(math.log(GAMMA[0]), math.log(GAMMA[1]), n))
        return jitter_hu(hu, _per_sample(scale, hu), _per_sample(shift, hu), _per_sample(gamma, hu),
                         self.intensity)

    def _thickness(self, hu: torch.Tensor, label: torch.Tensor, keep: torch.Tensor, rng: np.random.Generator,
                   generator: torch.Generator) -> torch.Tensor:
        n = hu.shape[0]
        ratio = rng.uniform(*self.t.slice_thickness_mm, n) / self.z_spacing
        phase = rng.random(n)
        return torch.cat([thicken_slices(hu[i:i + 1], float(ratio[i]), float(phase[i])) for i in range(n)])

    def _noise(self, hu: torch.Tensor, label: torch.Tensor, keep: torch.Tensor, rng: np.random.Generator,
               generator: torch.Generator) -> torch.Tensor:
        n = hu.shape[0]
        std = _per_sample(rng.uniform(*self.t.noise_hu, n), hu)
        return hu + low_dose_noise(hu.shape, std, _per_sample(rng.random(n), hu), generator, hu.device)
