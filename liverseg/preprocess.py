"""Dataset -> model-space cache: one compressed array file per case, a JSON sidecar and a fingerprint.

Cache layout (the contract with ``liverseg train``)::

    CACHE/preprocess.json          resolved PreprocessConfig, labels, dataset path and layout
    CACHE/fingerprint.json         spacings, shapes, foreground HU statistics, label volumes
    CACHE/cases/<case>.npz         image float32 (1, X, Y, Z) normalised; label uint8 (X, Y, Z)
    CACHE/cases/<case>.json        sidecar: sources (size, mtime), spatial record, volumes, config hash
    CACHE/samples/<case>.npy       seeded sample of foreground HU (for the fingerprint on reruns)

Like nnU-Net, the fingerprint samples foreground (label > 0) HU from every case, so z-score
normalisation can be planned from the data. A rerun skips cases whose sources and resolved config
are unchanged (the sidecar is written last, so it marks a complete case); ``force`` redoes them.
Every file is written atomically, and a case that fails leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.atomic import atomic_path, remove_stale_parts, write_text_atomic
from liverseg.config import PreprocessConfig
from liverseg.datasets import Case, Dataset, find_dataset
from liverseg.errors import LiversegError
from liverseg.io import Volume, read_ct, read_label, same_grid

CACHE_VERSION = 1
CONFIG_FILE = "preprocess.json"
FINGERPRINT_FILE = "fingerprint.json"
CASES_DIR = "cases"
SAMPLES_DIR = "samples"
SAMPLES_PER_CASE = 10_000
SAMPLE_SEED = 1234
PERCENTILES = (0.5, 99.5)


@dataclass
class PreprocessReport:
    """What a dataset run did; ``failed`` holds (case or file, one-line message)."""

    cache_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (case, note): usable but doubtful
    layout: str = ""
    fingerprint: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {
            "cache_dir": str(self.cache_dir),
            "layout": self.layout,
            "done": self.done,
            "skipped": self.skipped,
            "failed": [{"case": c, "error": m} for c, m in self.failed],
            "warnings": [{"case": c, "warning": m} for c, m in self.warnings],
        }


@dataclass
class CachedCase:
    case_id: str
    image: np.ndarray  # float32 (1, X, Y, Z)
    label: np.ndarray | None  # uint8 (X, Y, Z)
    sidecar: dict


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def source_stamp(path: str | Path) -> dict:
    """Size and modification time of a file (or of a DICOM folder's files), to detect changes."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file()]
        stats = [f.stat() for f in files]
        size = sum(s.st_size for s in stats)
        mtime = max((s.st_mtime_ns for s in stats), default=p.stat().st_mtime_ns)
    else:
        st = p.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"path": str(p.resolve()), "size": int(size), "mtime_ns": int(mtime)}


def num_classes_of(labels: dict[int, str]) -> int:
    return max(labels) + 1 if labels else 1


def _read_case(case: Case, labels: dict[int, str]) -> tuple[Volume, Volume | None]:
    """Read and validate a case: 3D image, label on the same grid, only declared label values."""
    image = read_ct(case.image)
    if case.label is None:
        return image, None
    label = read_label(case.label)
    if not same_grid(image, label):
        raise LiversegError(
            f"label grid (shape {label.shape}, spacing {_fmt(label.spacing)}, "
            f"{label.axcodes}) does not match image {case.image} (shape {image.shape}, spacing "
            f"{_fmt(image.spacing)}, {image.axcodes}); give the label made on this image's grid",
            case.label,
        )
    present = np.flatnonzero(np.bincount(label.array.ravel(), minlength=1))
    unknown = sorted(int(v) for v in present if int(v) not in labels)
    if unknown:
        declared = ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))
        raise LiversegError(
            f"label values {unknown} are not among the declared labels ({declared}); fix the "
            "label map or declare the labels in dataset.json",
            case.label,
        )
    return image, label


def _fmt(values: Iterable[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def _fingerprint_entry(image: Volume, label: Volume | None,
                       labels: dict[int, str]) -> tuple[dict, np.ndarray]:
    """Per-case fingerprint (geometry, label volumes in mL on the native grid) and a HU sample."""
    entry: dict[str, Any] = {
        "shape": list(image.shape),
        "spacing": [round(s, 6) for s in image.spacing],
        "axcodes": image.axcodes,
        "hu_min": float(image.array.min()),
        "hu_max": float(image.array.max()),
    }
    sample = np.zeros(0, dtype=np.float32)
    if label is not None:
        counts = np.bincount(label.array.ravel(), minlength=num_classes_of(labels))
        voxel_ml = image.voxel_volume_ml
        entry["label_voxels"] = {str(k): int(counts[k]) for k in sorted(labels)}
        entry["label_volumes_ml"] = {labels[k]: round(float(counts[k] * voxel_ml), 4)
                                     for k in sorted(labels) if k != 0}
        entry["foreground_ml"] = round(float(counts[1:].sum() * voxel_ml), 4)
        foreground = image.array[label.array > 0]
        rng = np.random.default_rng(SAMPLE_SEED)
        if foreground.size > SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
        sample = np.asarray(foreground, dtype=np.float32)
        entry["foreground_voxels"] = int(counts[1:].sum())
    return entry, sample


def preprocess_case(case: Case, cfg: PreprocessConfig,
                    labels: dict[int, str]) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read, validate and move one case to model space, in memory.

    Returns the normalised image (float32, (1, X, Y, Z)), the label (uint8, (X, Y, Z)) or None,
    and the sidecar dict (sources, spatial record, shapes, label volumes).
    """
    image, label, sidecar, _ = _preprocess_case(case, cfg, labels)
    return image, label, sidecar


def _preprocess_case(case: Case, cfg: PreprocessConfig, labels: dict[int, str]
                     ) -> tuple[np.ndarray, np.ndarray | None, dict, np.ndarray]:
    from liverseg.modelspace import label_to_model_space, to_model_space

    _check_intensity(cfg)
    volume, label = _read_case(case, labels)
    entry, sample = _fingerprint_entry(volume, label, labels)
    tensor, record = to_model_space(volume, cfg)
    image = tensor.numpy().astype(np.float32, copy=False)
    warnings = list(volume.warnings)
    del volume  # the native HU array is the largest thing held; free it before the label work
    model_label = None
    sidecar: dict[str, Any] = {
        "case_id": case.case_id,
        "cache_version": CACHE_VERSION,
        "sources": {"image": source_stamp(case.image)},
        "spatial": record.to_dict(),
        "model_shape": list(record.model_shape),
        "model_spacing": [round(s, 6) for s in record.model_spacing],
        "fingerprint": entry,
        "warnings": warnings,
    }
    if label is not None and case.label is not None:
        model_label = label_to_model_space(label.array, record, num_classes_of(labels))
        sidecar["sources"]["label"] = source_stamp(case.label)
        counts = np.bincount(model_label.ravel(), minlength=num_classes_of(labels))
        model_voxel_ml = float(np.prod(record.model_spacing)) / 1000.0
        sidecar["label_voxels"] = entry["label_voxels"]
        sidecar["label_volumes_ml"] = entry["label_volumes_ml"]
        sidecar["model_label_volumes_ml"] = {
            labels[k]: round(float(counts[k] * model_voxel_ml), 4) for k in sorted(labels) if k != 0}
    return image, model_label, sidecar, sample


def _check_intensity(cfg: PreprocessConfig) -> None:
    intensity = cfg.intensity
    if intensity.mode == "zscore" and (intensity.mean is None or intensity.std is None
                                       or intensity.std <= 0):
        raise LiversegError("intensity.mode zscore needs intensity.mean and intensity.std; run "
                            "'liverseg preprocess' on labelled data to take them from the "
                            "fingerprint, or set them with --set")


# ---------------------------------------------------------------------------------------------
# Workers (top level so a process pool can pickle them)
# ---------------------------------------------------------------------------------------------


def _init_worker() -> None:
    # Several worker processes on few cores: one thread each avoids oversubscription.
    import torch

    torch.set_num_threads(1)


def _case_error(case: Case, memory_hint: str, exc: Exception) -> dict:
    """A worker's failure as that case's one-line error (a bug must not sink the whole batch)."""
    if isinstance(exc, LiversegError):
        message = str(exc)
    elif isinstance(exc, MemoryError):
        message = f"{case.image}: out of memory; {memory_hint}"
    else:
        message = (f"{case.image}: unexpected {type(exc).__name__}: {exc}; "
                   "please report this with the file")
    return {"case_id": case.case_id, "error": message}


def _fingerprint_job(case: Case, labels: dict[int, str], cache_dir: str) -> dict:
    try:
        image, label = _read_case(case, labels)
        entry, sample = _fingerprint_entry(image, label, labels)
    except Exception as exc:
        return _case_error(case, "free memory or run with fewer --workers", exc)
    _save_sample(Path(cache_dir), case.case_id, sample)
    return {"case_id": case.case_id, "entry": entry, "sample": sample}


def _case_job(case: Case, cfg_json: dict, labels: dict[int, str], cache_dir: str,
              config_hash: str) -> dict:
    cfg = PreprocessConfig.model_validate(cfg_json)
    cache = Path(cache_dir)
    try:
        image, label, sidecar, sample = _preprocess_case(case, cfg, labels)
    except Exception as exc:
        return _case_error(case, "free memory, run with fewer --workers or a coarser target_spacing", exc)
    sidecar["config_hash"] = config_hash
    arrays = {"image": image} if label is None else {"image": image, "label": label}
    npz_path, json_path = case_paths(cache, case.case_id)
    # The sidecar marks a complete case: an earlier run's goes first, so a crash while the new
    # files are written leaves the case incomplete rather than old sidecar + new arrays.
    json_path.unlink(missing_ok=True)
    _save_sample(cache, case.case_id, sample)
    with atomic_path(npz_path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    # The sidecar goes last: its presence (with matching stamps and hash) marks a complete case.
    write_text_atomic(json_path, json.dumps(sidecar, indent=1))
    return {"case_id": case.case_id, "entry": sidecar["fingerprint"], "sample": sample,
            "warnings": sidecar["warnings"]}


def _save_sample(cache: Path, case_id: str, sample: np.ndarray) -> None:
    with atomic_path(cache / SAMPLES_DIR / f"{case_id}.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, sample)


def case_paths(cache_dir: str | Path, case_id: str) -> tuple[Path, Path]:
    cases = Path(cache_dir) / CASES_DIR
    return cases / f"{case_id}.npz", cases / f"{case_id}.json"


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def config_hash(cfg: PreprocessConfig, labels: dict[int, str]) -> str:
    payload = json.dumps({"preprocess": cfg.model_dump(mode="json"),
                          "labels": {str(k): v for k, v in sorted(labels.items())},
                          "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stamps(case: Case) -> dict:
    stamps = {"image": source_stamp(case.image)}
    if case.label is not None:
        stamps["label"] = source_stamp(case.label)
    return stamps


def _previous(cache: Path, case: Case) -> dict | None:
    """The sidecar of a complete earlier run of this case if its sources are unchanged."""
    npz_path, json_path = case_paths(cache, case.case_id)
    sample_path = cache / SAMPLES_DIR / f"{case.case_id}.npy"
    if not (npz_path.is_file() and json_path.is_file() and sample_path.is_file()):
        return None
    try:
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
        current = _stamps(case)
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("cache_version") != CACHE_VERSION or sidecar.get("sources") != current:
        return None
    return sidecar


def _load_sample(cache: Path, case_id: str) -> np.ndarray:
    return np.load(cache / SAMPLES_DIR / f"{case_id}.npy")


def _run_jobs(func: Callable[..., dict], jobs: list[tuple], workers: int, desc: str,
              quiet: bool) -> list[dict]:
    """Run jobs in this process (workers <= 1) or a process pool, with a progress bar on stderr."""
    if not jobs:
        return []
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, file=sys.stderr, dynamic_ncols=True, unit="case")
    results: list[dict] = []
    try:
        if workers <= 1:
            for job in jobs:
                results.append(func(*job))
                if bar is not None:
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                     initializer=_init_worker) as pool:
                futures = [pool.submit(func, *job) for job in jobs]
                for future in as_completed(futures):
                    results.append(future.result())
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def summarise_fingerprint(entries: dict[str, dict], samples: dict[str, np.ndarray],
                          labels: dict[int, str]) -> dict:
    """nnU-Net-style dataset fingerprint from per-case entries and foreground HU samples."""
    pooled = [s for s in samples.values() if s.size]
    summary: dict[str, Any] = {"num_cases": len(entries)}
    if pooled:
        hu = np.concatenate(pooled).astype(np.float64)
        lo, hi = np.percentile(hu, PERCENTILES)
        summary["foreground_hu"] = {
            "percentile_00_5": float(lo), "percentile_99_5": float(hi),
            "mean": float(hu.mean()), "std": float(hu.std()), "median": float(np.median(hu)),
            "min": float(hu.min()), "max": float(hu.max()), "num_samples": int(hu.size),
        }
    if entries:
        spacings = np.array([e["spacing"] for e in entries.values()])
        shapes = np.array([e["shape"] for e in entries.values()])
        summary["median_spacing"] = np.median(spacings, axis=0).round(6).tolist()
        summary["median_shape"] = np.median(shapes, axis=0).tolist()
    volumes = {name: [e["label_volumes_ml"][name] for e in entries.values() if "label_volumes_ml" in e]
               for k, name in sorted(labels.items()) if k != 0}
    summary["label_volumes_ml_mean"] = {n: float(np.mean(v)) for n, v in volumes.items() if v}
    return {"cases": dict(sorted(entries.items())), "summary": summary,
            "labels": {str(k): v for k, v in sorted(labels.items())}}


def resolve_config(cfg: PreprocessConfig, fingerprint: dict) -> PreprocessConfig:
    """Fill z-score clipping bounds, mean and std from the fingerprint when they are not set."""
    intensity = cfg.intensity
    if intensity.mode != "zscore" or (intensity.mean is not None and intensity.std is not None):
        return cfg
    stats = fingerprint.get("summary", {}).get("foreground_hu")
    if not stats:
        raise LiversegError("intensity.mode zscore needs foreground statistics, but no case has a "
                            "label; add labels or set intensity.mean and intensity.std with --set")
    resolved = intensity.model_copy(update={
        "lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
        "mean": stats["mean"], "std": max(stats["std"], 1e-6)})
    return cfg.model_copy(update={"intensity": resolved})


def preprocess_dataset(dataset: str | Path, cache_dir: str | Path, cfg: PreprocessConfig, *,
                       workers: int = 1, force: bool = False, quiet: bool = True) -> PreprocessReport:
    """Preprocess every case of a dataset into ``cache_dir``; bad cases are reported, not fatal.

    Raises LiversegError (before writing anything) when the dataset itself cannot be used.
    """
    ds: Dataset = find_dataset(dataset)
    cache = Path(cache_dir)
    if cache.exists() and not cache.is_dir():
        raise LiversegError("cache path exists and is not a folder; choose another -o", cache)
    labels = dict(ds.labels)
    report = PreprocessReport(cache_dir=cache, layout=ds.layout)
    created = not cache.exists()
    remove_stale_parts(cache, cache / CASES_DIR, cache / SAMPLES_DIR)  # left by killed runs

    previous = {c.case_id: None if force else _previous(cache, c) for c in ds.cases}
    entries: dict[str, dict] = {}
    samples: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}

    def collect(results: list[dict]) -> None:
        for r in results:
            if "error" in r:
                failed[r["case_id"]] = r["error"]
            else:
                entries[r["case_id"]] = r["entry"]
                samples[r["case_id"]] = r["sample"]

    # z-score planned from the data needs the fingerprint of all cases before any is normalised.
    needs_plan = cfg.intensity.mode == "zscore" and (cfg.intensity.mean is None
                                                     or cfg.intensity.std is None)
    if needs_plan:
        for c in ds.cases:
            prev = previous[c.case_id]
            if prev is not None:
                entries[c.case_id] = prev["fingerprint"]
                samples[c.case_id] = _load_sample(cache, c.case_id)
        jobs = [(c, labels, str(cache)) for c in ds.cases if c.case_id not in entries]
        collect(_run_jobs(_fingerprint_job, jobs, workers, "fingerprint", quiet))
        if len(failed) < len(ds.cases):
            resolved = resolve_config(cfg, summarise_fingerprint(entries, samples, labels))
        else:
            resolved = cfg
    else:
        resolved = cfg
    digest = config_hash(resolved, labels)

    jobs = []
    for c in ds.cases:
        if c.case_id in failed:
            continue
        prev = previous[c.case_id]
        if prev is not None and prev.get("config_hash") == digest:
            report.skipped.append(c.case_id)
            entries[c.case_id] = prev["fingerprint"]
            if c.case_id not in samples:
                samples[c.case_id] = _load_sample(cache, c.case_id)
        else:
            jobs.append((c, resolved.model_dump(mode="json"), labels, str(cache), digest))
    results = _run_jobs(_case_job, jobs, workers, "preprocess", quiet)
    collect(results)
    report.done = sorted(r["case_id"] for r in results if "error" not in r)
    report.warnings = sorted((r["case_id"], w) for r in results for w in r.get("warnings", []))

    for case_id in failed:  # a failed case leaves nothing, not even an earlier run's output
        entries.pop(case_id, None)
        samples.pop(case_id, None)
        _remove_case(cache, case_id)
    report.failed = [(case_id, failed[case_id]) for case_id in sorted(failed)]

    ok = [c.case_id for c in ds.cases if c.case_id not in failed]
    if not ok:
        if created:
            _remove_empty_tree(cache)
        return report
    _remove_orphans(cache, set(ok))
    fingerprint = summarise_fingerprint({k: entries[k] for k in ok}, {k: samples[k] for k in ok},
                                        labels)
    report.fingerprint = fingerprint
    write_text_atomic(cache / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1))
    meta = {
        "preprocess": resolved.model_dump(mode="json"),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "dataset": str(Path(dataset).resolve()),
        "layout": ds.layout,
        "cases": sorted(ok),
        "config_hash": digest,
        "cache_version": CACHE_VERSION,
    }
    write_text_atomic(cache / CONFIG_FILE, json.dumps(meta, indent=1))
    return report


def _remove_case(cache: Path, case_id: str) -> None:
    for path in (*case_paths(cache, case_id), cache / SAMPLES_DIR / f"{case_id}.npy"):
        if path.is_file():
            path.unlink()


def _remove_orphans(cache: Path, keep: set[str]) -> None:
    """Drop cached cases no longer in the dataset, so the cache matches preprocess.json."""
    for folder, suffixes in ((cache / CASES_DIR, (".npz", ".json")), (cache / SAMPLES_DIR, (".npy",))):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix in suffixes and not path.name.startswith(".") and path.stem not in keep:
                path.unlink()


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(path.iterdir()):
        path.rmdir()


# ---------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------


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
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise LiversegError(f"cached case is unreadable ({type(exc).__name__}); rerun "
                            "'liverseg preprocess' with --force", npz_path) from None
    return CachedCase(case_id=case_id, image=image, label=label, sidecar=sidecar)


__all__ = [
    "CachedCase",
    "PreprocessReport",
    "is_cache",
    "list_cached_cases",
    "load_cached_case",
    "preprocess_case",
    "preprocess_dataset",
    "read_cache_config",
    "resolve_config",
]
