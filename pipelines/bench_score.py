"""Benchmark `liverseg score` on a real 512x512x151 label against its one-voxel erosion.

Sides, each in its own subprocess (so peak memory, ru_maxrss, is that side's alone), run one
after the other in the same invocation:

* ``ours``      -- liverseg.metrics.score_labels on the arrays (all metrics, liver + tumour):
                   union-bbox crop, then MONAI edges + KD-tree distances once per class;
* ``ours_io``   -- liverseg.metrics.score_files: the same plus reading both .nii.gz files;
* ``monai``     -- the baseline: MONAI compute_dice, compute_hausdorff_distance(percentile=95),
                   compute_average_surface_distance(symmetric=True), compute_surface_dice on the
                   uncropped volumes (one call per metric and class).

Import time is excluded from the call timings and reported separately. Usage::

    OMP_NUM_THREADS=2 python pipelines/bench_score.py [--case ircadb07] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "liver" / "labelsTr"


def _child(side: str, workdir: Path, repeats: int) -> None:
    t0 = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from liverseg.metrics import score_files, score_labels

    if side == "monai":
        from monai.metrics import (
            compute_average_surface_distance,
            compute_dice,
            compute_hausdorff_distance,
            compute_surface_dice,
        )
    import_s = time.perf_counter() - t0
    meta = json.loads((workdir / "meta.json").read_text())
    spacing = tuple(meta["spacing"])
    pred, ref = np.load(workdir / "pred.npy"), np.load(workdir / "ref.npy")
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        if side == "ours":
            result = score_labels(pred, ref, spacing)
        elif side == "ours_io":
            result = score_files("case", workdir / "pred.nii.gz", workdir / "ref.nii.gz").metrics
        else:
            for name, sel in (("liver", lambda a: a > 0), ("tumour", lambda a: a == 2)):
                yp = torch.from_numpy(sel(pred))[None, None]
                yr = torch.from_numpy(sel(ref))[None, None]
                result[name] = {
                    "dice": float(compute_dice(yp.float(), yr.float(), include_background=True)),
                    "hd95_mm": float(compute_hausdorff_distance(yp, yr, include_background=True,
                                                                percentile=95, spacing=spacing)),
                    "assd_mm": float(compute_average_surface_distance(
                        yp, yr, include_background=True, symmetric=True, spacing=spacing)),
                    "nsd": float(compute_surface_dice(yp, yr, [2.0], include_background=True,
                                                      spacing=spacing)),
                }
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keep = ("dice", "hd95_mm", "assd_mm", "nsd")
    print(json.dumps({"side": side, "import_s": import_s, "times_s": times, "peak_mb": peak_mb,
                      "metrics": {c: {k: m[k] for k in keep} for c, m in result.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="ircadb07")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_score.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.workdir, args.repeats)
        return

    import numpy as np
    from scipy import ndimage

    from liverseg.io import read_label, write_mask

    ref = read_label(DATA / f"{args.case}.nii.gz")
    pred = ref.array.copy()
    pred[~ndimage.binary_erosion(ref.array > 0)] = 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "ref.npy", ref.array)
        np.save(work / "pred.npy", pred)
        write_mask(ref.array, ref, work / "ref.nii.gz")
        write_mask(pred, ref, work / "pred.nii.gz")
        (work / "meta.json").write_text(json.dumps({"spacing": list(ref.spacing)}))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        for side in ("ours", "ours_io", "monai"):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--workdir", str(work),
                                  "--repeats", str(args.repeats)], check=True, capture_output=True,
                                 text=True, env=env, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next(r for r in rows if r["side"] == "monai")
    print(f"case {args.case} shape {list(ref.shape)} spacing {[round(s, 3) for s in ref.spacing]}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}, best of {args.repeats}")
    print(f"{'side':10s} {'best s':>8s} {'median s':>9s} {'import s':>9s} {'peak MB':>8s} "
          f"{'time ratio':>10s} {'mem ratio':>9s}  liver dice/hd95/assd/nsd")
    for r in rows:
        best, med = min(r["times_s"]), float(np.median(r["times_s"]))
        r["best_s"], r["time_ratio_vs_monai"] = best, best / min(base["times_s"])
        r["mem_ratio_vs_monai"] = r["peak_mb"] / base["peak_mb"]
        lv = r["metrics"]["liver"]
        print(f"{r['side']:10s} {best:8.2f} {med:9.2f} {r['import_s']:9.2f} {r['peak_mb']:8.0f} "
              f"{r['time_ratio_vs_monai']:10.2f} {r['mem_ratio_vs_monai']:9.2f}  "
              f"{lv['dice']:.5f}/{lv['hd95_mm']:.3f}/{lv['assd_mm']:.4f}/{lv['nsd']:.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"case": args.case, "shape": list(ref.shape),
                                    "spacing_mm": list(ref.spacing), "cpu_count": os.cpu_count(),
                                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "2"),
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
