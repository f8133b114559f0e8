"""Benchmark: ``liverseg infer`` end to end vs a MONAI-bundle-style pipeline, same network and weights.

For each CT in the dataset (default ``../shared/data/liver``), side by side:

* ours:  the ``liverseg infer CT -o mask.nii.gz --model BUNDLE`` command (read, model space with
  body crop, one sliding-window pass at the plan's ROI, probabilities up once, argmax,
  postprocessing, atomic write, JSON sidecar).
* MONAI: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(plan spacing) ->
  ScaleIntensityRanged(-175..250 -> 0..1) -> sliding_window_inference(ROI 96^3, overlap 0.5,
  gaussian) -> softmax -> Invertd -> argmax -> keep largest component (SciPy, see
  ``_keep_largest``) -> SaveImage, as in MONAI's CT segmentation bundles.

Each (case, side) is a fresh ``python`` subprocess, started by a small wrapper whose only child it
is, so wall time is end to end (interpreter start, imports, model load included: what a user waits
for) and peak memory is that child's ``ru_maxrss`` alone. Both sides get the same thread count.
Without ``--model`` the shipped bundle is used if present, else an untrained network with the
default architecture (speed does not depend on the weights). Usage::

    python pipelines/bench_infer.py [--dataset ../shared/data/liver] [--model BUNDLE]
        [--threads 2] [--repeats 1] [--out pipelines/results/bench_infer.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "liver")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the best is kept")
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_infer.json")
    parser.add_argument("--baseline", nargs=3, metavar=("IMAGE", "BUNDLE", "OUT_DIR"),
                        help=argparse.SUPPRESS)  # internal: run the MONAI side in this process
    args = parser.parse_args()
    if args.baseline:
        monai_baseline(*args.baseline)
        return

    import nibabel as nib

    from liverseg.datasets import find_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        scratch = Path(tmp)
        bundle = args.model or _default_bundle(scratch)
        for case in find_dataset(args.dataset).cases:
            shape = list(nib.load(case.image).shape)
            ours_out = scratch / "ours" / f"{case.case_id}.nii.gz"
            monai_dir = scratch / "monai"
            ours_cmd = [sys.executable, "-m", "liverseg", "infer", str(case.image), "-o", str(ours_out),
                        "--model", str(bundle), "--device", "cpu", "--force", "--quiet"]
            base_cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline", str(case.image),
                        str(bundle), str(monai_dir)]
            ours, base = [], []
            for _ in range(args.repeats):  # alternate sides so machine load hits both alike
                ours.append(_measure(ours_cmd, args.threads))
                base.append(_measure(base_cmd, args.threads))
            best_ours = min(ours, key=lambda r: r["seconds"])
            best_base = min(base, key=lambda r: r["seconds"])
            sidecar = json.loads(ours_out.with_name(f"{case.case_id}.json").read_text())
            monai_mask = next(monai_dir.glob(f"{case.case_id}*seg.nii.gz"))
            rows.append({
                "case": case.case_id, "shape": shape,
                "ours_s": round(best_ours["seconds"], 2), "monai_s": round(best_base["seconds"], 2),
                "speedup": round(best_base["seconds"] / best_ours["seconds"], 2),
                "ours_peak_mb": round(best_ours["peak_mb"]), "monai_peak_mb": round(best_base["peak_mb"]),
                "memory_ratio": round(best_base["peak_mb"] / best_ours["peak_mb"], 2),
                "ours_stage_s": sidecar["seconds"],
                "liver_dice_ours_vs_monai": round(_dice_liver(ours_out, monai_mask), 4),
            })
            print(f"{case.case_id}: done", file=sys.stderr)
    header = f"{'case':<10} {'shape':<16} {'ours s':>7} {'MONAI s':>8} {'speedup':>8} " \
             f"{'ours MB':>8} {'MONAI MB':>9} {'Dice':>6}"
    print(header)
    for r in rows:
        print(f"{r['case']:<10} {'x'.join(map(str, r['shape'])):<16} {r['ours_s']:>7} {r['monai_s']:>8} "
              f"{r['speedup']:>7}x {r['ours_peak_mb']:>8} {r['monai_peak_mb']:>9} "
              f"{r['liver_dice_ours_vs_monai']:>6}")
    result = {
        "benchmark": "liverseg infer vs MONAI-bundle-style inference, end to end per case",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "model": str(args.model or "shipped bundle if present, else untrained default architecture"),
        # Which weights were timed, so a model card quotes figures of its own weights only.
        "weights_sha256": hashlib.sha256((Path(bundle) / "model.pt").read_bytes()).hexdigest(),
        "roi_size": json.loads((Path(bundle) / "plan.json").read_text())["infer"]["roi_size"],
        "repeats": args.repeats,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
