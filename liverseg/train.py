"""Train a network on a preprocess cache and write a model bundle (``liverseg train``).

The loop is deliberately small and configured by data (``Config.train``/``Config.model``): MONAI
builds the network, the loss, the patch sampling and augmentation, and the sliding-window
validation; this module only wires them together and checkpoints. The patch stream lives in
``train_data``, the batch-level robustness augmentation in ``robustness``, the log and plots in
``train_log``, validation in ``validation``, the run's state, checkpoints and bundle in
``run_state``; the loss is computed in ``compute_loss``.

Reproducibility: each patch is a pure function of ``(train.seed, patch number)`` (see
``train_data``), and the checkpoint stores the model, optimiser, scheduler, AMP scaler and the
torch/numpy/python RNG states, so ``--resume`` continues exactly from the last checkpoint.

Run directory (itself a model bundle, so ``liverseg infer --model RUN_DIR`` works)::

    RUN_DIR/model.pt, plan.json, model_card.json    the bundle (best weights, or last without validation)
    RUN_DIR/checkpoints/last.pt, best.pt           full training state / best weights
    RUN_DIR/log.csv, progress.png                   loss and validation Dice per step
    RUN_DIR/splits.json                             the train/val case lists (when generated here)
    RUN_DIR/cache/                                  preprocess cache, when DATA was a raw dataset
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liverseg.atomic import remove_stale_parts
from liverseg.config import Config
from liverseg.distributed import barrier, dist_env, mean_across_ranks, pick_device
from liverseg.errors import LiversegError
from liverseg.losses import build_loss, split_outputs
from liverseg.networks import (
    autocast_dtype,
    build_network,
    for_inference,
    load_pretrained,
    network_margin,
    network_stride,
)
from liverseg.robustness import Robustness
from liverseg.run_state import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    restore_checkpoint,
    save_checkpoint,
    write_bundle,
)
from liverseg.run_state import Optimisation as _Optimisation
from liverseg.run_state import Progress as _Progress
from liverseg.run_state import Run as _Run
from liverseg.train_data import (
    CaseLoader as _CaseLoader,
)
from liverseg.train_data import (
    PatchNumbers as _PatchNumbers,
)
from liverseg.train_data import (
    PatchStream,
    build_transforms,
    cached_cases,
    ensure_cache,
    load_case,
    patch_loader,
    resolve_splits,
)
from liverseg.train_log import LOG_FILE, TrainLog, progress_bar, step_row
from liverseg.validation import dice_scores, validate

# Names the tests and notebooks have imported from here since before the split.
_transforms, _load_case = build_transforms, load_case
__all__ = ["PatchStream", "TrainResult", "_CaseLoader", "_PatchNumbers", "_load_case", "_transforms",
           "dice_scores", "resolve_splits", "train", "validate"]



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
# Set-up


def _plan(config: Config, cache: Path) -> Config:
    """What the bundle records: the cache's resolved preprocessing, its labels, roi = patch size."""
    from liverseg.cache import read_cache_config

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


def _check_run_dir(run_dir: Path, resume: bool, rank: int) -> None:
    """A run folder is never silently overwritten, and --resume needs something to resume."""
    if rank == 0:
        if (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file() and not resume:
            raise LiversegError("this run folder already holds a training run; pass --resume to continue "
                                "it or choose a new -o folder", run_dir)
        if resume and not (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
            if not (run_dir / LOG_FILE).is_file():
                raise LiversegError("nothing to resume (no checkpoints/last.pt); drop --resume to start a "
                                    "new run", run_dir)
            # A run stopped (killed) before its first checkpoint: resuming it is starting it again.
            print("note: no checkpoint yet in this run folder; starting from step 0", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(run_dir, run_dir / CHECKPOINT_DIR)  # temporary files of a killed run
    barrier()


def _seed(config: Config, dev: torch.device) -> None:
    from monai.utils import set_determinism

    t = config.train
    set_determinism(seed=t.seed, use_deterministic_algorithms=t.deterministic)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not t.deterministic


def _optimisation(config: Config, dev: torch.device) -> _Optimisation:
    t = config.train
    network = build_network(config.model)
    load_pretrained(network, config.model)  # a resumed run then loads its own weights over these
    network.to(dev)
    if t.fast_norm:
        for_inference(network)  # the layer swap only; the network stays in training mode
    if t.channels_last:  # before the optimiser, so its state takes the same layout
        network.to(memory_format=torch.channels_last_3d)
    if t.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(network.parameters(), lr=t.lr,
                                                             weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(network.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True,
                                    weight_decay=t.weight_decay)
    power = t.poly_power if t.lr_schedule == "poly" else 0.0
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=t.iterations, power=power)
    amp_dtype = autocast_dtype(t, dev)
    # fp16 needs its gradients scaled against underflow; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return _Optimisation(network, optimizer, scheduler, scaler, build_loss(config.model, t).to(dev),
                         amp_dtype)


def _forward_model(opt: _Optimisation, run: _Run) -> nn.Module:
    """The module the loop calls: the network, under DDP with several processes, compiled on request.
    Checkpoints and validation use ``opt.network`` itself (its state dict has no wrapper prefixes)."""
    t, dev = run.config.train, run.dev
    model: nn.Module = opt.network
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------------------------
# The loop


def train(data: str | Path, run_dir: str | Path, config: Config, *, fold: int | None = None,
          resume: bool = False, device: str = "auto", quiet: bool = False,
          splits: str | Path | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``config.model`` on DATA (a preprocess cache, or a raw dataset cached into RUN_DIR/cache).

    ``on_step(step, row)`` is called on rank 0 after each step with the log row (a hook for tests
    and notebooks; raising from it interrupts the run like Ctrl-C would).
    Under ``torchrun`` (WORLD_SIZE > 1) it trains with DDP: gloo on CPU, NCCL on GPU.
    """
    started = (time.perf_counter(), time.process_time())
    data, run_dir = Path(data), Path(run_dir)
    if not data.exists():
        raise LiversegError("training data not found; give a preprocess cache or a dataset folder", data)
    _check_config(config)
    rank, world, local_rank = dist_env()
    dev = pick_device(device, local_rank)
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
        _check_run_dir(run_dir, resume, rank)
        cache = ensure_cache(data, run_dir, config, rank, quiet)
        plan = _plan(config, cache)
        from liverseg.cache import list_cached_cases

        train_ids, val_ids = resolve_splits(list_cached_cases(cache), fold=fold, seed=config.train.seed,
                                            run_dir=run_dir, cache=cache, splits=splits, write=rank == 0)
        run = _Run(run_dir, data, cache, config, plan, fold, train_ids, val_ids, dev, rank, world, started)
        return _train(run, resume=resume, quiet=quiet, on_step=on_step)
    finally:
        set_track_meta(track_meta_before)
        torch.use_deterministic_algorithms(deterministic_before)
        if own_group:
            torch.distributed.destroy_process_group()


def compute_loss(loss_fn: nn.Module, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *,
                 margin: int = 0, teacher_weight: float = 0.0) -> torch.Tensor:
    """THE place where the training loss is computed, in float32 outside autocast.

    ``outputs``: the network's logits (a deep-supervision stack in training mode); ``batch``: the
    targets on the device after the robustness augmentation -- ``label`` (B, 1, X, Y, Z) class
    indices and, when the cache carries one, ``teacher`` (B, 1, X, Y, Z) soft targets in [0, 1]
    (zero beyond a field-of-view cut). A network whose output is ``margin`` voxels smaller per side
    (tang2020) is scored on the targets' centre. The expert labels give Dice + cross-entropy; the
    teacher adds ``teacher_weight`` times the distillation loss on the main output
    (liverseg/teacher.py).
    """
    label, teacher = batch["label"], batch.get("teacher")
    if margin:
        inner = (slice(None), slice(None), *(slice(margin, -margin),) * 3)
        label = label[inner]
        teacher = teacher[inner] if teacher is not None else None
    predictions = split_outputs(outputs.float())
    loss = loss_fn(predictions, label)
    if teacher_weight > 0 and teacher is not None:
        from liverseg.teacher import distillation_loss, main_output

        loss = loss + teacher_weight * distillation_loss(main_output(predictions), teacher, label)
    return loss


def _train_step(batch: dict, step: int, model: nn.Module, opt: _Optimisation, run: _Run,
                robust: Robustness | None) -> torch.Tensor:
    """One optimiser step on the batch of step ``step`` (0-based); returns the (detached) loss."""
    dev = run.dev
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    if robust is not None:
        batch = robust(batch, step)
    image = batch["image"]
    if run.config.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(dev.type, dtype=opt.amp_dtype, enabled=opt.amp_dtype is not None):
        outputs = model(image)
    loss = compute_loss(opt.loss_fn, outputs, batch, margin=network_margin(run.config.model),
                        teacher_weight=run.config.train.teacher_weight)
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if run.config.train.grad_clip > 0:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(opt.network.parameters(), run.config.train.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss.detach()


FIT_FIRST, FIT_EVERY = 5, 20  # timing starts after a warm-up; the schedule is refitted every FIT_EVERY steps


def _fit_to_time(progress: _Progress, opt: _Optimisation, run: _Run, elapsed: float, bar: Any) -> None:
    """train.fit_to_time: from the time the last FIT_EVERY steps took, set the schedule's length (at
    most train.iterations) so that it ends, learning rate annealed, at train.max_seconds. Refitted
    every FIT_EVERY steps while more than that remain, as the machine's load changes (runs sharing a
    GPU start and end at different times). Rank 0 decides for every rank."""
    t = run.config.train
    step = progress.step
    if t.max_seconds is None or step < FIT_FIRST or (step - FIT_FIRST) % FIT_EVERY:
        return
    now = time.perf_counter()
    if progress.fit_clock is not None and (progress.total is None or progress.total - step > FIT_EVERY):
        per_step = (now - progress.fit_clock) / FIT_EVERY
        left = max(t.max_seconds - elapsed, 0.0) * 0.97  # a little slack for the final checkpoint
        total = torch.tensor([min(t.iterations, step + max(1, int(left / per_step)))], device=run.dev)
        if run.world > 1:
            torch.distributed.broadcast(total, 0)
        progress.total = int(total.item())
        opt.scheduler.total_iters = progress.total  # PolynomialLR decays from here to the new end
        if bar is not None:
            bar.total = progress.total
            bar.refresh()
    progress.fit_clock = now


def _out_of_time(run: _Run, elapsed: float) -> bool:
    """train.max_seconds has passed; under DDP rank 0 decides, so every rank stops at the same step."""
    t = run.config.train
    out = t.max_seconds is not None and elapsed >= t.max_seconds
    if run.world > 1 and t.max_seconds is not None:
        flag = torch.tensor([int(out)], device=run.dev)
        torch.distributed.broadcast(flag, 0)
        out = bool(flag.item())
    return out


def _train(run: _Run, *, resume: bool, quiet: bool,
           on_step: Callable[[int, dict], None] | None) -> TrainResult:
    t, dev = run.config.train, run.dev
    ckpt_dir = run.run_dir / CHECKPOINT_DIR
    _seed(run.config, dev)
    fixed, augment = build_transforms(run.config)
    cases = cached_cases(run.cache, run.train_ids, fixed, t.cache_rate)
    val_cases = [load_case(run.cache, c) for c in run.val_ids] if run.rank == 0 else []

    opt = _optimisation(run.config, dev)
    resumable = resume and (ckpt_dir / LAST_CHECKPOINT).is_file()
    progress = restore_checkpoint(ckpt_dir / LAST_CHECKPOINT, run.config, opt) if resumable else _Progress()
    model = _forward_model(opt, run)
    robust = (Robustness(t, run.plan.preprocess.intensity, run.plan.preprocess.target_spacing[2],
                         rank=run.rank) if Robustness.wanted(t) else None)
    log = TrainLog(run.run_dir, resume=resume, step=progress.step) if run.rank == 0 else None
    loader = patch_loader(cases, augment, t, start=progress.step, rank=run.rank, world=run.world,
                          pin_memory=dev.type == "cuda")
    bar = progress_bar(t.iterations, progress.step, enabled=run.rank == 0 and not quiet)
    last_val: dict | None = None
    model.train()
    try:
        for batch in loader:
            lr = opt.optimizer.param_groups[0]["lr"]
            loss = _train_step(batch, progress.step, model, opt, run, robust)
            progress.step += 1
            loss_value = mean_across_ranks(float(loss), dev)
            elapsed = time.perf_counter() - run.started[0]
            if t.fit_to_time:
                _fit_to_time(progress, opt, run, elapsed, bar)
            final = progress.step >= (progress.total or t.iterations) or _out_of_time(run, elapsed)
            if log is not None:  # rank 0 validates, logs and checkpoints
                val = None
                if val_cases and (progress.step % t.val_every == 0 or final):
                    val = last_val = validate(opt.network, val_cases, run.config, dev)
                    if not math.isnan(val["dice"]) and val["dice"] > progress.best:
                        progress.best, progress.best_step = val["dice"], progress.step
                        save_checkpoint(ckpt_dir / BEST_CHECKPOINT, run, opt, progress, full=False)
                        write_bundle(run, opt.network.state_dict(), progress, val)
                row = step_row(progress.step, loss_value, lr, elapsed, val)
                log.append(row)
                if progress.step % t.checkpoint_every == 0 or final:
                    save_checkpoint(ckpt_dir / LAST_CHECKPOINT, run, opt, progress, full=True)
                if val is not None or final:
                    log.plot()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False,
                                    dice=f"{progress.best:.3f}" if progress.best_step is not None else "-")
                    bar.update(1)
                if on_step is not None:
                    on_step(progress.step, row)
            if final:
                break
    finally:
        if bar is not None:
            bar.close()
    if run.rank == 0:
        if progress.step == 0:
            raise LiversegError("no training step was run (train.iterations already reached?)", run.run_dir)
        if not run.val_ids or progress.best_step is None:
            # Without validation, or when validation never gave a Dice: the bundle holds the last weights.
            write_bundle(run, opt.network.state_dict(), progress, last_val)
    barrier()
    return TrainResult(run_dir=run.run_dir, bundle=run.run_dir,
                       best_dice=progress.best if progress.best_step is not None else None,
                       best_iteration=progress.best_step, iterations=progress.step,
                       seconds=time.perf_counter() - run.started[0],
                       cpu_seconds=time.process_time() - run.started[1],
                       train_cases=run.train_ids, val_cases=run.val_ids)
