"""Training speed options on the CPU: bf16 autocast, channels-last and torch.compile train the same
network to the same losses (bf16 within its precision)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from liverseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
CPU_SMALL = REPO / "configs" / "cpu_small.yaml"
TINY = ["model.filters=[4,8,16]", "model.kernel_size=[3,3,3]", "model.strides=[1,2,2]",
        "model.deep_supr_num=1", "train.patch_size=[32,32,32]", "train.batch_size=1", "train.iterations=3"]


def _losses(cache: Path, run: Path, options: list[str]) -> list[float]:
    from liverseg.train import train

    train(cache, run, load_config(CPU_SMALL, [*TINY, *options]), device="cpu", quiet=True)
    with (run / "log.csv").open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_bf16_and_channels_last_train_like_float32(small_liver_cache: Path, tmp_path: Path) -> None:
    from liverseg.bundle import load_bundle
    from liverseg.networks import autocast_dtype

    cfg = load_config(CPU_SMALL, ["train.amp_cpu=true"]).train
    assert autocast_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(load_config(CPU_SMALL).train, torch.device("cpu")) is None
    plain = _losses(small_liver_cache, tmp_path / "fp32", [])
    fast = _losses(small_liver_cache, tmp_path / "bf16", ["train.amp_cpu=true", "train.channels_last=true"])
    assert len(set(plain)) > 1
    assert fast != plain  # bf16 really ran ...
    assert fast == pytest.approx(plain, rel=0.01)  # ... and trains the same network to the same losses
    weights = load_bundle(tmp_path / "bf16").network.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_compiled_network_trains_like_eager(small_liver_cache: Path, tmp_path: Path) -> None:
    """torch.compile (about 40 s of compiling on 2 cores): same losses, checkpoint without wrappers."""
    plain = _losses(small_liver_cache, tmp_path / "eager", [])
    compiled = _losses(small_liver_cache, tmp_path / "compiled", ["train.compile=true"])
    assert compiled == pytest.approx(plain, rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod") for k in state["model"])
