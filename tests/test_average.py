"""Weight averaging of bundles (the stages of one run -> one network of the same size and speed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from liverseg.bundle import average_bundles, load_bundle, save_bundle
from liverseg.config import Config, ModelConfig
from liverseg.errors import LiversegError
from liverseg.infer import predict_volume
from liverseg.io import read_ct
from liverseg.networks import build_network

SMALL = {"filters": [8, 16, 32, 64], "kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "deep_supr_num": 1}


def _bundle(path: Path, seed: int, **model: object) -> Path:
    torch.manual_seed(seed)
    cfg = Config(model=ModelConfig(**{**SMALL, **model}))
    return save_bundle(path, cfg, build_network(cfg.model).state_dict())


def test_averaged_bundle_holds_the_mean_weights_and_runs(tmp_path: Path, small_ct: Path) -> None:
    first, second = _bundle(tmp_path / "a", 1), _bundle(tmp_path / "b", 2)
    averaged = load_bundle(average_bundles([first, second], tmp_path / "mean", card={"name": "mean"}))
    a, b = load_bundle(first).network.state_dict(), load_bundle(second).network.state_dict()
    got = averaged.network.state_dict()
    assert set(got) == set(a)
    for key in a:
        assert torch.equal(got[key], ((a[key] + b[key]) / 2).half().float()), key
    assert not torch.equal(got["output_block.conv.conv.weight"], a["output_block.conv.conv.weight"])
    assert averaged.card == {"name": "mean"}
    # Same size as a member: tensors the state dict names twice are stored once, as save_bundle does.
    sizes = [(path / "model.pt").stat().st_size for path in (first, tmp_path / "mean")]
    assert abs(sizes[1] - sizes[0]) < 0.01 * sizes[0], sizes
    volume = read_ct(small_ct)
    assert predict_volume(volume, averaged).labels.shape == volume.shape


def test_only_one_architecture_and_preprocessing_can_be_averaged(tmp_path: Path) -> None:
    first = _bundle(tmp_path / "a", 1)
    wider = _bundle(tmp_path / "wide", 1, filters=[16, 16, 32, 64])
    with pytest.raises(LiversegError, match="differs"):
        average_bundles([first, wider], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
