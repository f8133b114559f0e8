"""Robustness augmentation (liverseg/robustness.py) on real CT, and the teacher array's way to the loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from liverseg.config import IntensityConfig, load_config
from liverseg.modelspace import intensity_to_hu, normalise_intensity
from liverseg.robustness import (
    BRIGHT_FROM_HU,
    FOV_MIN_KEEP,
    PAD_VALUE,
    PHASES,
    Robustness,
    clipped,
    jitter_hu,
    low_dose_noise,
    simulate_phase,
    thicken_slices,
)

REPO = Path(__file__).resolve().parents[1]
CPU_SMALL = REPO / "configs" / "cpu_small.yaml"
CASE = "ircadb07"
TINY = ["model.filters=[4,8,16]", "model.kernel_size=[3,3,3]", "model.strides=[1,2,2]",
        "model.deep_supr_num=1", "train.patch_size=[32,32,32]", "train.batch_size=1"]
# The window an imported network reads (Tang et al.): [-200, 200] HU onto [-0.5, 0.5].
TANG = IntensityConfig(mode="window", lower=-200, upper=200, window_range=(-0.5, 0.5))
ALL_ON = ["train.contrast_phase=1", "train.hu_jitter=1", "train.slice_thickness=1", "train.low_dose_noise=1",
          "train.fov_cut=1"]


def _case_intensity(cache: Path) -> IntensityConfig:
    from liverseg.cache import read_cache_config

    return read_cache_config(cache)[0].intensity


def _batch(cache: Path) -> dict[str, torch.Tensor]:
    """Two 48^3 crops of the real cached CT (3 mm), both holding liver, as a (2, 1, ...) batch."""
    from liverseg.cache import load_cached_case

    case = load_cached_case(cache, CASE)
    image, label = torch.from_numpy(case.image), torch.from_numpy(case.label[None].astype(np.float32))
    boxes = [(slice(20, 68), slice(10, 58), slice(0, 48)), (slice(40, 88), slice(20, 68), slice(18, 66))]
    batch = {"image": torch.stack([image[(slice(None), *b)] for b in boxes]),
             "label": torch.stack([label[(slice(None), *b)] for b in boxes])}
    assert all((batch["label"][i] == 1).sum() > 1000 for i in range(2))
    return batch


def _liver_mean(hu: torch.Tensor, label: torch.Tensor, keep: torch.Tensor) -> list[float]:
    liver = (label == 1) & ~keep
    return [float(hu[i][liver[i]].mean()) for i in range(hu.shape[0])]


@pytest.mark.parametrize("window", ["cache", "tang"])
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_contrast_phase_moves_the_liver_alone(small_liver_cache: Path, phase: str, window: str) -> None:
    """The liver's mean HU lands where the phase puts it; dark tissue outside the organ is untouched;
    arterial brightens enhanced structures outside, unenhanced removes the vessels' contrast."""
    intensity = _case_intensity(small_liver_cache)
    batch = _batch(small_liver_cache)
    if window == "tang":  # any window_range: the same HU through another window
        batch["image"] = normalise_intensity(intensity_to_hu(batch["image"], intensity), TANG)
        intensity = TANG
    image, label = batch["image"], batch["label"]
    keep = clipped(image, intensity)
    hu = intensity_to_hu(image, intensity)
    p = PHASES[phase]
    target = torch.tensor([p.liver_hu[0], p.liver_hu[1]]).view(2, 1, 1, 1, 1)
    gains = [torch.tensor([lo, hi]).view(2, 1, 1, 1, 1) for lo, hi in (p.vessel_gain, p.tumour_gain,
                                                                       p.bright_shift_hu)]
    out = simulate_phase(hu, label, target, *gains, keep)
    back = intensity_to_hu(normalise_intensity(out, intensity), intensity)  # through the network input
    assert _liver_mean(back, label, keep) == pytest.approx([p.liver_hu[0], p.liver_hu[1]], abs=1.0)
    assert _liver_mean(hu, label, keep)[0] > 110  # portal-venous before: the liver really moved
    # Beyond the organ's partial-volume edge (one voxel), dark tissue is exactly as it was.
    near = torch.nn.functional.max_pool3d((label > 0).float(), 3, stride=1, padding=1) > 0
    dark_outside = ~near & (hu < BRIGHT_FROM_HU)
    assert dark_outside.sum() > 10000
    assert torch.equal(out[dark_outside], hu[dark_outside])
    bright_outside = ~near & (hu > BRIGHT_FROM_HU + 40) & ~keep
    shift = (out - hu)[bright_outside]
    if phase == "arterial":
        assert shift.min() >= p.bright_shift_hu[0] - 1e-3
    else:
        assert shift.max() <= 1e-3
    # Intrahepatic vessels: voxels of the liver's interior (its partial-volume edge aside) 30 HU
    # above the liver's mean. Unenhanced, they are gone.
    interior = -torch.nn.functional.max_pool3d(-(label > 0).float(), 3, stride=1, padding=1) > 0
    liver = (label == 1) & interior & ~keep
    vessels = [float((v[liver] > v[liver].mean() + 30).float().mean()) for v in (hu, out)]
    assert vessels[0] > 0.01, vessels
    if phase == "unenhanced":
        assert vessels[1] < 0.1 * vessels[0], vessels


def test_hu_jitter_scale_shift_gamma(small_liver_cache: Path) -> None:
    """hu * scale + shift exactly with gamma 1; gamma > 1 darkens mid-window, window ends stay put."""
    intensity = _case_intensity(small_liver_cache)
    hu = torch.tensor([-100.0, 0.0, 37.5, 100.0]).view(1, 1, 1, 1, -1)
    one = torch.ones(1, 1, 1, 1, 1)
    out = jitter_hu(hu, 1.1 * one, 10 * one, one, intensity)
    assert torch.allclose(out, hu * 1.1 + 10, atol=1e-3)
    dark = jitter_hu(hu, one, 0 * one, 1.25 * one, intensity)  # 37.5 HU: the middle of -175..250
    assert float(dark[0, 0, 0, 0, 2]) == pytest.approx(-175 + 425 * 0.5**1.25, abs=1e-3)
    ends = torch.tensor([intensity.lower, intensity.upper]).view(1, 1, 1, 1, -1)
    assert torch.allclose(jitter_hu(ends, one, 0 * one, 1.25 * one, intensity), ends)


def _z_high_frequency_power(hu: torch.Tensor, cutoff: float) -> float:
    """Power along z above ``cutoff`` cycles/voxel (Hann-windowed, so the ends do not leak)."""
    x = (hu - hu.mean(dim=-1, keepdim=True)) * torch.hann_window(hu.shape[-1], periodic=False)
    spectrum = torch.fft.rfft(x, dim=-1).abs().pow(2)
    return float(spectrum[..., torch.fft.rfftfreq(hu.shape[-1]) > cutoff].sum())


def test_slice_thickness_drops_z_resolution(small_liver_cache: Path) -> None:
    """A 5 mm source on our 3 mm grid: detail finer than 5 mm along z mostly gone (power above the
    thick source's Nyquist frequency < 15%), z edges blurred far more than in-plane ones, coarse
    anatomy kept; a source thinner than our grid changes nothing."""
    intensity = _case_intensity(small_liver_cache)
    hu = intensity_to_hu(_batch(small_liver_cache)["image"][:1], intensity)
    ratio = 5.0 / 3.0
    thick = thicken_slices(hu, ratio, phase=0.3)
    assert thick.shape == hu.shape
    nyquist = 0.5 / ratio
    assert _z_high_frequency_power(thick, nyquist) < 0.15 * _z_high_frequency_power(hu, nyquist)

    def gradient_energy(v: torch.Tensor, axis: int) -> float:
        return float(v.diff(dim=axis).pow(2).mean())

    z_kept = gradient_energy(thick, -1) / gradient_energy(hu, -1)
    x_kept = gradient_energy(thick, -3) / gradient_energy(hu, -3)
    assert z_kept < 0.6 * x_kept, (z_kept, x_kept)
    coarse = [torch.nn.functional.avg_pool3d(v, (1, 1, 8)) for v in (hu, thick)]
    assert float((coarse[0] - coarse[1]).abs().mean()) < 10.0  # HU, averaged over 2.4 cm in z
    assert torch.equal(thicken_slices(hu, 0.9, phase=0.0), hu)


def test_low_dose_noise_std_and_correlation() -> None:
    generator = torch.Generator().manual_seed(0)
    shape = torch.Size([2, 1, 40, 40, 40])
    std = torch.tensor([10.0, 25.0]).view(2, 1, 1, 1, 1)
    for correlation, neighbour in ((0.0, (-0.03, 0.03)), (1.0, (0.3, 0.9))):
        a = torch.full((2, 1, 1, 1, 1), correlation)
        noise = low_dose_noise(shape, std, a, generator, torch.device("cpu"))
        assert [float(noise[i].std()) for i in range(2)] == pytest.approx([10.0, 25.0], rel=0.03)
        r = float(torch.corrcoef(torch.stack([noise[..., 1:].flatten(), noise[..., :-1].flatten()]))[0, 1])
        assert neighbour[0] < r < neighbour[1], (correlation, r)


def _robust(overrides: list[str], intensity: IntensityConfig, seed: int = 0) -> Robustness:
    t = load_config(CPU_SMALL, [*overrides, f"train.seed={seed}"]).train
    return Robustness(t, intensity, z_spacing_mm=3.0)


def test_each_key_reaches_the_batch_reproducibly(small_liver_cache: Path) -> None:
    """Each key alone changes the batch (and only the image, but for the FOV cut); the same
    (seed, step) gives the same batch, another step another; clipped voxels stay at the window
    edges; the noise has the std asked for; all off leaves the batch as it is."""
    intensity = _case_intensity(small_liver_cache)
    batch = _batch(small_liver_cache)
    keep = clipped(batch["image"], intensity)
    assert keep.float().mean() > 0.05  # the crops do hold air and bone clipped at the window edges
    assert _robust([], intensity)(batch, 0)["image"] is batch["image"]
    for key in ALL_ON:
        robust = _robust([key], intensity)
        out = robust(batch, 5)
        assert not torch.equal(out["image"], batch["image"]), key
        assert torch.equal(out["image"], robust(batch, 5)["image"]), key
        assert not torch.equal(out["image"], robust(batch, 6)["image"]), key
        if key != "train.fov_cut=1":
            assert torch.equal(out["label"], batch["label"]), key
            assert torch.equal(out["image"][keep], batch["image"][keep]), key
    noisy = _robust(["train.low_dose_noise=1", "train.noise_hu=[20,20]"], intensity)(batch, 0)
    hu, noisy_hu = (intensity_to_hu(b["image"], intensity) for b in (batch, noisy))
    inside = (hu > intensity.lower + 100) & (hu < intensity.upper - 100)  # no clipping of the noise
    assert float((noisy_hu - hu)[inside].std()) == pytest.approx(20.0, rel=0.05)
    phased = _robust(["train.contrast_phase=1"], intensity)(batch, 0)
    means = _liver_mean(intensity_to_hu(phased["image"], intensity), batch["label"], keep)
    assert all(49.0 <= m <= 111.0 for m in means), means  # arterial, equilibrium or unenhanced


def test_fov_cut_makes_labels_background_beyond(small_liver_cache: Path) -> None:
    """Beyond a cut the image is the sliding window's padding, label and teacher are background;
    the kept slab is untouched and holds at least FOV_MIN_KEEP of the patch."""
    intensity = _case_intensity(small_liver_cache)
    batch = _batch(small_liver_cache)
    batch["teacher"] = (batch["label"] > 0).float() * 0.9
    robust = _robust(["train.fov_cut=1"], intensity)
    cuts = 0
    for step in range(6):
        out = robust(batch, step)
        for i in range(2):
            padded = (out["image"][i] == PAD_VALUE).all(dim=(0, 1, 2))  # z slices all padding
            cut = padded & ~(batch["image"][i] == PAD_VALUE).all(dim=(0, 1, 2))
            kept = ~cut
            assert cut.any()
            cuts += int(cut.sum())
            assert int(kept.sum()) >= FOV_MIN_KEEP * kept.numel() - 1
            for key in ("label", "teacher"):
                assert not out[key][i][..., cut].any(), key
                assert torch.equal(out[key][i][..., kept], batch[key][i][..., kept]), key
            assert torch.equal(out["image"][i][..., kept], batch["image"][i][..., kept])
    assert cuts > 6 * 2 * 48 * 0.1


# --------------------------------------------------------------------------------------------
# The teacher array and the whole loop


def _cache_with_teacher(cache: Path, out: Path, copies: int = 1, teacher_in: int | None = None) -> Path:
    """A copy of the one-case cache whose case(s) carry teacher = 0.9 * (label > 0)."""
    shutil.copytree(cache, out)
    npz, sidecar = out / "cases" / f"{CASE}.npz", out / "cases" / f"{CASE}.json"
    with np.load(npz) as data:
        arrays = dict(data)
    with_teacher = {**arrays, "teacher": (arrays["label"] > 0).astype(np.float32) * 0.9}
    names = [CASE] + [f"{CASE}copy{i}" for i in range(1, copies)]
    for i, name in enumerate(names):
        give = teacher_in is None or i < teacher_in
        np.savez_compressed(out / "cases" / f"{name}.npz", **(with_teacher if give else arrays))
        if name != CASE:
            (out / "cases" / f"{name}.json").write_text(sidecar.read_text())
    return out


def test_teacher_travels_with_the_label(small_liver_cache: Path, tmp_path: Path) -> None:
    """Through crop, affine and flips the teacher stays on the label (bilinear: it agrees on
    nearly every voxel); image and label patches are exactly those of a cache without teacher."""
    from liverseg.train_data import PatchStream, build_transforms, load_case

    cache = _cache_with_teacher(small_liver_cache, tmp_path / "cache")
    config = load_config(CPU_SMALL, ["train.patch_size=[32,32,32]", "train.synthetic_tumours=1"])
    fixed, random_part = build_transforms(config)
    # Affine on every patch, so the bilinear path is exercised.
    next(t for t in random_part.transforms if type(t).__name__ == "RandAffined").prob = 1.0
    plain = PatchStream([fixed(load_case(small_liver_cache, CASE))], random_part, seed=0)
    taught = PatchStream([fixed(load_case(cache, CASE))], random_part, seed=0)
    for g in range(4):
        a, b = plain[g], taught[g]
        assert "teacher" not in a and b["teacher"].shape == b["label"].shape
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        organ = b["label"] > 0
        agree = ((b["teacher"] > 0.45) == organ).float().mean()
        assert agree > 0.97, float(agree)
        assert float(b["teacher"].max()) <= 0.9 + 1e-5


def test_teacher_mixed_cache_is_an_error(small_liver_cache: Path, tmp_path: Path) -> None:
    from liverseg.errors import LiversegError
    from liverseg.train_data import cases_with_teacher

    cache = _cache_with_teacher(small_liver_cache, tmp_path / "cache", copies=2, teacher_in=1)
    with pytest.raises(LiversegError, match="some training cases have a teacher array"):
        cases_with_teacher(cache, [CASE, f"{CASE}copy1"])
    assert cases_with_teacher(cache, [CASE]) is True
    assert cases_with_teacher(small_liver_cache, [CASE]) is False


def test_loop_gets_robust_batches_with_teacher_and_resumes_exactly(small_liver_cache: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With every robustness key on and a teacher in the cache, the loss sees augmented batches with
    batch["teacher"] (cut with the label), and a resumed run logs the same losses as a straight one."""
    import liverseg.train as train_module
    from liverseg.train import train

    cache = _cache_with_teacher(small_liver_cache, tmp_path / "cache")
    seen: list[dict] = []
    original = train_module.compute_loss

    def spy(loss_fn: torch.nn.Module, outputs: torch.Tensor, batch: dict, **options: float) -> torch.Tensor:
        seen.append({k: v.clone() for k, v in batch.items()})
        return original(loss_fn, outputs, batch, **options)

    monkeypatch.setattr(train_module, "compute_loss", spy)
    base = [*TINY, "train.iterations=3", "train.checkpoint_every=2", "train.deterministic=true"]
    plain_cfg, robust_cfg = load_config(CPU_SMALL, base), load_config(CPU_SMALL, [*base, *ALL_ON])
    train(small_liver_cache, tmp_path / "plain", plain_cfg, device="cpu", quiet=True)
    plain, seen[:] = list(seen), []
    assert "teacher" not in plain[0]
    straight = train(cache, tmp_path / "straight", robust_cfg, device="cpu", quiet=True)
    robust = list(seen)
    assert straight.iterations == 3
    assert all(b["teacher"].shape == b["label"].shape for b in robust)
    assert all(not torch.equal(a["image"], b["image"]) for a, b in zip(plain, robust, strict=True))
    # The teacher stays on the label through the affine, the flips and the field-of-view cut.
    assert all(((b["teacher"] > 0.45) == (b["label"] > 0)).float().mean() > 0.97 for b in robust)

    def stop_at_2(step: int, row: dict) -> None:
        if step == 2:  # just after the step-2 checkpoint: step 3 is run after the resume
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cache, tmp_path / "resumed", robust_cfg, device="cpu", quiet=True, on_step=stop_at_2)
    train(cache, tmp_path / "resumed", robust_cfg, device="cpu", quiet=True, resume=True)
    logs = [[r["loss"] for r in _log(tmp_path / run)] for run in ("straight", "resumed")]
    assert len(logs[1]) == 3 and logs[0] == logs[1]


def _log(run_dir: Path) -> list[dict]:
    import csv

    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))
