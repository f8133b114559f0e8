"""Check the imported Tang et al. 2020 bundle against the original package's own masks.

    python pipelines/verify_tang2020.py --reference REF_DIR [--model liver_tang2020] [--out JSON]

REF_DIR holds the original pipeline's liver masks on each case's own grid, ``<case>_orig.nii.gz``
(the package as published, with its lung/hip crop) and optionally ``<case>_nocrop.nii.gz`` (the same
with the crop replaced by the whole image). They come from ``pyliverlesionseg`` 0.3's own code run
under ``tensorflow-cpu==2.15.1`` in a throwaway environment outside this project, with import-level
fixes only (see ``docs/tang2020.md``). For every case of ../shared/data/liver this script segments
the CT with liverseg's pipeline and reports liver Dice against the expert label, against the
original's mask, and the original's own Dice; the issue's bar is >= 0.99 agreement wherever the
original's crop keeps the whole liver.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "liver"
OUT = REPO / "pipelines" / "results" / "tang2020_verify.json"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    from liverseg.bundle import load_bundle
    from liverseg.datasets import find_dataset
    from liverseg.infer import predict_volume
    from liverseg.io import read_ct, read_label

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="folder of the original's masks")
    parser.add_argument("--model", default="liver_tang2020")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cases", nargs="*", help="only these cases")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.model)
    rows = {}
    for case in find_dataset(DATA).cases:
        if args.cases and case.case_id not in args.cases:
            continue
        volume, label = read_ct(case.image), read_label(case.label)
        start = time.perf_counter()
        ours = predict_volume(volume, bundle).labels > 0
        row: dict = {
            "seconds": round(time.perf_counter() - start, 2),
            "dice_ours_vs_label": round(dice(ours, label.array > 0), 4),
        }
        for variant in ("orig", "nocrop"):
            path = args.reference / f"{case.case_id}_{variant}.nii.gz"
            if path.is_file():
                theirs = read_label(path).array > 0
                cut = int(np.logical_and(label.array > 0, ~theirs).sum())
                row[variant] = {
                    "dice_ours_vs_original": round(dice(ours, theirs), 4),
                    "dice_original_vs_label": round(dice(theirs, label.array > 0), 4),
                    "liver_voxels_the_original_misses": cut,
                }
        rows[case.case_id] = row
        print(case.case_id, json.dumps(row), flush=True)
    report = {"model": str(bundle.path), "model_version": bundle.model_version, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
