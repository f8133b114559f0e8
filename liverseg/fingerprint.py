"""The dataset fingerprint (as nnU-Net's): per-case geometry and label volumes, and a seeded sample
of foreground (label > 0) HU from every case, pooled into statistics from which z-score
normalisation is planned (``resolve_config``). ``preprocess.py`` gathers it case by case.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from liverseg.config import PreprocessConfig
from liverseg.errors import LiversegError
from liverseg.io import Volume

SAMPLES_PER_CASE = 10_000
SAMPLE_SEED = 1234
PERCENTILES = (0.5, 99.5)


def num_classes_of(labels: dict[int, str]) -> int:
    return max(labels) + 1 if labels else 1


def fingerprint_entry(image: Volume, label: Volume | None,
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
