"""Benchmark the `liverseg train` loop against a plain MONAI loop (same network, same patches).

Sides, each in its own subprocess (so peak memory, ru_maxrss from os.wait4, is that side's
alone), run alternately in the same invocation:

* ``ours``  -- liverseg.train.train on a preprocess cache with the given config (no validation,
               one checkpoint at the end, CSV log, progress.png, bundle written);
* ``monai`` -- the textbook MONAI loop: CacheDataset(cases, Compose(same deterministic + random
               transforms)) -> DataLoader -> DynUNet -> DeepSupervisionLoss(DiceCELoss) -> AdamW
               with the same poly schedule and gradient clipping; nothing else.

Throughput is iterations per second over steps 2..N (step 1 includes one-off set-up: caching the
case, oneDNN primitive creation); start-up time is reported apart. Data: the real ``tsexample``
CT of ../shared/data/liver preprocessed at the config's spacing. Usage::

    OMP_NUM_THREADS=2 python pipelines/bench_train.py [--config configs/cpu_small.yaml]
        [--steps 30] [--repeats 2] [--out pipelines/results/bench_train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE = REPO.parent / "shared" / "data" / "liver"


def _child_ours(cache: Path, config_path: Path, steps: int, work: Path) -> dict:
    from liverseg.config import load_config
    from liverseg.train import train

    cfg = load_config(config_path, [f"train.iterations={steps}", f"train.val_every={steps + 1}",
                                    f"train.checkpoint_every={steps}"])
    stamps: dict[int, float] = {}
    train(cache, work / "run", cfg, device="cpu", quiet=True,
          on_step=lambda step, row: stamps.__setitem__(step, time.perf_counter()))
    return {"t1": stamps[1], "tN": stamps[steps]}


def _child_monai(cache: Path, config_path: Path, steps: int, work: Path) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from liverseg.config import load_config
    from liverseg.losses import build_loss, split_outputs
    from liverseg.networks import build_network
    from liverseg.preprocess import list_cached_cases, load_cached_case
    from liverseg.train_data import build_transforms

    cfg = load_config(config_path)
    t = cfg.train
    set_determinism(seed=t.seed)
    fixed, augment = build_transforms(cfg)

    def load(item: dict) -> dict:
        case = load_cached_case(cache, item["case"])
        return {"image": torch.from_numpy(case.image),
                "label": torch.from_numpy(case.label[None].astype("float32"))}

    data = CacheDataset([{"case": c} for c in list_cached_cases(cache)],
                        transform=Compose([load, fixed, augment]), progress=False)
    loader = DataLoader(data, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers)
    net = build_network(cfg.model)
    loss_fn = build_loss(cfg.model, t)
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps, power=t.poly_power)
    net.train()
    step, stamps = 0, {}
    while step < steps:
        for batch in loader:
            # RandCropByPosNegLabeld yields a list per item; the DataLoader's collate stacks them.
            loss = loss_fn(split_outputs(net(batch["image"])), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            stamps[step] = time.perf_counter()
            if step == steps:
                break
    return {"t1": stamps[1], "tN": stamps[steps]}


def _run_child(side: str, cache: Path, config: Path, steps: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--cache", str(cache), "--config", str(config),
           "--steps", str(steps), "--work", str(work)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise SystemExit(f"{side} child failed (status {status})")
    row = json.loads(out.strip().splitlines()[-1])
    row.update(side=side, wall_s=time.perf_counter() - start, peak_mb=usage.ru_maxrss / 1024)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu_small.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_train.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        started = time.perf_counter()
        func = _child_ours if args.child == "ours" else _child_monai
        stamps = func(args.cache, args.config, args.steps, args.work)
        print(json.dumps({"startup_s": stamps["t1"] - started,
                          "it_per_s": (args.steps - 1) / (stamps["tN"] - stamps["t1"])}))
        return

    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path = work / "cases.csv"
        image, label = CASE / "imagesTr" / "tsexample.nii.gz", CASE / "labelsTr" / "tsexample.nii.gz"
        csv_path.write_text(f"{image},{label}\n")
        report = preprocess_dataset(csv_path, work / "cache", cfg.preprocess, quiet=True)
        if report.failed:
            raise SystemExit(f"preprocessing failed: {report.failed}")
        rows = []
        for rep in range(args.repeats):
            for side in ("ours", "monai") if rep % 2 == 0 else ("monai", "ours"):
                run = work / f"{side}{rep}"
                run.mkdir()
                rows.append(_run_child(side, work / "cache", args.config, args.steps, run))
                print(f"  {side:5s} rep {rep}: {rows[-1]['it_per_s']:.3f} it/s, "
                      f"peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr)

    sides = ("ours", "monai")
    best = {s: max((r for r in rows if r["side"] == s), key=lambda r: r["it_per_s"]) for s in sides}
    peak = {s: max(r["peak_mb"] for r in rows if r["side"] == s) for s in ("ours", "monai")}
    overhead = best["monai"]["it_per_s"] / best["ours"]["it_per_s"] - 1.0
    print(f"\nconfig {args.config.name}, {args.steps} steps, patch {list(cfg.train.patch_size)}, "
          f"batch {cfg.train.batch_size}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'side':8s}{'it/s (best)':>14s}{'start-up s':>12s}{'peak MB':>10s}")
    for s in ("ours", "monai"):
        print(f"{s:8s}{best[s]['it_per_s']:14.3f}{best[s]['startup_s']:12.1f}{peak[s]:10.0f}")
    print(f"time overhead of ours vs monai: {overhead * 100:+.1f}%   "
          f"peak memory ratio ours/monai: {peak['ours'] / peak['monai']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": str(args.config), "steps": args.steps, "repeats": args.repeats,
        "threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows,
        "overhead_time": overhead, "peak_ratio": peak["ours"] / peak["monai"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
