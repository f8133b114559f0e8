"""Benchmark: liverseg preprocessing vs the MONAI bundle transform chain, per case, side by side.

Both sides do the same job on the same case: read CT and label, reorient to RAS, resample to the
same spacing (image linear, label as labels), window HU -175..250 to [0, 1], crop to the body.

* ours:  ``read_ct``/``read_label`` -> ``to_model_space`` -> ``label_to_model_space`` (one-hot)
* MONAI: LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged
  -> CropForegroundd (as in MONAI's spleen/liver bundles)

Each (case, side) runs in its own fresh subprocess, so peak RSS (``ru_maxrss``) is that side's
alone; the time is the work only (imports excluded), best of ``--repeats`` runs in the process (the
first run also pays one-off costs such as lazy imports and allocator warm-up, on both sides).
Usage::

    python pipelines/bench_preprocess.py [--dataset ../shared/data/liver] [--spacing 3]
        [--threads 1] [--repeats 3] [--out bench_out/preprocess.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _ours(image: str, label: str, spacing: float) -> tuple[list[int], float]:
    from liverseg.config import PreprocessConfig
    from liverseg.io import read_ct, read_label
    from liverseg.modelspace import label_to_model_space, to_model_space

    cfg = PreprocessConfig(target_spacing=(spacing, spacing, spacing))
    ct, lab = read_ct(image), read_label(label)
    tensor, record = to_model_space(ct, cfg)
    model_label = label_to_model_space(lab.array, record, 3)
    voxel_ml = spacing**3 / 1000
    return list(tensor.shape), float((model_label > 0).sum() * voxel_ml)


def _monai_chain(spacing: float):  # type: ignore[no-untyped-def]
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(spacing, spacing, spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image"),
    ])


def _monai(image: str, label: str, spacing: float) -> tuple[list[int], float]:
    out = _monai_chain(spacing)({"image": image, "label": label})
    voxel_ml = spacing**3 / 1000
    return list(out["image"].shape), float((out["label"] > 0).sum().item() * voxel_ml)


def worker(side: str, image: str, label: str, spacing: float, threads: int, repeats: int) -> None:
    """One side on one case, in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    if side == "monai":
        _monai_chain(spacing)  # import MONAI's transform modules before the clock starts
    else:
        import liverseg.modelspace  # noqa: F401
    rss_after_import = _rss_mb()
    func = _ours if side == "ours" else _monai
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        shape, liver_ml = func(image, label, spacing)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(times), "all_seconds": times, "peak_rss_mb": _rss_mb(),
                      "rss_after_import_mb": rss_after_import, "model_shape": shape,
                      "liver_ml": liver_ml}))


def run_side(side: str, image: Path, label: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", side, str(image), str(label),
           "--spacing", str(args.spacing), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed on {image}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "liver")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "preprocess.json")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "IMAGE", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, image, label = args.worker
        worker(side, image, label, args.spacing, args.threads, args.repeats)
        return

    sys.path.insert(0, str(REPO))
    from liverseg.datasets import find_dataset

    cases = find_dataset(args.dataset, require_labels=True).labelled
    rows = []
    header = (f"{'case':<12}{'ours s':>9}{'monai s':>9}{'time ratio':>12}{'ours MB':>10}{'monai MB':>10}"
              f"{'mem ratio':>11}{'liver mL ours/monai':>22}")
    print(f"preprocessing at {args.spacing} mm, {args.threads} thread(s), best of {args.repeats}")
    print(header)
    for case in cases:
        assert case.label is not None
        ours = run_side("ours", case.image, case.label, args)
        monai = run_side("monai", case.image, case.label, args)
        row = {
            "case": case.case_id,
            "ours": ours,
            "monai": monai,
            "time_ratio_monai_over_ours": monai["seconds"] / ours["seconds"],
            "peak_rss_ratio_monai_over_ours": monai["peak_rss_mb"] / ours["peak_rss_mb"],
        }
        rows.append(row)
        print(f"{case.case_id:<12}{ours['seconds']:>9.2f}{monai['seconds']:>9.2f}"
              f"{row['time_ratio_monai_over_ours']:>11.2f}x{ours['peak_rss_mb']:>10.0f}"
              f"{monai['peak_rss_mb']:>10.0f}{row['peak_rss_ratio_monai_over_ours']:>10.2f}x"
              f"{ours['liver_ml']:>12.1f}/{monai['liver_ml']:.1f}")
    total_ours = sum(r["ours"]["seconds"] for r in rows)
    total_monai = sum(r["monai"]["seconds"] for r in rows)
    summary = {
        "total_seconds_ours": total_ours,
        "total_seconds_monai": total_monai,
        "time_ratio_monai_over_ours": total_monai / total_ours,
        "max_peak_rss_mb_ours": max(r["ours"]["peak_rss_mb"] for r in rows),
        "max_peak_rss_mb_monai": max(r["monai"]["peak_rss_mb"] for r in rows),
        "ours_not_slower": total_ours <= total_monai,
    }
    print(f"total: ours {total_ours:.2f} s, MONAI {total_monai:.2f} s -> MONAI/ours "
          f"{summary['time_ratio_monai_over_ours']:.2f}x; peak RSS ours "
          f"{summary['max_peak_rss_mb_ours']:.0f} MB, MONAI {summary['max_peak_rss_mb_monai']:.0f} MB")
    result = {
        "benchmark": "preprocess",
        "spacing_mm": args.spacing,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "cases": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
