"""Benchmark the `liverseg train` loop: its speed options side by side, and against a plain MONAI loop.

Sides, each in its own subprocess (so peak memory, ru_maxrss from os.wait4, is that side's
alone), run interleaved in the same invocation (the order rotates every repeat, so a busy spell on
the shared machine does not land on one side only):

* ``ours`` -- liverseg.train.train on a preprocess cache with the given config (no validation,
  one checkpoint at the end, CSV log, progress.png, bundle written), float32;
* ``bf16`` / ``channels_last`` / ``bf16_channels_last`` / ``compile`` / ``bf16_compile`` /
  ``worker`` / ``fast_norm`` / ... -- the same with ``train.amp_cpu`` (bf16 autocast),
  ``train.channels_last``, ``train.compile``, ``train.num_workers=1`` (patches made in a worker
  process) or ``train.fast_norm`` (instance norm by the group-norm kernel), alone or combined;
* ``SIDE@tcmalloc`` -- any side above run with tcmalloc preloaded (``LD_PRELOAD``, as
  ``liverseg train`` does where tcmalloc is installed: liverseg/allocator.py); the others run with
  glibc's malloc;
* ``monai`` -- the textbook MONAI loop: CacheDataset(cases, Compose(same deterministic + random
  transforms)) -> DataLoader -> DynUNet -> DeepSupervisionLoss(DiceCELoss) -> AdamW with the same
  poly schedule and gradient clipping; nothing else.

Throughput is steps per second over steps 3..N (steps 1-2 include one-off set-up: caching the
case, oneDNN primitive creation, compiling); start-up time is reported apart. Data: the real
``tsexample`` CT of ../shared/data/liver preprocessed at the config's spacing.

``--paired N`` times the training step alone (the loop's ``_train_step`` on one real batch) with
every side's network in one process, the sides taking turns for N rounds: the cleanest ratios on a
shared machine. ``--fit N`` also checks accuracy: each variant trains N steps on the test suite's
overfitting case (ircadb07 cropped to its liver, augmentation off) and is validated on it; the loss
curve and Dice are compared with float32's, over ``--fit-seeds`` seeds (the repeats). Usage::

    OMP_NUM_THREADS=2 python pipelines/bench_train.py [--config configs/cpu_small.yaml]
        [--steps 30] [--repeats 2] [--variants ours,bf16,...] [--paired 8] [--fit 100]
        [--out pipelines/results/bench_train.json]
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
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE = REPO.parent / "shared" / "data" / "liver"
VARIANTS = {
    "ours": [],
    "bf16": ["train.amp_cpu=true"],
    "channels_last": ["train.channels_last=true"],
    "bf16_channels_last": ["train.amp_cpu=true", "train.channels_last=true"],
    "compile": ["train.compile=true"],
    "bf16_compile": ["train.amp_cpu=true", "train.compile=true"],
    "worker": ["train.num_workers=1"],
    "fast_norm": ["train.fast_norm=true"],
    "bf16_fast_norm": ["train.amp_cpu=true", "train.fast_norm=true"],
    "bf16_channels_last_fast_norm": ["train.amp_cpu=true", "train.channels_last=true",
                                     "train.fast_norm=true"],
    "bf16_channels_last_worker": ["train.amp_cpu=true", "train.channels_last=true", "train.num_workers=1"],
    "bf16_channels_last_compile": ["train.amp_cpu=true", "train.channels_last=true", "train.compile=true"],
}
DEFAULT_SIDES = ("ours", "bf16", "channels_last", "bf16_channels_last", "compile", "bf16_compile", "worker",
                 "monai")
FIRST_TIMED = 2  # steps after this one are timed


def default_sides() -> list[str]:
    """DEFAULT_SIDES, less the bf16 ones on a CPU that would emulate bf16 (a step of hours on an
    AVX2-only CPU; name them in --variants to time them anyway)."""
    from liverseg.networks import cpu_computes_bf16

    if cpu_computes_bf16():
        return list(DEFAULT_SIDES)
    print("this CPU has no native bf16 (AVX-512 BF16 or AMX): the bf16 sides are left out", file=sys.stderr)
    return [side for side in DEFAULT_SIDES if "train.amp_cpu=true" not in VARIANTS.get(side, [])]
FIT_CASE = "ircadb07"


def _child_ours(cache: Path, config_path: Path, steps: int, work: Path, overrides: list[str],
                fit: bool, seed: int = 0) -> dict:
    import csv

    from liverseg.config import load_config
    from liverseg.train import train

    fixed = [f"train.iterations={steps}", f"train.val_every={steps + 1}", f"train.checkpoint_every={steps}"]
    if fit:  # fit the case and validate on it once, at the end (as tests/conftest.py's trained_bundle)
        fixed = [f"train.iterations={steps}", f"train.val_every={steps}", f"train.checkpoint_every={steps}",
                 "train.augment=false", "train.lr=0.01", f"train.seed={seed}"]
        run = work / "run"
        run.mkdir()
        (run / "splits.json").write_text(json.dumps([{"train": [FIT_CASE], "val": [FIT_CASE]}]))
    cfg = load_config(config_path, [*fixed, *overrides])
    stamps: dict[int, float] = {}
    result = train(cache, work / "run", cfg, fold=0 if fit else None, device="cpu", quiet=True,
                   on_step=lambda step, row: stamps.__setitem__(step, time.perf_counter()))
    out = {"t1": stamps[FIRST_TIMED], "tN": stamps[steps], "stamps": [stamps[i] for i in range(1, steps + 1)]}
    if fit:
        with (work / "run" / "log.csv").open(newline="") as f:
            out["losses"] = [float(r["loss"]) for r in csv.DictReader(f)]
        out["val_dice"] = result.best_dice
    return out


def _child_monai(cache: Path, config_path: Path, steps: int, work: Path, overrides: list[str],
                 fit: bool) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from liverseg.config import load_config
    from liverseg.losses import build_loss, split_outputs
    from liverseg.networks import build_network
    from liverseg.preprocess import list_cached_cases, load_cached_case
    from liverseg.train_data import build_transforms

    cfg = load_config(config_path, overrides)
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
    return {"t1": stamps[FIRST_TIMED], "tN": stamps[steps],
            "stamps": [stamps[i] for i in range(1, steps + 1)]}


def _paired(cache: Path, config_path: Path, rounds: int, sides: list[str], overrides: list[str]) -> dict:
    """The training step alone (the loop's own ``_train_step`` on one real batch), each side's
    network in this one process, the sides taking turns step by step: every side meets the same
    load from the other agents, so the ratios hold however busy the machine is."""
    import torch
    from monai.data import set_track_meta

    from liverseg.config import load_config
    from liverseg.train import _forward_model, _optimisation, _Run, _train_step
    from liverseg.train_data import PatchNumbers, PatchStream, build_transforms, cached_cases

    set_track_meta(False)  # plain tensors, as in train()
    base = load_config(config_path, overrides)
    fixed, augment = build_transforms(base)
    cases = cached_cases(cache, ["tsexample"], fixed, 1.0)
    loader = torch.utils.data.DataLoader(PatchStream(cases, augment, 0), batch_size=base.train.batch_size,
                                         sampler=PatchNumbers(0, 1, base.train.batch_size, 0, 1))
    batch = next(iter(loader))
    dev = torch.device("cpu")
    steps = {}
    for side in sides:
        cfg = load_config(config_path, [*overrides, *VARIANTS[side]])
        torch.manual_seed(0)
        run = _Run(Path(), Path(), cache, cfg, cfg, None, [], [], dev, 0, 1, (0.0, 0.0))
        opt = _optimisation(cfg, dev)
        model = _forward_model(opt, run)
        steps[side] = (lambda b, k, m=model, o=opt, r=run: _train_step(b, k, m, o, r, None))
        for k in range(2):  # warm-up: oneDNN primitives, compiling
            steps[side](batch, k)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for k in range(rounds):
        shift = k % len(sides)
        for side in sides[shift:] + sides[:shift]:
            start = time.perf_counter()
            steps[side](batch, k)
            times[side].append(time.perf_counter() - start)
    out = {}
    for side in sides:
        ts = sorted(times[side])
        out[side] = {"median_s": ts[len(ts) // 2], "p25_s": ts[len(ts) // 4], "step_s": times[side]}
    reference = out.get("ours", out[sides[0]])
    for side in sides:
        out[side]["speedup_median"] = reference["median_s"] / out[side]["median_s"]
    return out


def _run_child(side: str, cache: Path, config: Path, steps: int, work: Path, fit: bool,
               overrides: list[str], seed: int = 0) -> dict:
    from liverseg.allocator import find_tcmalloc

    variant, _, allocator = side.partition("@")
    cmd = [sys.executable, __file__, "--child", variant, "--cache", str(cache), "--config", str(config),
           "--steps", str(steps), "--work", str(work), "--seed", str(seed), *(["--fit", "1"] if fit else []),
           *[arg for item in overrides for arg in ("--set", item)]]
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = find_tcmalloc() or ""  # main() checked that it is installed
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise SystemExit(f"{side} child failed (status {status})")
    row = json.loads(out.strip().splitlines()[-1])
    row.update(side=side, wall_s=time.perf_counter() - start, peak_mb=usage.ru_maxrss / 1024)
    return row


def _summary(rows: list[dict], sides: list[str]) -> dict[str, dict]:
    """Per side: best steps/s (the run least disturbed by the other agents), its start-up, peak memory."""
    out = {}
    for s in sides:
        mine = [r for r in rows if r["side"] == s]
        best = max(mine, key=lambda r: r["it_per_s"])
        pooled = sorted(t for r in mine for t in r["step_s"])
        out[s] = {"it_per_s": best["it_per_s"], "startup_s": best["startup_s"],
                  # The fastest quarter of the steps: what the side does when the other agents let it.
                  "it_per_s_p25": 1.0 / pooled[len(pooled) // 4],
                  "peak_mb": max(r["peak_mb"] for r in mine),
                  "all_it_per_s": [round(r["it_per_s"], 4) for r in mine],
                  "load_1min": [round(r["load"], 1) for r in mine],
                  "allocator": sorted({r["allocator"] for r in mine})}
        if "val_dice" in best:
            out[s]["val_dice"] = [r["val_dice"] for r in mine]
            out[s]["final_loss_mean10"] = [sum(r["losses"][-10:]) / len(r["losses"][-10:]) for r in mine]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu_small.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated sides (default: {','.join(DEFAULT_SIDES)}, less the bf16 "
                        "ones where the CPU would emulate bf16)")
    parser.add_argument("--fit", type=int, default=0, help="steps of the accuracy check (0: none)")
    parser.add_argument("--fit-seeds", type=int, default=3, help="seeds of the accuracy check")
    parser.add_argument("--paired", type=int, default=0,
                        help="rounds of the in-process step-by-step comparison (0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every side (repeatable), as liverseg train --set")
    parser.add_argument("--out", type=Path, default=REPO / "pipelines" / "results" / "bench_train.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        from liverseg.allocator import allocator_in_use

        started = time.perf_counter()
        if args.child == "monai":
            stamps = _child_monai(args.cache, args.config, args.steps, args.work, args.set, False)
        else:
            overrides = [*VARIANTS[args.child], *args.set]
            stamps = _child_ours(args.cache, args.config, args.steps, args.work, overrides, bool(args.fit),
                                 seed=args.seed)
        times = np.diff(stamps["stamps"][FIRST_TIMED - 1:]).tolist()
        print(json.dumps({"startup_s": stamps["t1"] - started,
                          "it_per_s": (args.steps - FIRST_TIMED) / (stamps["tN"] - stamps["t1"]),
                          "step_s": [round(t, 4) for t in times],
                          "load": os.getloadavg()[0], "allocator": allocator_in_use(),
                          **{k: v for k, v in stamps.items() if k not in ("t1", "tN", "stamps")}}))
        return

    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset

    sides = args.variants.split(",") if args.variants else default_sides()
    unknown = [s for s in sides if s.partition("@")[0] not in [*VARIANTS, "monai"]
               or s.partition("@")[2] not in ("", "tcmalloc")]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {[*VARIANTS, 'monai']}")
    if any(s.endswith("@tcmalloc") for s in sides):
        from liverseg.allocator import find_tcmalloc

        if find_tcmalloc() is None:
            raise SystemExit("the @tcmalloc sides need tcmalloc: apt-get install libtcmalloc-minimal4")
    cfg = load_config(args.config, args.set)
    report: dict = {"config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO)
                                  else args.config), "set": args.set,
                    "steps": args.steps, "repeats": args.repeats,
                    "threads": os.environ.get("OMP_NUM_THREADS"), "cpu": _cpu_name(),
                    "date": time.strftime("%Y-%m-%d"),
                    "variants": {s: VARIANTS.get(s.partition("@")[0], []) for s in sides}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path = work / "cases.csv"
        image, label = CASE / "imagesTr" / "tsexample.nii.gz", CASE / "labelsTr" / "tsexample.nii.gz"
        csv_path.write_text(f"{image},{label}\n")
        pre = preprocess_dataset(csv_path, work / "cache", cfg.preprocess, quiet=True)
        if pre.failed:
            raise SystemExit(f"preprocessing failed: {pre.failed}")
        if args.fit:  # the test suite's overfitting case: ircadb07 cropped to its liver (+15 mm)
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import crop_case_to_liver

            name = f"{FIT_CASE}.nii.gz"
            crop_case_to_liver(CASE / "imagesTr" / name, CASE / "labelsTr" / name, work / "fit_data",
                               FIT_CASE)
            preprocess_dataset(work / "fit_data", work / "fit_cache", cfg.preprocess, quiet=True)
        if args.paired:
            paired_sides = [s for s in sides if s not in ("monai", "worker") and "@" not in s]
            report["paired"] = _paired(work / "cache", args.config, args.paired, paired_sides, args.set)
            print("\nstep alone, sides taking turns in one process (median s, x ours):")
            for side, row in report["paired"].items():
                print(f"  {side:22s}{row['median_s']:8.3f}{row['speedup_median']:8.2f}")
        for mode, steps, fit in (("throughput", args.steps, False), ("fit", args.fit, True)):
            if steps <= 0:
                continue
            mode_sides = sides if not fit else [s for s in sides if s != "monai"]
            rows = []
            for rep in range(args.repeats if not fit else args.fit_seeds):
                shift = rep % len(mode_sides)
                for side in mode_sides[shift:] + mode_sides[:shift]:
                    run = work / f"{mode}-{side}{rep}"
                    run.mkdir()
                    rows.append(_run_child(side, work / ("fit_cache" if fit else "cache"), args.config, steps,
                                           run, fit, args.set, seed=rep))
                    extra = f", val Dice {rows[-1]['val_dice']:.4f}" if fit else ""
                    print(f"  {mode} {side:18s} rep {rep}: {rows[-1]['it_per_s']:.3f} it/s, "
                          f"peak {rows[-1]['peak_mb']:.0f} MB{extra}", file=sys.stderr, flush=True)
            report[mode] = {"runs": rows, "summary": _summary(rows, mode_sides), "steps": steps}

    summary = report["throughput"]["summary"] if "throughput" in report else {}
    if summary:
        _print_throughput(args, cfg, summary)
    if "fit" in report:
        print(f"\nfit: {args.fit} steps, augmentation off, validated on the training case, seeds 0.."
              f"{args.fit_seeds - 1}")
        for s, row in report["fit"]["summary"].items():
            print(f"{s:20s} val Dice {row['val_dice']}  mean loss of the last 10 steps "
                  f"{[round(v, 4) for v in row['final_loss_mean10']]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def _print_throughput(args: argparse.Namespace, cfg: Any, summary: dict) -> None:
    print(f"\nconfig {args.config.name}, {args.steps} steps, patch {list(cfg.train.patch_size)}, "
          f"batch {cfg.train.batch_size}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    # Ratios to "ours", or to the first side where "ours" did not run (e.g. "ours@tcmalloc").
    reference = "ours" if "ours" in summary else next(iter(summary))
    print(f"ratios (x) to {reference}")
    print(f"{'side':22s}{'steps/s best run':>17s}{'x':>8s}{'fastest 1/4':>12s}{'x':>8s}"
          f"{'start-up s':>12s}{'peak MB':>10s}")
    base = summary[reference]
    for s, row in summary.items():
        row["ratio_to_ours"] = row["it_per_s"] / base["it_per_s"]
        row["ratio_to_ours_p25"] = row["it_per_s_p25"] / base["it_per_s_p25"]
        print(f"{s:22s}{row['it_per_s']:17.3f}{row['ratio_to_ours']:8.2f}{row['it_per_s_p25']:12.3f}"
              f"{row['ratio_to_ours_p25']:8.2f}{row['startup_s']:12.1f}{row['peak_mb']:10.0f}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
