"""The network's memory layout at inference, tried and not kept: channels-last (NDHWC) against the
plain layout for the shipped DynUNet in float32 on the CPU, on the model-space images of the shared
cases, in one process, the two sides taking turns case by case (best of ``--repeats``); then, per
layout, whether one thread and two give the same labels. Usage::

    OMP_NUM_THREADS=2 python pipelines/bench_layout.py [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from liverseg.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "liver"


def _in_layout(bundle: Bundle, channels_last: bool) -> Bundle:
    """The bundle with its network (and every window it is given) in the chosen layout."""
    if channels_last:
        network = bundle.network.to(memory_format=torch.channels_last_3d)
        forward = network.forward
        network.forward = lambda window: forward(window.contiguous(memory_format=torch.channels_last_3d))
    return bundle


def main() -> None:
    from liverseg.bundle import load_bundle
    from liverseg.infer import model_probabilities
    from liverseg.io import read_ct
    from liverseg.modelspace import to_model_space

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="liver_default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_layout.json")
    args = parser.parse_args()

    bundles = {side: _in_layout(load_bundle(args.model), side == "channels_last")
               for side in ("plain", "channels_last")}
    images = {path.name.split(".")[0]: to_model_space(read_ct(path), bundles["plain"].plan.preprocess)[0]
              for path in sorted((DATA / "imagesTr").glob("*.nii.gz"))}
    threads = torch.get_num_threads()
    seconds: dict[tuple[str, str], list[float]] = {}
    labels: dict[tuple[str, str, int], torch.Tensor] = {}
    for _ in range(args.repeats):
        for case, image in images.items():
            for side, bundle in bundles.items():
                start = time.perf_counter()
                probabilities = model_probabilities(image, bundle, precision="float32")
                seconds.setdefault((case, side), []).append(time.perf_counter() - start)
                labels[(case, side, threads)] = probabilities.argmax(0)
    torch.set_num_threads(1)
    for case, image in images.items():
        for side, bundle in bundles.items():
            labels[(case, side, 1)] = model_probabilities(image, bundle, precision="float32").argmax(0)
    torch.set_num_threads(threads)

    def differing(case: str, side: str) -> int:
        return int((labels[(case, side, 1)] != labels[(case, side, threads)]).sum())

    rows = {case: {"shape": list(image.shape[1:]),
                   "plain_s": round(min(seconds[(case, "plain")]), 3),
                   "channels_last_s": round(min(seconds[(case, "channels_last")]), 3),
                   "speedup": round(min(seconds[(case, "plain")]) / min(seconds[(case, "channels_last")]), 2),
                   "labels_agree": round(float((labels[(case, "plain", threads)] == labels[(
                       case, "channels_last", threads)]).float().mean()), 6),
                   "voxels_differing_1_vs_n_threads": {side: differing(case, side) for side in bundles}}
            for case, image in images.items()}
    report = {"what": __doc__.splitlines()[0], "model": args.model, "precision": "float32",
              "threads": threads, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "cases": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case, row in rows.items():
        print(f"{case:10s} {row['plain_s']:6.3f} s  {row['channels_last_s']:6.3f} s  {row['speedup']:5.2f}x  "
              f"agree {row['labels_agree']:.6f}  differing, 1 vs {threads} threads: "
              f"{row['voxels_differing_1_vs_n_threads']}")


if __name__ == "__main__":
    main()
