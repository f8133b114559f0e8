"""Learning from a teacher: soft targets written into a real cache, and the distillation loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from liverseg.preprocess import case_paths, load_cached_case
from liverseg.teacher import TEACHER_KEY, add_teacher_targets, distillation_loss


def test_distillation_loss_is_the_binary_cross_entropy_of_the_foreground() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6) * 3
    teacher = torch.rand(2, 1, 4, 5, 6)
    foreground = 1 - torch.softmax(logits, 1)[:, :1]
    expected = torch.nn.functional.binary_cross_entropy(foreground, teacher)
    torch.testing.assert_close(distillation_loss(logits, teacher), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distillation_loss(logits, teacher[:, 0]), expected, rtol=1e-5, atol=1e-6)
    sure = torch.tensor([[-60.0, 60.0, 0.0]]).view(1, 3, 1, 1, 1)  # confident and right: finite, ~0
    assert 0 <= float(distillation_loss(sure, torch.ones(1, 1, 1, 1, 1))) < 1e-6
    wrong = float(distillation_loss(sure, torch.zeros(1, 1, 1, 1, 1)))
    assert np.isfinite(wrong) and wrong > 50  # confident and wrong: large, still finite


def test_where_the_experts_drew_a_tumour_the_target_is_foreground() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5, 6) * 3
    label = torch.randint(0, 3, (1, 1, 4, 5, 6))
    teacher = torch.rand(1, 1, 4, 5, 6)
    missed_tumours = torch.where(label == 2, torch.zeros_like(teacher), teacher)
    found_tumours = torch.where(label == 2, torch.ones_like(teacher), teacher)
    torch.testing.assert_close(distillation_loss(logits, missed_tumours, label),
                               distillation_loss(logits, found_tumours))
    assert float(distillation_loss(logits, missed_tumours)) != float(distillation_loss(logits, found_tumours))


def test_teacher_targets_land_in_the_cache_on_the_model_grid(small_liver_cache: Path, trained_bundle: Path,
                                                            tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(small_liver_cache, cache)
    (case,) = [p.stem for p in (cache / "cases").glob("*.npz")]
    written = add_teacher_targets(cache, trained_bundle)  # the small model as a stand-in teacher
    assert written == [case]
    cached = load_cached_case(cache, case)
    with np.load(case_paths(cache, case)[0]) as stored:
        soft = stored[TEACHER_KEY].astype(np.float32)
    assert soft.shape == cached.label.shape and soft.dtype == np.float32
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    liver = cached.label > 0
    # the teacher (trained on this very case) agrees with the label where it is sure
    assert soft[liver].mean() > 0.7 and soft[~liver].mean() < 0.3
    assert cached.sidecar[TEACHER_KEY]["model"]
    np.testing.assert_array_equal(cached.image, load_cached_case(small_liver_cache, case).image)
    # a rerun with the same teacher rewrites nothing
    stamp = case_paths(cache, case)[0].stat().st_mtime_ns
    assert add_teacher_targets(cache, trained_bundle) == []
    assert case_paths(cache, case)[0].stat().st_mtime_ns == stamp


def test_loss_scores_the_centre_of_a_smaller_output_and_adds_the_teacher() -> None:
    from liverseg.config import ModelConfig, TrainConfig
    from liverseg.losses import build_loss
    from liverseg.train import compute_loss

    torch.manual_seed(0)
    loss_fn = build_loss(ModelConfig(name="tang2020", out_channels=3), TrainConfig())
    label = torch.zeros(1, 1, 30, 30, 30)
    label[..., 10:20, 10:20, 10:20] = 1
    inner = label[..., 13:-13, 13:-13, 13:-13]  # what a 13-voxel margin leaves: 4^3, partly liver
    logits = torch.full((1, 3, 4, 4, 4), -10.0)  # sure, and right about the centre
    logits[:, 0] = 10 - 20 * inner[:, 0]
    logits[:, 1] = 20 * inner[:, 0] - 10
    base = compute_loss(loss_fn, logits, {"label": label}, margin=13)
    assert float(base) < 0.05
    shifted = compute_loss(loss_fn, logits, {"label": torch.roll(label, 5, dims=2)}, margin=13)
    assert float(shifted) > float(base) + 0.1  # the centre of the label is what counts
    teacher = 1.0 - label  # a teacher that disagrees everywhere
    with_teacher = compute_loss(loss_fn, logits, {"label": label, "teacher": teacher}, margin=13,
                                teacher_weight=0.5)
    assert float(with_teacher) > float(base) + 1.0
    ignored = compute_loss(loss_fn, logits, {"label": label, "teacher": teacher}, margin=13,
                           teacher_weight=0.0)
    torch.testing.assert_close(ignored, base)


def test_pretrained_tang2020_with_a_tumour_head_starts_where_the_import_was() -> None:
    from liverseg.bundle import load_bundle
    from liverseg.config import ModelConfig
    from liverseg.networks import build_network, load_pretrained

    cfg = ModelConfig(name="tang2020", out_channels=3, pretrained="liver_tang2020")
    network = build_network(cfg)
    assert load_pretrained(network, cfg) == 30  # 15 convolutions, weight and bias each
    original = load_bundle("liver_tang2020").network
    x = torch.randn(1, 1, 54, 54, 27) * 0.2
    with torch.inference_mode():
        new, old = torch.softmax(network(x), 1), torch.softmax(original(x), 1)
    assert float((new[:, 0] < 0.5).eq(old[:, 0] < 0.5).float().mean()) > 0.99
    assert float(new[:, 2].max()) < 0.05  # the new tumour class starts unlikely
