"""Benchmark ``liverseg infer`` end to end: against a MONAI-bundle-style pipeline (same network and
weights), on a long thin-slice scan, and as one batch call against one call per case.

1. Side by side, per CT of the dataset (default ``../shared/data/liver``; ``--cases`` picks some):

   * ours:  ``liverseg infer CT -o mask.nii.gz --model BUNDLE`` (read, model space with body crop,
     sliding window at the plan's ROI, probabilities to the native grid where they can change the
     labels, postprocessing, QC, atomic write, JSON sidecar);
   * MONAI: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(plan spacing) ->
     ScaleIntensityRanged(-175..250 -> 0..1) -> sliding_window_inference(ROI 96^3, overlap 0.5,
     gaussian) -> softmax -> Invertd -> argmax -> keep largest component (SciPy, see
     ``_keep_largest``) -> SaveImage, as in MONAI's CT segmentation bundles.

   ``--also liver_tang2020`` times other bundles in the same rotation, beside the two (speed, peak
   memory, liver Dice against the label). The sides alternate (A B A B ...) so that load on the
   shared machine hits both alike; the best of ``--repeats`` is kept.
2. A long thin-slice scan: ``--long-source`` (default tsexample, a whole trunk at 3 mm) resampled
   to 512 x 512 in-plane and 0.625 mm slices (538 slices), then ``liverseg infer`` on it. Its time
   per slice is compared with the first side-by-side case's.
3. A batch: ``liverseg infer DATASET -o OUT`` once (seconds per case = wall / cases) against one
   call per case (the per-case walls of part 1, measured for every case). Liver Dice of each
   batch mask against its reference label is recorded too.

Each run is a fresh ``python`` subprocess, started by a small wrapper whose only child it is, so
wall time is end to end (interpreter start, imports, model load included: what a user waits for)
and peak memory is that child's ``ru_maxrss`` alone. Every run gets the same thread count.
Usage::

    python pipelines/bench_infer.py [--dataset ../shared/data/liver] [--cases ircadb01 ...]
        [--model BUNDLE] [--also liver_tang2020] [--threads 2] [--repeats 1] [--no-long] [--no-batch]
        [--out pipelines/results/bench_infer.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
    "wall = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(json.dumps({'rc': rc, 'seconds': wall, 'peak_mb': peak}))\n"
)


def _keep_largest(pred):  # type: ignore[no-untyped-def]
    """MONAI KeepLargestConnectedComponent(applied_labels=[1, 2], independent=False), done with
    SciPy: MONAI's CPU path needs scikit-image, which liverseg does not depend on."""
    import numpy as np
    import torch
    from scipy import ndimage

    labels = pred.cpu().numpy()
    components, count = ndimage.label(labels[0] > 0)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        labels[0][components != sizes.argmax()] = 0
    pred.data = torch.from_numpy(labels)  # keep the MetaTensor (its affine) for SaveImage
    return pred


def monai_baseline(image: str, bundle_dir: str, out_dir: str, roi: int = 96) -> None:
    """The MONAI-bundle-style pipeline (runs in its own process via ``--baseline``)."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        Lambdad,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from liverseg.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    plan = bundle.plan.preprocess
    pre = Compose([
        LoadImaged("image"),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=plan.target_spacing, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=plan.intensity.lower, a_max=plan.intensity.upper,
                             b_min=0.0, b_max=1.0, clip=True),
    ])
    post = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted("pred", argmax=True),
        Lambdad("pred", _keep_largest),
        SaveImaged("pred", output_dir=out_dir, output_postfix="seg", separate_folder=False,
                   resample=False, output_dtype=np.uint8, print_log=False),
    ])
    data = pre({"image": image})
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(
            data["image"][None], roi_size=(roi, roi, roi), sw_batch_size=1, predictor=bundle.network,
            overlap=0.5, mode="gaussian")[0]
    post(data)


def _measure(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result['rc']})")
    return result


def _default_bundle(scratch: Path) -> Path:
    from liverseg.bundle import default_bundle_path, save_bundle
    from liverseg.config import Config
    from liverseg.networks import build_network

    if (default_bundle_path() / "plan.json").is_file():
        return default_bundle_path()
    cfg = Config()
    return save_bundle(scratch / "untrained_default", cfg, build_network(cfg.model).state_dict(),
                       card={"name": "untrained-default-architecture", "version": "bench"})


def _dice_liver(a: Path, b: Path) -> float:
    import nibabel as nib
    import numpy as np

    x, y = np.asarray(nib.load(a).dataobj) > 0, np.asarray(nib.load(b).dataobj) > 0
    total = x.sum() + y.sum()
    return float(2 * (x & y).sum() / total) if total else 1.0


def make_long_scan(source: Path, out: Path, slice_mm: float = 0.625, inplane: int = 512) -> Path:
    """A real CT resampled to ``inplane`` x ``inplane`` voxels and ``slice_mm`` slices (same extent,
    voxel corners aligned), saved as int16 NIfTI: a thin-slice scan of the same anatomy."""
    import numpy as np
    import torch

    from liverseg.io import Volume, read_ct, save_volume
    from liverseg.resample import resize

    ct = read_ct(source)
    extent = np.asarray(ct.shape) * np.asarray(ct.spacing)
    shape = (inplane, inplane, round(extent[2] / slice_mm))
    scale = np.asarray(ct.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1.0) / 2.0
    array = resize(torch.from_numpy(np.ascontiguousarray(ct.array))[None], shape)[0].numpy()
    return save_volume(Volume(np.rint(array).astype(np.int16), ct.affine @ index_map), out)


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def _ours_cmd(inputs: list[Path], out: Path, bundle: Path) -> list[str]:
    return [sys.executable, "-m", "liverseg", "infer", *map(str, inputs), "-o", str(out),
            "--model", str(bundle), "--device", "cpu", "--force", "--quiet"]


def side_by_side(cases: list, bundle: Path, scratch: Path, threads: int, repeats: int,
                 also: list[str] | None = None) -> list[dict]:
    """Part 1: ours against the MONAI-bundle style, case by case, alternating; ``also``: other
    bundles (shipped names or paths, e.g. liver_tang2020) timed in the same rotation."""
    import nibabel as nib

    also = also or []
    rows = []
    for case in cases:
        ours_out = scratch / "ours" / f"{case.case_id}.nii.gz"
        monai_dir = scratch / "monai"
        base_cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline", str(case.image),
                    str(bundle), str(monai_dir)]
        ours, base = [], []
        others: dict[str, list[dict]] = {name: [] for name in also}
        for _ in range(repeats):
            ours.append(_measure(_ours_cmd([case.image], ours_out, bundle), threads))
            base.append(_measure(base_cmd, threads))
            for name in also:
                out = scratch / "also" / Path(name).name / f"{case.case_id}.nii.gz"
                others[name].append(_measure(_ours_cmd([case.image], out, Path(name)), threads))
        best_ours, best_base = _best(ours), _best(base)
        sidecar = json.loads(ours_out.with_name(f"{case.case_id}.json").read_text())
        monai_mask = next(monai_dir.glob(f"{case.case_id}*seg.nii.gz"))
        rows.append({
            "case": case.case_id, "shape": list(nib.load(case.image).shape),
            "ours_s": round(best_ours["seconds"], 2), "monai_s": round(best_base["seconds"], 2),
            "speedup": round(best_base["seconds"] / best_ours["seconds"], 2),
            "ours_peak_mb": round(best_ours["peak_mb"]), "monai_peak_mb": round(best_base["peak_mb"]),
            "ours_runs_s": [round(r["seconds"], 2) for r in ours],
            "monai_runs_s": [round(r["seconds"], 2) for r in base],
            "ours_stage_s": sidecar["seconds"],
            "liver_dice_ours_vs_monai": round(_dice_liver(ours_out, monai_mask), 4),
            "also": {Path(name).name: {
                "s": round(_best(runs)["seconds"], 2), "peak_mb": round(_best(runs)["peak_mb"]),
                "speedup_vs_monai": round(best_base["seconds"] / _best(runs)["seconds"], 2),
                "runs_s": [round(r["seconds"], 2) for r in runs],
                "liver_dice_vs_label": round(_dice_liver(
                    scratch / "also" / Path(name).name / f"{case.case_id}.nii.gz", case.label), 4),
            } for name, runs in others.items()},
        })
        print(f"{case.case_id}: done", file=sys.stderr)
    return rows


def long_scan(source: Path, bundle: Path, scratch: Path, threads: int, repeats: int) -> dict:
    """Part 2: a thin-slice scan made from a real CT, segmented end to end."""
    import nibabel as nib

    scan = make_long_scan(source, scratch / "long" / "long_scan.nii.gz")
    out = scratch / "long_out" / "long_scan.nii.gz"
    runs = [_measure(_ours_cmd([scan], out, bundle), threads) for _ in range(repeats)]
    best = _best(runs)
    image = nib.load(scan)
    sidecar = json.loads(out.with_name("long_scan.json").read_text())
    return {"source": source.name, "shape": list(image.shape),
            "spacing_mm": [round(float(z), 4) for z in image.header.get_zooms()[:3]],
            "ours_s": round(best["seconds"], 2), "ours_peak_mb": round(best["peak_mb"]),
            "runs_s": [round(r["seconds"], 2) for r in runs],
            "s_per_slice": round(best["seconds"] / image.shape[2], 4), "ours_stage_s": sidecar["seconds"]}


def batch(dataset: Path, cases: list, singles: dict[str, float], bundle: Path, scratch: Path,
          threads: int, repeats: int) -> dict:
    """Part 3: the whole dataset in one call against one call per case (``singles``: case -> s)."""
    out = scratch / "batch"
    runs = [_measure(_ours_cmd([dataset], out, bundle), threads) for _ in range(repeats)]
    best = _best(runs)
    per_case = best["seconds"] / len(cases)
    rows = []
    for case in cases:
        sidecar = json.loads((out / f"{case.case_id}.json").read_text())
        row = {"case": case.case_id, "single_call_s": singles.get(case.case_id),
               "in_batch_total_s": sidecar["seconds"]["total"],
               "liver_dice": round(_dice_liver(out / f"{case.case_id}.nii.gz", case.label), 5)}
        if row["single_call_s"]:
            row["batch_per_case_over_single"] = round(per_case / row["single_call_s"], 3)
        rows.append(row)
    mean_single = sum(singles.values()) / len(singles) if singles else None
    return {"cases": len(cases), "batch_s": round(best["seconds"], 2),
            "batch_peak_mb": round(best["peak_mb"]), "runs_s": [round(r["seconds"], 2) for r in runs],
            "s_per_case": round(per_case, 2),
            "mean_single_call_s": round(mean_single, 2) if mean_single else None,
            "per_case_over_mean_single": round(per_case / mean_single, 3) if mean_single else None,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "liver")
    parser.add_argument("--cases", nargs="*", help="side-by-side cases (default: all)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--also", nargs="*", default=[],
                        help="other bundles timed beside it on the side-by-side cases (e.g. liver_tang2020)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the best is kept")
    parser.add_argument("--long-source", type=Path, default=None,
                        help="CT made into the long thin-slice scan (default: the dataset's tsexample)")
    parser.add_argument("--no-long", action="store_true", help="skip the long thin-slice scan")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch against single calls")
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_infer.json")
    parser.add_argument("--baseline", nargs=3, metavar=("IMAGE", "BUNDLE", "OUT_DIR"),
                        help=argparse.SUPPRESS)  # internal: run the MONAI side in this process
    args = parser.parse_args()
    if args.baseline:
        monai_baseline(*args.baseline)
        return

    from liverseg.datasets import find_dataset

    result: dict = {
        "benchmark": "liverseg infer end to end: vs MONAI-bundle-style inference, a long thin-slice "
                     "scan, a batch call vs one call per case",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "model": str(args.model or "shipped bundle if present, else untrained default architecture"),
        "repeats": args.repeats,
    }
    all_cases = find_dataset(args.dataset).cases
    chosen = [c for c in all_cases if not args.cases or c.case_id in args.cases]
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        scratch = Path(tmp)
        bundle = args.model or _default_bundle(scratch)
        # Which weights were timed, so a model card quotes figures of its own weights only.
        result["weights_sha256"] = hashlib.sha256((Path(bundle) / "model.pt").read_bytes()).hexdigest()
        result["roi_size"] = json.loads((Path(bundle) / "plan.json").read_text())["infer"]["roi_size"]
        rows = side_by_side(chosen, bundle, scratch, args.threads, args.repeats, args.also)
        result["rows"] = rows
        print(f"{'case':<10} {'shape':<16} {'ours s':>7} {'MONAI s':>8} {'speedup':>8} "
              f"{'ours MB':>8} {'MONAI MB':>9} {'Dice':>6}")
        for r in rows:
            print(f"{r['case']:<10} {'x'.join(map(str, r['shape'])):<16} {r['ours_s']:>7} {r['monai_s']:>8} "
                  f"{r['speedup']:>7}x {r['ours_peak_mb']:>8} {r['monai_peak_mb']:>9} "
                  f"{r['liver_dice_ours_vs_monai']:>6}")
            for name, other in r["also"].items():
                print(f"{'':<10} {name:<16} {other['s']:>7} {'':>8} {other['speedup_vs_monai']:>7}x "
                      f"{other['peak_mb']:>8} {'':>9} {other['liver_dice_vs_label']:>6} (vs label)")
        if not args.no_long:
            source = args.long_source or next(c.image for c in all_cases if c.case_id == "tsexample")
            long = long_scan(source, bundle, scratch, args.threads, args.repeats)
            reference = rows[0]
            long["reference_case"] = reference["case"]
            long["reference_s_per_slice"] = round(reference["ours_s"] / reference["shape"][2], 4)
            long["per_slice_over_reference"] = round(long["s_per_slice"] / long["reference_s_per_slice"], 3)
            result["long_scan"] = long
            print(f"long scan {'x'.join(map(str, long['shape']))}: {long['ours_s']} s, "
                  f"{long['ours_peak_mb']} MB, {long['per_slice_over_reference']}x the time per slice "
                  f"of {reference['case']}")
        if not args.no_batch:
            singles = {r["case"]: r["ours_s"] for r in rows}
            for case in all_cases:  # one call per case for those not timed side by side
                if case.case_id not in singles:
                    out = scratch / "single" / f"{case.case_id}.nii.gz"
                    runs = [_measure(_ours_cmd([case.image], out, bundle), args.threads)
                            for _ in range(args.repeats)]
                    singles[case.case_id] = round(_best(runs)["seconds"], 2)
            result["batch"] = batch(args.dataset, all_cases, singles, bundle, scratch, args.threads,
                                    args.repeats)
            b = result["batch"]
            print(f"batch of {b['cases']}: {b['batch_s']} s, {b['s_per_case']} s per case "
                  f"({b['per_case_over_mean_single']} of a single call), {b['batch_peak_mb']} MB")
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
