"""Dataset -> model-space cache: one compressed array file per case, a JSON sidecar and a fingerprint.

The cache's layout, and reading it, are in ``cache.py`` (the contract with ``liverseg train``).

Like nnU-Net, the fingerprint (``fingerprint.py``) samples foreground (label > 0) HU from every
case, so z-score normalisation can be planned from the data. A rerun skips cases whose sources
and resolved config are unchanged (the sidecar is written last, so it marks a complete case);
``force`` redoes them. Every file is written atomically, and a case that fails leaves nothing
behind; temporary files of a killed run are removed by the next.
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
from liverseg.cache import (
    CACHE_VERSION,
    CASES_DIR,
    CONFIG_FILE,
    FINGERPRINT_FILE,
    SAMPLES_DIR,
    CachedCase,
    case_paths,
    is_cache,
    list_cached_cases,
    load_cached_case,
    load_sample,
    read_cache_config,
    remove_case,
    remove_empty_tree,
    remove_orphans,
    reusable_sidecar,
    save_sample,
)
from liverseg.config import PreprocessConfig
from liverseg.datasets import Case, Dataset, find_dataset
from liverseg.errors import LiversegError
from liverseg.fingerprint import (
    SAMPLES_PER_CASE,
    fingerprint_entry,
    num_classes_of,
    resolve_config,
    summarise_fingerprint,
)
from liverseg.io import Volume, read_ct, read_label, same_grid


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
    entry, sample = fingerprint_entry(volume, label, labels)
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
        entry, sample = fingerprint_entry(image, label, labels)
    except Exception as exc:
        return _case_error(case, "free memory or run with fewer --workers", exc)
    save_sample(Path(cache_dir), case.case_id, sample)
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
    save_sample(cache, case.case_id, sample)
    with atomic_path(npz_path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    # The sidecar goes last: its presence (with matching stamps and hash) marks a complete case.
    write_text_atomic(json_path, json.dumps(sidecar, indent=1))
    return {"case_id": case.case_id, "entry": sidecar["fingerprint"], "sample": sample,
            "warnings": sidecar["warnings"]}


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
    try:
        stamps = _stamps(case)
    except OSError:  # the source is gone: reported when the case is read
        return None
    return reusable_sidecar(cache, case.case_id, stamps)


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
                samples[c.case_id] = load_sample(cache, c.case_id)
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
                samples[c.case_id] = load_sample(cache, c.case_id)
        else:
            jobs.append((c, resolved.model_dump(mode="json"), labels, str(cache), digest))
    results = _run_jobs(_case_job, jobs, workers, "preprocess", quiet)
    collect(results)
    report.done = sorted(r["case_id"] for r in results if "error" not in r)
    report.warnings = sorted((r["case_id"], w) for r in results for w in r.get("warnings", []))

    for case_id in failed:  # a failed case leaves nothing, not even an earlier run's output
        entries.pop(case_id, None)
        samples.pop(case_id, None)
        remove_case(cache, case_id)
    report.failed = [(case_id, failed[case_id]) for case_id in sorted(failed)]

    ok = [c.case_id for c in ds.cases if c.case_id not in failed]
    if not ok:
        if created:
            remove_empty_tree(cache)
        return report
    remove_orphans(cache, set(ok))
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


__all__ = [
    "CACHE_VERSION",
    "SAMPLES_DIR",
    "SAMPLES_PER_CASE",
    "CachedCase",
    "PreprocessReport",
    "case_paths",
    "is_cache",
    "list_cached_cases",
    "load_cached_case",
    "num_classes_of",
    "preprocess_case",
    "preprocess_dataset",
    "read_cache_config",
    "resolve_config",
    "summarise_fingerprint",
]
