"""Train a network on a preprocess cache and write a model bundle (``liverseg train``).

The loop is deliberately small and configured by data (``Config.train``/``Config.model``): MONAI
builds the network, the loss, the patch sampling and augmentation, and the sliding-window
validation; this module only wires them together, checkpoints and logs.

Reproducibility: patch number ``g`` (counted over the whole run, across DDP ranks) is a pure
function of ``(train.seed, g)``: it picks the case and seeds the random transforms. So the patch
stream does not depend on worker processes or on where a run was interrupted, and ``--resume``
continues exactly from the last checkpoint (which also stores the model, optimiser, scheduler,
AMP scaler and the torch/numpy/python RNG states).

Run directory (itself a model bundle, so ``liverseg infer --model RUN_DIR`` works)::

    RUN_DIR/model.pt, plan.json, model_card.json    the bundle (best weights, or last without validation)
    RUN_DIR/checkpoints/last.pt, best.pt           full training state / best weights
    RUN_DIR/log.csv, progress.png                   loss and validation Dice per step
    RUN_DIR/splits.json                             the train/val case lists (when generated here)
    RUN_DIR/cache/                                  preprocess cache, when DATA was a raw dataset
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from liverseg.bundle import save_bundle
from liverseg.config import Config
from liverseg.errors import LiversegError
from liverseg.io import atomic_path, write_text_atomic
from liverseg.losses import build_loss, split_outputs
from liverseg.networks import build_network, network_stride

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
LOG_FILE = "log.csv"
PROGRESS_FILE = "progress.png"
SPLITS_FILE = "splits.json"
LOG_FIELDS = ["step", "loss", "lr", "val_dice", "val_liver", "val_tumour", "seconds"]


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path  # == run_dir: the run directory is the bundle
    best_dice: float | None  # mean foreground validation Dice; None without validation cases
    best_iteration: int | None
    iterations: int  # steps done in total (including those before a resume)
    seconds: float  # wall time of this call
    cpu_seconds: float  # CPU time of this process in this call (all threads; excludes DDP peers)
    train_cases: list[str]
    val_cases: list[str]


# --------------------------------------------------------------------------------------------
# Data: cache, splits, patches


def _ensure_cache(data: Path, run_dir: Path, config: Config, rank: int, quiet: bool) -> Path:
    """DATA as a cache, preprocessing a raw dataset into RUN_DIR/cache first (rank 0 only)."""
    from liverseg.preprocess import is_cache, preprocess_dataset

    if is_cache(data):
        return data
    cache = run_dir / "cache"
    if rank == 0:
        report = preprocess_dataset(data, cache, config.preprocess, quiet=quiet)
        for case, message in report.failed:
            print(f"warning: preprocessing skipped {case}: {message}", file=sys.stderr)
        if not (report.done or report.skipped):
            raise LiversegError("no case could be preprocessed for training", data)
    _barrier()
    return cache


def _read_splits(path: Path) -> list[dict]:
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LiversegError(f"splits file is not valid JSON ({exc.msg})", path) from None
    if isinstance(splits, dict):  # one split given as {"train": [...], "val": [...]}
        splits = [splits]
    if not (isinstance(splits, list) and all(isinstance(s, dict) and isinstance(s.get("train"), list)
                                             for s in splits)):
        raise LiversegError('splits must be a list of {"train": [cases], "val": [cases]} like '
                            "nnU-Net's splits_final.json", path)
    return splits


def resolve_splits(cases: list[str], *, fold: int | None, seed: int, run_dir: Path, cache: Path,
                   splits: str | Path | None = None, write: bool = True) -> tuple[list[str], list[str]]:
    """(train cases, validation cases) for a fold.

    ``fold=None`` trains on every case of the split file's first entry when one is given, else on
    all cases, without validation. With a fold, the split file is the one given, else
    RUN_DIR/splits.json, else CACHE/splits.json, else a seeded 5-fold split (fewer folds for fewer
    cases) written to RUN_DIR/splits.json. Explicit lists may overlap (an overfitting check).
    """
    candidates = [Path(splits)] if splits is not None else [run_dir / SPLITS_FILE, cache / SPLITS_FILE]
    found = next((p for p in candidates if p.is_file()), None)
    if splits is not None and found is None:
        raise LiversegError("splits file not found", splits)
    if found is None:
        if fold is None:
            return list(cases), []
        if len(cases) < 2:
            raise LiversegError(f"a fold needs at least 2 cases, the cache has {len(cases)}; drop --fold "
                                "to train on all, or give a splits.json with explicit train/val lists")
        order = list(cases)
        random.Random(seed).shuffle(order)
        k = min(5, len(order))
        table = [{"train": sorted(c for j, c in enumerate(order) if j % k != i),
                  "val": sorted(c for j, c in enumerate(order) if j % k == i)} for i in range(k)]
        if write:
            write_text_atomic(run_dir / SPLITS_FILE, json.dumps(table, indent=2) + "\n")
        found_table = table
    else:
        found_table = _read_splits(found)
    index = 0 if fold is None else fold
    if not 0 <= index < len(found_table):
        raise LiversegError(f"fold {fold} does not exist; the splits have folds 0..{len(found_table) - 1}",
                            found)
    entry = found_table[index]
    train_cases = [str(c) for c in entry["train"]]
    val_cases = [str(c) for c in entry.get("val", [])] if fold is not None else []
    missing = sorted(set(train_cases + val_cases) - set(cases))
    if missing:
        raise LiversegError(f"split names cases that are not in the cache: {', '.join(missing[:5])}",
                            found)
    if not train_cases:
        raise LiversegError(f"fold {index} has no training cases", found)
    return train_cases, val_cases


def _load_case(cache: Path, case_id: str) -> dict[str, Any]:
    from liverseg.preprocess import load_cached_case

    case = load_cached_case(cache, case_id)
    if case.label is None:
        raise LiversegError(f"case '{case_id}' has no label; training needs labelled cases", cache)
    return {"case": case_id, "image": torch.from_numpy(case.image),
            "label": torch.from_numpy(case.label[None].astype(np.float32))}


def _transforms(config: Config) -> tuple[Callable, Callable]:
    """(deterministic part, cached once per case; random part, run per patch)."""
    from monai.transforms import (
        Compose,
        FgBgToIndicesd,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    t = config.train
    keys = ["image", "label"]
    fixed = Compose([
        SpatialPadd(keys, spatial_size=t.patch_size),
        # Foreground/background voxel lists once per case, not once per patch.
        FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
    ])
    pos = t.pos_fraction
    random_part: list[Callable] = [RandCropByPosNegLabeld(
        keys, label_key="label", spatial_size=t.patch_size, pos=pos, neg=1.0 - pos, num_samples=1,
        fg_indices_key="label_fg", bg_indices_key="label_bg")]
    if t.synthetic_tumours > 0:
        from liverseg.synthetic import RandSyntheticTumourd

        random_part.append(RandSyntheticTumourd(("image", "label"), prob=t.synthetic_tumours,
                                                bulge_prob=t.synthetic_tumour_bulge))
    if t.synthetic_decoys > 0:
        from liverseg.synthetic import RandSyntheticDecoyd

        random_part.append(RandSyntheticDecoyd(("image", "label"), prob=t.synthetic_decoys))
    if t.augment:
        random_part += [
            RandAffined(keys, prob=0.2, rotate_range=[math.radians(15)] * 3, scale_range=[0.15] * 3,
                        mode=("bilinear", "nearest"), padding_mode="border"),
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in t.flip_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.2),
            RandShiftIntensityd("image", offsets=0.1, prob=0.2),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.2),
            RandGaussianNoised("image", prob=0.1, std=0.02),
        ]
    return fixed, Compose(random_part)


class _CaseLoader:
    """Case id -> loaded and padded case (a class, not a lambda, so worker processes can pickle it)."""

    def __init__(self, cache: Path, fixed: Callable) -> None:
        self.cache, self.fixed = cache, fixed

    def __call__(self, item: dict) -> dict:
        return self.fixed(_load_case(self.cache, item["case"]))


class PatchStream(torch.utils.data.Dataset):
    """Patch number ``g`` -> one augmented (image, label) patch, a pure function of (seed, g)."""

    def __init__(self, cases: torch.utils.data.Dataset, transform: Any, seed: int) -> None:
        self.cases = cases
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cases)  # type: ignore[arg-type]

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, g))
        case = self.cases[int(rng.integers(len(self.cases)))]  # type: ignore[arg-type]
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        out = self.transform({k: case[k] for k in ("image", "label", "label_fg", "label_bg")})
        if isinstance(out, list):
            out = out[0]
        return {"image": torch.as_tensor(out["image"]), "label": torch.as_tensor(out["label"])}


class _PatchNumbers(torch.utils.data.Sampler):
    """This rank's patch numbers for steps start..stop-1: each step holds world*batch patches."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch

    def __iter__(self):  # type: ignore[no-untyped-def]
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)


# --------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops on a single process)


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _mean_across_ranks(value: float, device: torch.device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise LiversegError(f"unknown device '{name}' (choose auto, cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise LiversegError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


# --------------------------------------------------------------------------------------------
# Validation, checkpoints, logs


def dice_scores(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Liver (label > 0, the LiTS convention) and tumour (label == 2) Dice; NaN when undefined."""
    from monai.metrics import compute_dice

    out = {}
    for name, p, y in (("liver", pred > 0, label > 0), ("tumour", pred == 2, label == 2)):
        if not y.any():
            out[name] = float("nan")
            continue
        d = compute_dice(p[None, None].float(), y[None, None].float(), include_background=True)
        out[name] = float(d.item())
    return out


@torch.no_grad()
def validate(network: nn.Module, cases: list[dict], config: Config, device: torch.device) -> dict:
    """Sliding-window prediction on whole cached cases; mean Dice per region and overall."""
    from monai.inferers import sliding_window_inference

    was_training = network.training
    network.eval()
    per_case = {}
    for case in cases:
        with torch.autocast(device.type, enabled=device.type == "cuda" and config.train.amp):
            logits = sliding_window_inference(
                case["image"][None].to(device), roi_size=config.train.patch_size,
                sw_batch_size=config.infer.sw_batch_size, predictor=network,
                overlap=config.infer.overlap, mode=config.infer.mode)
        pred = logits.argmax(1)[0].cpu()
        per_case[case["case"]] = dice_scores(pred, case["label"][0])
    network.train(was_training)

    def mean(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    liver = mean([d["liver"] for d in per_case.values()])
    tumour = mean([d["tumour"] for d in per_case.values()])
    overall = mean([mean(list(d.values())) for d in per_case.values()])
    return {"dice": overall, "liver": liver, "tumour": tumour, "per_case": per_case}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _trim_log(path: Path, last_step: int) -> list[dict]:
    """Rows up to ``last_step`` (rows written after the checkpoint are replayed on resume)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_progress(rows: list[dict], path: Path) -> None:
    """Loss per step (and a running mean) with validation Dice on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    if len(loss) >= 5:
        w = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=1.5, label=f"loss (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [(int(r["step"]), float(r["val_dice"]), float(r["val_liver"]), float(r["val_tumour"]))
           for r in rows if r.get("val_dice") not in (None, "")]
    if val:
        ax2 = ax.twinx()
        s = [v[0] for v in val]
        ax2.plot(s, [v[1] for v in val], "o-", color="tab:red", label="val Dice (mean)")
        ax2.plot(s, [v[2] for v in val], "s--", color="tab:orange", label="val Dice liver")
        ax2.plot(s, [v[3] for v in val], "^--", color="tab:purple", label="val Dice tumour")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation Dice")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The loop


def _plan(config: Config, cache: Path) -> Config:
    """What the bundle records: the cache's resolved preprocessing, its labels, roi = patch size."""
    from liverseg.preprocess import read_cache_config

    pre, labels = read_cache_config(cache)
    names = {**config.labels, **labels}
    if max(names) >= config.model.out_channels:
        raise LiversegError(f"the cache has label {max(names)} but model.out_channels is "
                            f"{config.model.out_channels}; set model.out_channels={max(names) + 1}", cache)
    plan = config.model_copy(deep=True)
    plan.preprocess = pre
    plan.labels = {k: v for k, v in sorted(names.items()) if k < config.model.out_channels}
    if "roi_size" not in config.infer.model_fields_set:
        plan.infer.roi_size = config.train.patch_size
    return plan


def _check_config(config: Config) -> None:
    stride = network_stride(config.model)
    bad = [s for s in config.train.patch_size if s % stride]
    if bad:
        raise LiversegError(f"train.patch_size {list(config.train.patch_size)} must be divisible by "
                            f"{stride} (the network's total stride); e.g. "
                            f"{[max(stride, round(s / stride) * stride) for s in config.train.patch_size]}")


def train(data: str | Path, run_dir: str | Path, config: Config, *, fold: int | None = None,
          resume: bool = False, device: str = "auto", quiet: bool = False,
          splits: str | Path | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``config.model`` on DATA (a preprocess cache, or a raw dataset cached into RUN_DIR/cache).

    ``on_step(step, row)`` is called on rank 0 after each step with the log row (a hook for tests
    and notebooks; raising from it interrupts the run like Ctrl-C would).
    Under ``torchrun`` (WORLD_SIZE > 1) it trains with DDP: gloo on CPU, NCCL on GPU.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    data, run_dir = Path(data), Path(run_dir)
    if not data.exists():
        raise LiversegError("training data not found; give a preprocess cache or a dataset folder", data)
    _check_config(config)
    rank, world, local_rank = _dist_env()
    dev = _pick_device(device, local_rank)
    own_group = False
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        own_group = True
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    from monai.data import get_track_meta, set_track_meta

    track_meta_before = get_track_meta()
    set_track_meta(False)  # plain tensors through the transforms: no metadata bookkeeping per patch
    try:
        return _train(data, run_dir, config, fold=fold, resume=resume, dev=dev, quiet=quiet,
                      splits=splits, on_step=on_step, rank=rank, world=world,
                      started=(started, cpu_started))
    finally:
        set_track_meta(track_meta_before)
        torch.use_deterministic_algorithms(deterministic_before)
        if own_group:
            torch.distributed.destroy_process_group()


def _train(data: Path, run_dir: Path, config: Config, *, fold: int | None, resume: bool,
           dev: torch.device, quiet: bool, splits: str | Path | None,
           on_step: Callable[[int, dict], None] | None, rank: int, world: int,
           started: tuple[float, float]) -> TrainResult:
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    t = config.train
    ckpt_dir = run_dir / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST_CHECKPOINT
    if rank == 0:
        if last_path.is_file() and not resume:
            raise LiversegError("this run folder already holds a training run; pass --resume to continue "
                                "it or choose a new -o folder", run_dir)
        if resume and not last_path.is_file():
            raise LiversegError("nothing to resume (no checkpoints/last.pt); drop --resume to start a new "
                                "run", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    cache = _ensure_cache(data, run_dir, config, rank, quiet)
    plan = _plan(config, cache)
    from liverseg.preprocess import list_cached_cases

    train_ids, val_ids = resolve_splits(list_cached_cases(cache), fold=fold, seed=t.seed, run_dir=run_dir,
                                        cache=cache, splits=splits, write=rank == 0)

    set_determinism(seed=t.seed, use_deterministic_algorithms=t.deterministic)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not t.deterministic

    fixed, augment = _transforms(config)
    # CacheDataset keeps the loaded, padded cases (with their foreground indices) in memory; the
    # random part runs per patch in PatchStream. copy_cache=False: no transform works in place.
    cases = CacheDataset([{"case": c} for c in train_ids], transform=_CaseLoader(cache, fixed),
                         cache_rate=t.cache_rate, num_workers=0, progress=False, copy_cache=False)
    val_cases = [_load_case(cache, c) for c in val_ids] if rank == 0 else []

    network = build_network(config.model).to(dev)
    if t.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(network.parameters(), lr=t.lr,
                                                             weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(network.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True,
                                    weight_decay=t.weight_decay)
    power = t.poly_power if t.lr_schedule == "poly" else 0.0
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=t.iterations, power=power)
    amp = dev.type == "cuda" and t.amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = build_loss(config.model, t).to(dev)

    step, best, best_step = 0, float("-inf"), None
    if resume:
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        if state["config"]["model"] != config.model.model_dump(mode="json"):
            raise LiversegError("the model settings differ from the run being resumed; resume with the "
                                "same config", last_path)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        _set_rng_state(state["rng"])
    ddp = (torch.nn.parallel.DistributedDataParallel(network, device_ids=[dev.index] if dev.type == "cuda"
                                                     else None) if world > 1 else network)

    log_path = run_dir / LOG_FILE
    rows: list[dict] = []
    if rank == 0:
        rows = _trim_log(log_path, step) if resume else []
        if not resume or not log_path.is_file():
            with atomic_path(log_path) as tmp:
                tmp.write_text(",".join(LOG_FIELDS) + "\n", encoding="utf-8")

    def checkpoint(path: Path, full: bool) -> None:
        obj: dict[str, Any] = {"step": step, "model": network.state_dict(), "best": best,
                               "best_step": best_step, "config": config.model_dump(mode="json")}
        if full:
            obj.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict(), rng=_rng_state(), world_size=world)
        _save(obj, path)

    def write_bundle(state_dict: dict, val: dict | None) -> None:
        card = {
            "name": run_dir.name,
            "trained_on": {"cache": str(cache), "dataset": str(data), "train_cases": train_ids,
                           "val_cases": val_ids, "fold": fold},
            "command": " ".join(sys.argv),
            "config": config.model_dump(mode="json"),
            "iterations": step,
            "seconds": round(time.perf_counter() - started[0], 2),
            "cpu_seconds": round(time.process_time() - started[1], 2),
            "weights": "best validation Dice" if val_ids else "last step",
            "validation": ({"best_dice": best, "best_iteration": best_step, **(val or {})}
                           if val_ids else None),
            "machine": {"device": str(dev), "world_size": world, "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
            "licence": "Check the licences of the training data: models trained on 3D-IRCADb are for "
                       "non-commercial research use only.",
        }
        save_bundle(run_dir, plan, state_dict, card=card)

    stop = t.iterations
    sampler = _PatchNumbers(step, stop, t.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(
        PatchStream(cases, augment, t.seed), batch_size=t.batch_size, sampler=sampler,
        num_workers=t.num_workers, pin_memory=dev.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if t.num_workers else None)
    bar = None
    if rank == 0 and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=step, desc="train", file=sys.stderr, dynamic_ncols=True,
                   disable=None)
    last_val: dict | None = None
    ddp.train()
    try:
        for batch in loader:
            image = batch["image"].to(dev, non_blocking=True)
            label = batch["label"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, enabled=amp):
                loss = loss_fn(split_outputs(ddp(image)), label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            loss_value = _mean_across_ranks(float(loss.detach()), dev)
            elapsed = time.perf_counter() - started[0]
            out_of_time = t.max_seconds is not None and elapsed >= t.max_seconds
            if world > 1 and t.max_seconds is not None:  # every rank must stop at the same step
                flag = torch.tensor([int(out_of_time)], device=dev)
                torch.distributed.broadcast(flag, 0)
                out_of_time = bool(flag.item())
            final = step >= stop or out_of_time
            row: dict[str, Any] = {"step": step, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6g}",
                                   "val_dice": "", "val_liver": "", "val_tumour": "",
                                   "seconds": f"{elapsed:.2f}"}
            if rank == 0:
                if val_cases and (step % t.val_every == 0 or final):
                    last_val = validate(network, val_cases, config, dev)
                    row.update(val_dice=f"{last_val['dice']:.4f}", val_liver=f"{last_val['liver']:.4f}",
                               val_tumour=f"{last_val['tumour']:.4f}")
                    if not math.isnan(last_val["dice"]) and last_val["dice"] > best:
                        best, best_step = last_val["dice"], step
                        checkpoint(ckpt_dir / BEST_CHECKPOINT, full=False)
                        write_bundle(network.state_dict(), last_val)
                rows.append(row)
                with log_path.open("a", newline="", encoding="utf-8") as f:
                    csv.DictWriter(f, LOG_FIELDS).writerow(row)
                if step % t.checkpoint_every == 0 or final:
                    checkpoint(last_path, full=True)
                if row["val_dice"] or final:
                    plot_progress(rows, run_dir / PROGRESS_FILE)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}",
                                    dice=f"{best:.3f}" if best_step is not None else "-", refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(step, row)
            if final:
                break
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        if step == 0:
            raise LiversegError("no training step was run (train.iterations already reached?)", run_dir)
        if not val_ids:
            write_bundle(network.state_dict(), None)
        elif best_step is None:  # validation never gave a Dice: keep the last weights
            write_bundle(network.state_dict(), last_val)
    _barrier()
    return TrainResult(run_dir=run_dir, bundle=run_dir, best_dice=best if best_step is not None else None,
                       best_iteration=best_step, iterations=step, seconds=time.perf_counter() - started[0],
                       cpu_seconds=time.process_time() - started[1],
                       train_cases=train_ids, val_cases=val_ids)
