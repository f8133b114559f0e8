"""Training data: a preprocess cache -> cases in memory -> a seeded stream of augmented patches.

Reproducibility: patch number ``g`` (counted over the whole run, across DDP ranks) is a pure
function of ``(train.seed, g)``: it picks the case and seeds the random transforms. So the patch
stream does not depend on worker processes or on where a run was interrupted, which is what makes
``--resume`` exact.

Also here: which cached cases train and which validate (``resolve_splits``, nnU-Net's
``splits_final.json`` format).
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liverseg.config import Config, TrainConfig
from liverseg.distributed import barrier
from liverseg.errors import LiversegError
from liverseg.io import write_text_atomic

SPLITS_FILE = "splits.json"


# --------------------------------------------------------------------------------------------
# Cache and splits


def ensure_cache(data: Path, run_dir: Path, config: Config, rank: int, quiet: bool) -> Path:
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
    barrier()
    return cache


def read_splits(path: Path) -> list[dict]:
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
        found_table = read_splits(found)
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


def load_case(cache: Path, case_id: str) -> dict[str, Any]:
    """A labelled cached case as tensors: image (1, X, Y, Z) and label (1, X, Y, Z) float32, and
    teacher (1, X, Y, Z) float32 when the cache holds one for the case."""
    from liverseg.cache import case_paths, load_cached_case

    case = load_cached_case(cache, case_id)
    if case.label is None:
        raise LiversegError(f"case '{case_id}' has no label; training needs labelled cases", cache)
    out = {"case": case_id, "image": torch.from_numpy(case.image),
           "label": torch.from_numpy(case.label[None].astype(np.float32))}
    if case.teacher is not None:
        teacher = case.teacher
        if teacher.shape != case.label.shape or not (np.isfinite(teacher).all() and teacher.min() >= 0
                                                     and teacher.max() <= 1):
            raise LiversegError(f"the teacher array must be shaped like the label {list(case.label.shape)} "
                                f"with values in [0, 1], got shape {list(teacher.shape)}; rewrite it",
                                case_paths(cache, case_id)[0])
        out["teacher"] = torch.from_numpy(teacher[None])
    return out


def cases_with_teacher(cache: Path, case_ids: list[str]) -> bool:
    """Whether the cases carry a teacher array: all of them or none (a batch cannot mix)."""
    from liverseg.cache import case_paths

    having = []
    for case_id in case_ids:
        with np.load(case_paths(cache, case_id)[0]) as data:  # reads the archive's index only
            having.append("teacher" in data.files)
    if any(having) and not all(having):
        missing = [c for c, h in zip(case_ids, having, strict=True) if not h]
        raise LiversegError(f"some training cases have a teacher array and some do not (none: "
                            f"{', '.join(missing[:5])}); give every training case one, or none", cache)
    return any(having)


# --------------------------------------------------------------------------------------------
# Transforms and the patch stream


def build_transforms(config: Config) -> tuple[Callable, Callable]:
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
    # A teacher array (absent in most caches) travels with the label through every spatial step.
    keys = ["image", "label", "teacher"]
    fixed = Compose([
        SpatialPadd(keys, spatial_size=t.patch_size, allow_missing_keys=True),
        # Foreground/background voxel lists once per case, not once per patch.
        FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
    ])
    pos = t.pos_fraction
    random_part: list[Callable] = [RandCropByPosNegLabeld(
        keys, label_key="label", spatial_size=t.patch_size, pos=pos, neg=1.0 - pos, num_samples=1,
        fg_indices_key="label_fg", bg_indices_key="label_bg", allow_missing_keys=True)]
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
                        mode=("bilinear", "nearest", "bilinear"), padding_mode="border",
                        allow_missing_keys=True),
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis, allow_missing_keys=True) for axis in t.flip_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.2),
            RandShiftIntensityd("image", offsets=0.1, prob=0.2),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.2),
            RandGaussianNoised("image", prob=0.1, std=0.02),
        ]
    return fixed, Compose(random_part)


class CaseLoader:
    """Case id -> loaded and padded case (a class, not a lambda, so worker processes can pickle it)."""

    def __init__(self, cache: Path, fixed: Callable) -> None:
        self.cache, self.fixed = cache, fixed

    def __call__(self, item: dict) -> dict:
        return self.fixed(load_case(self.cache, item["case"]))


class PatchStream(torch.utils.data.Dataset):
    """Patch number ``g`` -> one augmented (image, label[, teacher]) patch, a pure function of (seed, g)."""

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
        out = self.transform({k: case[k] for k in ("image", "label", "label_fg", "label_bg", "teacher")
                              if k in case})
        if isinstance(out, list):
            out = out[0]
        return {k: torch.as_tensor(out[k]) for k in ("image", "label", "teacher") if k in out}


class PatchNumbers(torch.utils.data.Sampler):
    """This rank's patch numbers for steps start..stop-1: each step holds world*batch patches."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)


def cached_cases(cache: Path, case_ids: list[str], fixed: Callable, cache_rate: float
                 ) -> torch.utils.data.Dataset:
    """The training cases loaded and padded, with their foreground indices, kept in memory (the
    random part runs per patch in PatchStream). copy_cache=False: no transform works in place."""
    from monai.data import CacheDataset

    cases_with_teacher(cache, case_ids)  # all or none, checked before anything is loaded
    return CacheDataset([{"case": c} for c in case_ids], transform=CaseLoader(cache, fixed),
                        cache_rate=cache_rate, num_workers=0, progress=False, copy_cache=False)


def patch_loader(cases: torch.utils.data.Dataset, augment: Callable, t: TrainConfig, *, start: int,
                 rank: int, world: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of this rank's patches for steps ``start``..``t.iterations - 1``."""
    return torch.utils.data.DataLoader(
        PatchStream(cases, augment, t.seed), batch_size=t.batch_size,
        sampler=PatchNumbers(start, t.iterations, t.batch_size, rank, world),
        num_workers=t.num_workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if t.num_workers else None)
