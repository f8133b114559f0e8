"""The network's memory layout at inference: channels-last (NDHWC, what liverseg.infer uses for
DynUNet in float32 on the CPU) against the plain layout, on the model-space images of the shared
cases, in one process, the two sides taking turns case by case (the best of ``--repeats``). Also
the share of voxels whose label (argmax) agrees. Usage::

    OMP_NUM_THREADS=2 python pipelines/bench_layout.py [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "liver"


def main() -> None:
    from liverseg import infer
    from liverseg.bundle import load_bundle
    from liverseg.io import read_ct
    from liverseg.modelspace import to_model_space

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="liver_default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_layout.json")
    args = parser.parse_args()

    chosen = infer.use_channels_last
    sides = {"plain": lambda *a: False, "channels_last": chosen}
    bundles = {side: load_bundle(args.model) for side in sides}  # one network per layout
    images = {path.name.split(".")[0]: to_model_space(read_ct(path), bundles["plain"].plan.preprocess)[0]
              for path in sorted((DATA / "imagesTr").glob("*.nii.gz"))}
    seconds: dict[tuple[str, str], list[float]] = {}
    labels: dict[tuple[str, str], torch.Tensor] = {}
    for _ in range(args.repeats):
        for case, image in images.items():
            for side, rule in sides.items():
                infer.use_channels_last = rule  # type: ignore[assignment]
                start = time.perf_counter()
                probabilities = infer.model_probabilities(image, bundles[side], precision="float32")
                seconds.setdefault((case, side), []).append(time.perf_counter() - start)
                labels[(case, side)] = probabilities.argmax(0)
    infer.use_channels_last = chosen
    rows = {case: {"shape": list(image.shape[1:]),
                   "plain_s": round(min(seconds[(case, "plain")]), 3),
                   "channels_last_s": round(min(seconds[(case, "channels_last")]), 3),
                   "speedup": round(min(seconds[(case, "plain")]) / min(seconds[(case, "channels_last")]), 2),
                   "labels_agree": round(float((labels[(case, "plain")] == labels[(case, "channels_last")])
                                               .float().mean()), 6)}
            for case, image in images.items()}
    report = {"what": __doc__.splitlines()[0], "model": args.model, "precision": "float32",
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "cases": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case, row in rows.items():
        print(f"{case:10s} {row['plain_s']:6.3f} s  {row['channels_last_s']:6.3f} s  {row['speedup']:5.2f}x  "
              f"labels agree {row['labels_agree']:.6f}")


if __name__ == "__main__":
    main()
