"""The preprocess cache on disk: its layout and how it is read (the contract with ``liverseg train``).

Layout::

    CACHE/preprocess.json          resolved PreprocessConfig, labels, dataset path and layout
    CACHE/fingerprint.json         spacings, shapes, foreground HU statistics, label volumes
    CACHE/cases/<case>.npz         image float32 (1, X, Y, Z) normalised; label uint8 (X, Y, Z);
                                   optionally teacher float (X, Y, Z) in [0, 1] (added by distillation)
    CACHE/cases/<case>.json        sidecar: sources (size, mtime), spatial record, volumes, config hash
    CACHE/samples/<case>.npy       seeded sample of foreground HU (for the fingerprint on reruns)

``preprocess.py`` writes it; a case is complete when its sidecar is there (written last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg.atomic import atomic_path
from liverseg.config import PreprocessConfig
from liverseg.errors import LiversegError

CACHE_VERSION = 1
CONFIG_FILE = "preprocess.json"
FINGERPRINT_FILE = "fingerprint.json"
CASES_DIR = "cases"
SAMPLES_DIR = "samples"


@dataclass
class CachedCase:
    case_id: str
    image: np.ndarray  # float32 (1, X, Y, Z)
    label: np.ndarray | None  # uint8 (X, Y, Z)
    sidecar: dict
    # Optional per-voxel soft target in [0, 1] (X, Y, Z) float32, saved into the npz by whoever
    # distils a teacher model; training carries it through the patch stream as batch["teacher"].
    teacher: np.ndarray | None = None


def case_paths(cache_dir: str | Path, case_id: str) -> tuple[Path, Path]:
    cases = Path(cache_dir) / CASES_DIR
    return cases / f"{case_id}.npz", cases / f"{case_id}.json"


def is_cache(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / CASES_DIR).is_dir()


def read_cache_config(cache_dir: str | Path) -> tuple[PreprocessConfig, dict[int, str]]:
    """The resolved preprocessing config and label names the cache was made with."""
    path = Path(cache_dir) / CONFIG_FILE
    if not path.is_file():
        raise LiversegError("not a liverseg cache (no preprocess.json); run 'liverseg preprocess "
                            "DATASET -o CACHE' first", cache_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        cfg = PreprocessConfig.model_validate(meta["preprocess"])
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise LiversegError(f"cache config is unreadable ({type(exc).__name__}); rerun "
                            "'liverseg preprocess' with --force", path) from None
    return cfg, labels


def list_cached_cases(cache_dir: str | Path) -> list[str]:
    """Case ids with a complete entry (array file and sidecar), sorted."""
    folder = Path(cache_dir) / CASES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json")
                  if not p.name.startswith(".") and (folder / f"{p.stem}.npz").is_file())


def load_cached_case(cache_dir: str | Path, case_id: str) -> CachedCase:
    npz_path, json_path = case_paths(cache_dir, case_id)
    if not (npz_path.is_file() and json_path.is_file()):
        raise LiversegError(f"case '{case_id}' is not in the cache; rerun 'liverseg preprocess'",
                            cache_dir)
    try:
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
        with np.load(npz_path) as data:
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"], dtype=np.uint8) if "label" in data.files else None
            teacher = np.asarray(data["teacher"], dtype=np.float32) if "teacher" in data.files else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise LiversegError(f"cached case is unreadable ({type(exc).__name__}); rerun "
                            "'liverseg preprocess' with --force", npz_path) from None
    return CachedCase(case_id=case_id, image=image, label=label, sidecar=sidecar, teacher=teacher)


# ---------------------------------------------------------------------------------------------
# Upkeep (by preprocess.py): samples, reuse on reruns, removal


def save_sample(cache: Path, case_id: str, sample: np.ndarray) -> None:
    with atomic_path(cache / SAMPLES_DIR / f"{case_id}.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, sample)


def load_sample(cache: Path, case_id: str) -> np.ndarray:
    return np.load(cache / SAMPLES_DIR / f"{case_id}.npy")


def reusable_sidecar(cache: Path, case_id: str, stamps: dict) -> dict | None:
    """The sidecar of a complete earlier run of this case if its sources' ``stamps`` are unchanged."""
    npz_path, json_path = case_paths(cache, case_id)
    sample_path = cache / SAMPLES_DIR / f"{case_id}.npy"
    if not (npz_path.is_file() and json_path.is_file() and sample_path.is_file()):
        return None
    try:
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("cache_version") != CACHE_VERSION or sidecar.get("sources") != stamps:
        return None
    return sidecar


def remove_case(cache: Path, case_id: str) -> None:
    for path in (*case_paths(cache, case_id), cache / SAMPLES_DIR / f"{case_id}.npy"):
        if path.is_file():
            path.unlink()


def remove_orphans(cache: Path, keep: set[str]) -> None:
    """Drop cached cases no longer in the dataset, so the cache matches preprocess.json."""
    for folder, suffixes in ((cache / CASES_DIR, (".npz", ".json")), (cache / SAMPLES_DIR, (".npy",))):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix in suffixes and not path.name.startswith(".") and path.stem not in keep:
                path.unlink()


def remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(path.iterdir()):
        path.rmdir()
