"""Training speed options on the CPU: bf16 autocast, channels-last and torch.compile train the same
network to the same losses (bf16 within its precision)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

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


def test_amp_cpu_auto_uses_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 is about 70x slower than float32 (an AVX2 CPU): "auto" asks the CPU first."""
    from liverseg import networks
    from liverseg.errors import LiversegError

    auto = load_config(CPU_SMALL, ["train.amp_cpu=auto"]).train
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(networks, "cpu_computes_bf16", lambda native=native: native)
        assert networks.autocast_dtype(auto, torch.device("cpu")) == expected
    with pytest.raises(LiversegError, match=r"train\.amp_cpu must be true, false or auto"):
        load_config(CPU_SMALL, ["train.amp_cpu=sometimes"])


def test_fast_norm_trains_like_instance_norm(small_liver_cache: Path, tmp_path: Path) -> None:
    """train.fast_norm swaps instance norm for the group-norm kernel: same losses, same state keys,
    and the bundle loads into the plain network."""
    from liverseg.bundle import load_bundle
    from liverseg.train import _optimisation

    fast_cfg = load_config(CPU_SMALL, [*TINY, "train.fast_norm=true"])
    network = _optimisation(fast_cfg, torch.device("cpu")).network
    kinds = {type(m) for m in network.modules()}
    assert torch.nn.GroupNorm in kinds and torch.nn.InstanceNorm3d not in kinds  # the swap happened
    plain = _losses(small_liver_cache, tmp_path / "instance", [])
    fast = _losses(small_liver_cache, tmp_path / "group", ["train.fast_norm=true"])
    assert len(set(plain)) > 1
    assert fast == pytest.approx(plain, rel=1e-4)
    reference = load_bundle(tmp_path / "instance").network.state_dict()
    swapped = load_bundle(tmp_path / "group").network.state_dict()
    assert swapped.keys() == reference.keys()


@pytest.mark.slow
def test_compiled_network_trains_like_eager(small_liver_cache: Path, tmp_path: Path) -> None:
    """torch.compile (about 40 s of compiling on 2 cores): same losses, checkpoint without wrappers."""
    plain = _losses(small_liver_cache, tmp_path / "eager", [])
    compiled = _losses(small_liver_cache, tmp_path / "compiled", ["train.compile=true"])
    assert compiled == pytest.approx(plain, rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_fit_to_time_sets_the_schedule_from_the_timed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import liverseg.train as train_module
    from liverseg.config import Config

    config = Config.model_validate({"train": {"iterations": 1000, "max_seconds": 100.0, "fit_to_time": True}})
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=1000, power=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    opt = train_module._Optimisation(network, optimizer, scheduler, scaler, torch.nn.MSELoss(), None)
    run = SimpleNamespace(config=config, world=1, dev=torch.device("cpu"))
    progress = train_module._Progress(step=5)
    clock = iter([10.0, 14.0, 18.0])  # steps 5..25 take 4 s (0.2 s a step), 25..45 too
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    train_module._fit_to_time(progress, opt, run, elapsed=10.0, bar=None)
    assert progress.total is None
    progress.step = 25
    train_module._fit_to_time(progress, opt, run, elapsed=20.0, bar=None)
    # 80 s left, less 3% slack, at 0.2 s a step: 388 more steps
    assert progress.total == 25 + int(80 * 0.97 / 0.2) and scheduler.total_iters == progress.total
    progress.step = 45  # refitted: the machine got twice as slow (steps 25..45 took 8 s)
    clock = iter([22.0])
    train_module._fit_to_time(progress, opt, run, elapsed=28.0, bar=None)
    assert progress.total == 45 + int(72 * 0.97 / 0.4)
    for _ in range(progress.total):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # annealed by the deadline
