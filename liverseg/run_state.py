"""The state of a training run and how it is saved: what stays fixed through a run (:class:`Run`),
the network with everything that updates it (:class:`Optimisation`), where the run is
(:class:`Progress`), the checkpoints that make ``--resume`` exact (weights, optimiser, scheduler,
AMP scaler, RNG states; written atomically), and the bundle a run directory becomes."""

from __future__ import annotations

import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from liverseg.allocator import allocator_in_use
from liverseg.bundle import save_bundle
from liverseg.config import Config
from liverseg.errors import LiversegError
from liverseg.io import atomic_path
from liverseg.networks import autocast_dtype

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


@dataclass
class Run:
    """What stays fixed through a run: where it is, what it trains on, on which device."""

    run_dir: Path
    data: Path
    cache: Path
    config: Config
    plan: Config
    fold: int | None
    train_ids: list[str]
    val_ids: list[str]
    dev: torch.device
    rank: int
    world: int
    started: tuple[float, float]  # wall clock and process CPU time at the start of train()


@dataclass
class Optimisation:
    """The network and everything that updates it; all of it goes into the full checkpoint."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None  # autocast dtype; None: float32


@dataclass
class Progress:
    step: int = 0
    best: float = float("-inf")  # best mean validation Dice so far
    best_step: int | None = None
    total: int | None = None  # the schedule's length once fitted to the time (train.fit_to_time)
    fit_clock: float | None = None  # when the timed steps began (not checkpointed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(path: Path, run: Run, opt: Optimisation, progress: Progress, full: bool) -> None:
    """Weights and progress; ``full`` adds what an exact --resume needs (optimiser ... RNG states)."""
    obj: dict[str, Any] = {"step": progress.step, "model": opt.network.state_dict(), "best": progress.best,
                           "best_step": progress.best_step, "total": progress.total,
                           "config": run.config.model_dump(mode="json")}
    if full:
        obj.update(optimizer=opt.optimizer.state_dict(), scheduler=opt.scheduler.state_dict(),
                   scaler=opt.scaler.state_dict(), rng=rng_state(), world_size=run.world)
    save_atomic(obj, path)


def restore_checkpoint(path: Path, config: Config, opt: Optimisation) -> Progress:
    """Load the full checkpoint at ``path`` into ``opt`` and the global RNGs; where the run was."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"]["model"] != config.model.model_dump(mode="json"):
        raise LiversegError("the model settings differ from the run being resumed; resume with the "
                            "same config", path)
    opt.network.load_state_dict(state["model"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    opt.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(state["step"], state["best"], state["best_step"], state.get("total"))


def write_bundle(run: Run, state_dict: dict, progress: Progress, val: dict | None) -> None:
    card = {
        "name": run.run_dir.name,
        "trained_on": {"cache": str(run.cache), "dataset": str(run.data), "train_cases": run.train_ids,
                       "val_cases": run.val_ids, "fold": run.fold},
        "command": " ".join(sys.argv),
        "config": run.config.model_dump(mode="json"),
        "iterations": progress.step,
        "seconds": round(time.perf_counter() - run.started[0], 2),
        "cpu_seconds": round(time.process_time() - run.started[1], 2),
        "weights": "best validation Dice" if run.val_ids else "last step",
        "validation": ({"best_dice": progress.best, "best_iteration": progress.best_step, **(val or {})}
                       if run.val_ids else None),
        "machine": {"device": str(run.dev), "world_size": run.world, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "allocator": allocator_in_use(),
                    "precision": str(autocast_dtype(run.config.train, run.dev) or torch.float32)
                    .removeprefix("torch.")},
        "licence": "Check the licences of the training data: models trained on 3D-IRCADb are for "
                   "non-commercial research use only.",
    }
    save_bundle(run.run_dir, run.plan, state_dict, card=card)
