"""The imported Tang et al. 2020 network: its architecture, its lean forward pass, and the shipped
bundle segmenting a real liver through liverseg's own pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_file
from typer.testing import CliRunner

from liverseg.bundle import PACKAGED_MODELS, load_bundle
from liverseg.cli import app
from liverseg.config import ModelConfig
from liverseg.errors import LiversegError
from liverseg.io import Volume, read_ct, read_label, save_volume
from liverseg.networks import build_network, network_margin, network_stride
from liverseg.tang2020 import MARGIN, _upsample3, _upsample3_slices

SHIPPED = PACKAGED_MODELS / "liver_tang2020"


def test_architecture_parameter_count_sizes_and_margin() -> None:
    cfg = ModelConfig(name="tang2020", out_channels=2)
    network = build_network(cfg)
    assert sum(p.numel() for p in network.parameters()) == 3_874_961  # the Keras model's count
    assert (network_stride(cfg), network_margin(cfg)) == (27, MARGIN)
    with torch.inference_mode():
        out = network(torch.zeros(1, 1, 54, 81, 27))
    assert out.shape == (1, 2, 54 - 26, 81 - 26, 27 - 26)
    probs = torch.softmax(out, 1)  # [0, z] logits: the softmax is [1 - sigmoid(z), sigmoid(z)]
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(out[:, 1]))
    with pytest.raises(ValueError, match="multiples of 27"):
        network(torch.zeros(1, 1, 50, 54, 27))


def test_linear_upsampling_is_nearest_then_three_wide_average() -> None:
    coarse = torch.rand(1, 3, 5, 6, 7)
    keras_way = F.avg_pool3d(F.interpolate(coarse, scale_factor=3, mode="nearest"), 3, stride=1)
    fine = _upsample3(coarse)
    assert fine.shape[2:] == (13, 16, 19)  # n -> 3n - 2
    torch.testing.assert_close(fine, keras_way, atol=1e-6, rtol=1e-5)
    for start, stop in ((0, 4), (5, 11), (12, 19), (0, 19)):  # the slabs the lean pass uses
        torch.testing.assert_close(_upsample3_slices(coarse, start, stop), fine[..., start:stop])


def test_lean_inference_forward_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    network = build_network(ModelConfig(name="tang2020", out_channels=3))
    x = torch.randn(2, 1, 54, 54, 81) * 0.3  # depth over several slabs; two items in a batch
    with torch.enable_grad():
        plain = network(x).detach()
    with torch.inference_mode():
        lean = network(x)
    torch.testing.assert_close(lean, plain, atol=2e-4, rtol=1e-4)


def test_shipped_bundle_card_licence_and_name_resolution() -> None:
    card = json.loads((SHIPPED / "model_card.json").read_text())
    assert "Apache-2.0" in card["licence"] and "research use" in card["licence"]
    assert "Apache License" in (SHIPPED / "LICENSE").read_text()
    assert card["origin"]["parameters"] == 3_874_961
    bundle = load_bundle("liver_tang2020")  # a shipped name, not a path
    assert bundle.path == SHIPPED and bundle.plan.labels == {0: "background", 1: "liver"}
    with pytest.raises(LiversegError, match="liver_tang2020"):
        load_bundle("no_such_model")  # the error lists what is shipped


@pytest.fixture(scope="module")
def chaos03_slab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume]:
    """chaos03 (the CHAOS test case the imported model cannot have seen) cropped to the slices that
    hold liver plus 10 mm: full axial slices, native grid, affine shifted."""
    image = read_ct(shared_file("liver/imagesTr/chaos03.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/chaos03.nii.gz"))
    slices = np.flatnonzero(label.array.any(axis=(0, 1)))
    pad = int(np.ceil(10 / image.spacing[2]))
    z0, z1 = max(int(slices[0]) - pad, 0), min(int(slices[-1]) + 1 + pad, image.shape[2])
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, z0]) + image.affine[:3, 3]
    path = tmp_path_factory.mktemp("tang") / "chaos03_slab.nii.gz"
    save_volume(Volume(np.ascontiguousarray(image.array[:, :, z0:z1]), affine), path)
    return path, Volume(np.ascontiguousarray(label.array[:, :, z0:z1]), affine)


def test_shipped_bundle_segments_a_real_liver(chaos03_slab: tuple[Path, Volume], tmp_path: Path) -> None:
    path, reference = chaos03_slab
    out = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(app, ["infer", str(path), "-o", str(out), "--model", "liver_tang2020",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    written = nib.load(str(out))
    assert written.shape == reference.shape
    np.testing.assert_array_equal(written.affine, nib.load(str(path)).affine)
    mask, truth = np.asarray(written.dataobj) > 0, reference.array > 0
    dice = 2 * np.count_nonzero(mask & truth) / (np.count_nonzero(mask) + np.count_nonzero(truth))
    assert dice >= 0.90
