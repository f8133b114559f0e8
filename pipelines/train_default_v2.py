"""Recipe of the shipped default model v2 (liverseg/models/liver_default): the approaches compared, the
folds, the evaluation under simulated shifts, and the packaging. Reproducible end to end:

    python pipelines/train_default_v2.py prepare                 # caches, teacher targets, splits
    python pipelines/train_default_v2.py train [--device cuda] [--budget SECONDS]
    python pipelines/train_default_v2.py quick-cv [--device cuda] # model-space CV of every approach
    python pipelines/train_default_v2.py evaluate --approach A    # native-grid CV, shifts, teacher beside
    python pipelines/train_default_v2.py package --approach A     # A's final run -> liver_default

Approaches (each trained once per held-out expert case and once on every case, side by side):

* ``distill``  our residual DynUNet (4 mm, deep supervision, robustness augmentation) learning from
  the expert labels and from the imported Tang et al. 2020 model's soft liver targets
  (``train.teacher_weight``; targets precomputed on each CT by ``liverseg.teacher``);
* ``plain``    the same network and augmentation without the teacher;
* ``finetune`` the imported network itself, fine-tuned on our labels with a tumour class added
  (``configs/liver_tang2020_finetune.yaml``).

On the CPU the DynUNet approaches train in two stages (CPU_STAGES: 64^3 patches, then the config's
96^3 from those weights; the first stage's folder is ``<run>_64``, the run's model the mean of both
stages' weights, ``<run>_avg``); on a GPU the config runs as it is. Folds: every expert case
(chaos01, chaos03, ircadb01, ircadb07) is held out once; tsexample (labels made by TotalSegmentator)
always trains. ``evaluate`` scores each fold's held-out case on its native
grid after postprocessing, clean and after three fixed shifts, each reported apart: a simulated
arterial phase (liver parenchyma moved to 70 HU, intrahepatic vessels flattened, enhanced structures
outside the liver +100 HU), 5 mm slices (the CT resampled to 5 mm slices by area averaging) and a
field-of-view cut (the scan ends 30% of the liver's height below its dome). The teacher is scored the
same way beside it; chaos03 is the only case the teacher cannot have seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "liver"
WORK = REPO / "runs" / "v2"
EXPERT_CASES = ["chaos01", "chaos03", "ircadb01", "ircadb07"]
ALWAYS_TRAIN = ["tsexample"]  # model-made labels: good for training, not for measuring
TEACHER = "liver_tang2020"
APPROACHES = {
    "distill": {"config": "configs/liver_default_v2.yaml", "cache": "cache4", "set": [], "cpu_stages": True},
    "plain": {
        "config": "configs/liver_default_v2.yaml",
        "cache": "cache4",
        "set": ["train.teacher_weight=0"],
        "cpu_stages": True,
    },
    # The imported network's windows are multiples of 27 voxels: it trains as configured everywhere.
    "finetune": {
        "config": "configs/liver_tang2020_finetune.yaml",
        "cache": "cache3",
        "set": [],
        "cpu_stages": False,
    },
}
SHIFTS = ("clean", "arterial", "thick5mm", "fov_cut")
FOV_CUT_FRACTION = 0.3  # of the liver's height, cut from the dome end
ARTERIAL = {"liver_hu": 70.0, "vessel_gain": 0.3, "tumour_gain": -0.5, "bright_shift": 100.0}


def runs(approach: str) -> dict[str, dict[str, list[str]]]:
    table = {
        f"{approach}_{held}": {"train": sorted(set(EXPERT_CASES) - {held} | set(ALWAYS_TRAIN)), "val": [held]}
        for held in EXPERT_CASES
    }
    table[f"{approach}_final"] = {"train": sorted(EXPERT_CASES + ALWAYS_TRAIN), "val": []}
    return table


def all_runs(approaches: list[str]) -> dict[str, tuple[str, dict[str, list[str]]]]:
    return {name: (approach, split) for approach in approaches for name, split in runs(approach).items()}


# --------------------------------------------------------------------------------------------
# prepare, train


def prepare(work: Path) -> None:
    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset
    from liverseg.teacher import add_teacher_targets

    for cache in sorted({a["cache"] for a in APPROACHES.values()}):
        config = next(a["config"] for a in APPROACHES.values() if a["cache"] == cache)
        report = preprocess_dataset(DATA, work / cache, load_config(REPO / config).preprocess, quiet=False)
        if not report.ok:
            sys.exit(f"preprocessing failed: {report.failed}")
    written = add_teacher_targets(
        work / "cache4", TEACHER, on_case=lambda c: print(f"teacher targets: {c}", flush=True)
    )
    print(f"teacher targets written for {written or 'no case (all current)'}")
    for name, (_, split) in all_runs(list(APPROACHES)).items():
        # Training lists only: validation happens afterwards, so no fold picks its weights by
        # looking at its held-out case.
        (work / "splits").mkdir(parents=True, exist_ok=True)
        (work / "splits" / f"{name}.json").write_text(json.dumps([{"train": split["train"], "val": []}]))


# The CPU schedule (2 cores). The config's 96^3 patches (38 cm at 4 mm: an abdomen across, the
# context that tells the liver's dome from the heart) cost 1.9 s a step on a CPU with AVX-512 BF16.
# So a CPU run first learns on 64^3 patches (0.62 s a step there in bf16; 2.4 s in float32 with
# tcmalloc on an AVX2-only EPYC, where 96^3 takes 8.5 s: a run's two stages about 6.3 h there),
# then goes on with the config's 96^3 patches from those weights at a quarter of the learning rate.
# On a GPU the config runs as it is, 96^3 from the start.
# The run's model is then the mean of the two stages' weights (folder ``<run>_avg``): one network,
# as fast as either, better than the last stage alone on both folds measured (the 64^3 stage keeps
# the liver whole, the 96^3 stage keeps the heart out; pipelines/results/default_v2_cv_cpu.json).
CPU_STAGES = (
    ("_64", ["train.patch_size=[64,64,64]", "train.iterations=4000"]),
    ("", ["train.iterations=1500", "train.lr=0.0005"]),
)
AVERAGED = "_avg"


def cpu_speed() -> list[str]:
    """The CPU runs' speed switches. bf16 autocast only where the CPU computes bf16 natively
    (``auto``). Where it does not, the runs train in float32 with channels-last: 1.23x the steps/s on
    an AVX2 EPYC, with the same fit (pipelines/results/bench_train_avx2.json, _fit.json)."""
    from liverseg.networks import cpu_computes_bf16

    layout = [] if cpu_computes_bf16() else ["train.channels_last=true"]
    return ["train.amp_cpu=auto", "train.fast_norm=true", *layout]


def train(
    work: Path, names: list[str], device: str, budget: float | None, extra: list[str] | None = None
) -> None:
    """All runs side by side (pipelines/launch.py): on the CPU the cores are split between them,
    and each run trains in the stages of CPU_STAGES (the last one's folder is the run's), its model
    then the mean of the stages' weights (``<run>_avg``)."""
    table = all_runs(list(APPROACHES))
    staged = [n for n in names if device == "cpu" and APPROACHES[table[n][0]]["cpu_stages"]]
    for stage, (suffix, overrides) in enumerate(CPU_STAGES if staged else ()):
        stage_overrides = {
            name: [*cpu_speed(), *overrides, *(extra or [])]
            + ([f"model.pretrained={work / 'runs' / (name + CPU_STAGES[stage - 1][0])}"] if stage else [])
            for name in staged
        }
        _train_stage(work, {name: name + suffix for name in staged}, device, None, stage_overrides)
    for name in staged:
        average_stages(work, name)
    others = [n for n in names if n not in staged]
    if others:
        same = {name: list(extra or []) for name in others}
        _train_stage(work, {name: name for name in others}, device, budget, same)


def model_dir(work: Path, name: str) -> Path:
    """The folder of a run's model: the mean of its stages' weights where it trained in stages (on
    the CPU), else the run's own folder."""
    averaged = work / "runs" / f"{name}{AVERAGED}"
    return averaged if (averaged / "model.pt").is_file() else work / "runs" / name


def average_stages(work: Path, name: str) -> Path:
    """``<run>_avg``: the mean of the weights of the run's CPU_STAGES, with a card that adds up
    their training (redone whenever a stage is newer than it)."""
    from liverseg.bundle import CARD_FILE, average_bundles

    stages = [work / "runs" / (name + suffix) for suffix, _ in CPU_STAGES]
    out = work / "runs" / f"{name}{AVERAGED}"
    newest = max((stage / "model.pt").stat().st_mtime for stage in stages)
    if (out / "model.pt").is_file() and (out / "model.pt").stat().st_mtime >= newest:
        return out
    cards = [json.loads((stage / CARD_FILE).read_text()) for stage in stages]
    card = {
        **cards[-1],
        "name": out.name,
        "weights": "mean of the weights of the stages below",
        "stages": [{"run": stage.name, "iterations": c.get("iterations"), "seconds": c.get("seconds"),
                    "patch_size": c["config"]["train"]["patch_size"], "lr": c["config"]["train"]["lr"]}
                   for stage, c in zip(stages, cards, strict=True)],
        **{key: round(sum(c.get(key) or 0 for c in cards), 2)
           for key in ("iterations", "seconds", "cpu_seconds")},
    }
    average_bundles(stages, out, card=card)
    print(f"{out.name}: the mean of {[stage.name for stage in stages]}", flush=True)
    return out


def _finished(run_dir: Path, overrides: list[str]) -> bool:
    """Whether a run already did the steps its stage plans (an explicit train.iterations); a
    finished stage is not resumed, so the stage after it keeps the weights it started from."""
    planned = [int(item.split("=", 1)[1]) for item in overrides if item.startswith("train.iterations=")]
    card = run_dir / "model_card.json"
    if not planned or not card.is_file():
        return False
    return int(json.loads(card.read_text()).get("iterations") or 0) >= planned[-1]


def _train_stage(
    work: Path, folders: dict[str, str], device: str, budget: float | None, overrides: dict[str, list[str]]
) -> None:
    from launch import exit_if_failed, run_side_by_side

    table = all_runs(list(APPROACHES))
    commands, logs = {}, {}
    for name, folder in folders.items():
        approach, _ = table[name]
        spec = APPROACHES[approach]
        run_dir = work / "runs" / folder
        if _finished(run_dir, overrides[name]):
            print(f"{folder}: finished, skipped", flush=True)
            continue
        cmd = [
            sys.executable,
            "-m",
            "liverseg",
            "train",
            str(work / spec["cache"]),
            "-o",
            str(run_dir),
            "--config",
            str(REPO / spec["config"]),
            "--splits",
            str(work / "splits" / f"{name}.json"),
            "--device",
            device,
            "--quiet",
            "--json",
        ]
        for item in [*spec["set"], *overrides[name]]:
            cmd += ["--set", item]
        if budget is not None:  # fit the schedule to the time: the runs end together
            cmd += ["--set", f"train.max_seconds={budget}", "--set", "train.fit_to_time=true"]
        if (run_dir / "checkpoints" / "last.pt").is_file():
            cmd.append("--resume")
        commands[folder], logs[folder] = cmd, work / "logs" / f"{folder}.log"
    exit_if_failed(run_side_by_side(commands, logs), f"{work}/logs/<run>.log")


# --------------------------------------------------------------------------------------------
# shifts


def _hu_tensor(array: np.ndarray):
    import torch

    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None, None]


def arterial(hu: np.ndarray, label: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The fixed arterial-phase shift (HU in, HU out), through liverseg.robustness.simulate_phase."""
    import torch

    from liverseg.robustness import simulate_phase

    t = {k: torch.tensor(v).view(1, 1, 1, 1, 1) for k, v in ARTERIAL.items()}
    keep_t = (
        torch.zeros((1, 1, *hu.shape), dtype=torch.bool)
        if keep is None
        else torch.as_tensor(keep)[None, None]
    )
    out = simulate_phase(
        _hu_tensor(hu),
        torch.as_tensor(label)[None, None],
        t["liver_hu"],
        t["vessel_gain"],
        t["tumour_gain"],
        t["bright_shift"],
        keep_t,
    )
    return out[0, 0].numpy()


def fov_range(label: np.ndarray, superior_is_high: bool) -> tuple[int, int]:
    """Slices kept by the field-of-view cut: the scan ends FOV_CUT_FRACTION of the liver's height
    below its dome."""
    slices = np.flatnonzero((label > 0).any(axis=(0, 1)))
    low, high = int(slices[0]), int(slices[-1]) + 1
    cut = round(FOV_CUT_FRACTION * (high - low))
    return (0, high - cut) if superior_is_high else (low + cut, label.shape[2])


def native_shift(name: str, volume, label):
    """(CT, label) on the grid the shifted scan has, for one of SHIFTS."""
    from liverseg.io import Volume
    from liverseg.modelspace import resize_native

    if name == "clean":
        return volume, label
    if name == "arterial":
        return Volume(arterial(volume.array, label.array), volume.affine, volume.source), label
    if name == "fov_cut":
        z0, z1 = fov_range(label.array, superior_is_high=volume.affine[2, 2] > 0)
        affine = volume.affine.copy()
        affine[:3, 3] = volume.affine[:3, :3] @ np.array([0, 0, z0]) + volume.affine[:3, 3]
        return (
            Volume(np.ascontiguousarray(volume.array[:, :, z0:z1]), affine, volume.source),
            Volume(np.ascontiguousarray(label.array[:, :, z0:z1]), affine),
        )
    if name == "thick5mm":
        n = volume.shape[2]
        new = max(1, round(n * volume.spacing[2] / 5.0))
        shape = (*volume.shape[:2], new)
        image = resize_native(np.asarray(volume.array, dtype=np.float32), shape)  # area average: thick slices
        scale = n / new
        index_map = np.diag([1.0, 1.0, scale, 1.0])
        index_map[2, 3] = (scale - 1.0) / 2.0
        affine = volume.affine @ index_map
        channels = [resize_native((label.array == c).astype(np.float32), shape) for c in (0, 1, 2)]
        return Volume(image, affine, volume.source), Volume(
            np.argmax(np.stack(channels), 0).astype(np.uint8), affine
        )
    raise ValueError(name)


def model_space_shift(name: str, image, label, intensity, z_spacing: float):
    """The same shifts on a cached model-space case (for the quick CV on the training machine)."""
    import torch

    from liverseg.modelspace import intensity_to_hu, normalise_intensity
    from liverseg.robustness import PAD_VALUE, clipped, thicken_slices

    x = torch.as_tensor(image)[None]
    if name == "clean":
        return x[0], label
    hu = intensity_to_hu(x, intensity)
    keep = clipped(x, intensity)
    if name == "arterial":
        shifted = torch.as_tensor(arterial(hu[0, 0].numpy(), label, keep[0, 0].numpy()))[None, None]
    elif name == "thick5mm":
        shifted = thicken_slices(hu, 5.0 / z_spacing, 0.0)
    elif name == "fov_cut":
        z0, z1 = fov_range(label, superior_is_high=True)  # model space is RAS
        out = x.clone()
        out[..., :z0] = PAD_VALUE
        out[..., z1:] = PAD_VALUE
        cut = label.copy()
        cut[..., :z0] = 0
        cut[..., z1:] = 0
        return out[0], cut
    else:
        raise ValueError(name)
    out = torch.where(keep, x, normalise_intensity(shifted, intensity))
    return out[0], label


# --------------------------------------------------------------------------------------------
# evaluation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def quick_cv(work: Path, device: str, approaches: list[str]) -> dict:
    """Liver Dice of each fold on its held-out case, in model space (the cached grid), clean and
    shifted: what the training machine can measure without the native CTs."""
    import torch

    from liverseg.bundle import load_bundle
    from liverseg.infer import model_probabilities
    from liverseg.modelspace import decide_labels
    from liverseg.preprocess import load_cached_case

    results: dict = {"approaches": {}, "folds": {}}
    for name, (approach, split) in all_runs(approaches).items():
        run_dir = model_dir(work, name)
        if not split["val"] or not (run_dir / "model.pt").is_file():
            continue
        bundle = load_bundle(run_dir, device=device)
        cache = work / APPROACHES[approach]["cache"]
        for case_id in split["val"]:
            case = load_cached_case(cache, case_id)
            z = float(case.sidecar["model_spacing"][2])
            row = {}
            for shift in SHIFTS:
                image, label = model_space_shift(
                    shift, case.image, case.label, bundle.plan.preprocess.intensity, z
                )
                with torch.inference_mode():
                    probs = model_probabilities(image.contiguous(), bundle, device=device)
                pred = decide_labels(probs, bundle.plan.infer.nested_classes).numpy()
                row[shift] = round(dice(pred > 0, label > 0), 4)
                if shift == "clean" and (label == 2).any():
                    row["tumour_clean"] = round(dice(pred == 2, label == 2), 4)
            results["folds"][name] = {"approach": approach, "case": case_id, **row}
            print(name, case_id, row, flush=True)
    for approach in approaches:
        rows = [r for r in results["folds"].values() if r["approach"] == approach]
        if rows:
            values = [r[s] for r in rows for s in SHIFTS]
            results["approaches"][approach] = {
                "folds": len(rows),
                "mean_liver_dice": round(float(np.mean(values)), 4),
                "worst_liver_dice": round(float(np.min(values)), 4),
            }
    if results["approaches"]:
        results["best"] = max(
            results["approaches"],
            key=lambda a: (results["approaches"][a]["folds"], results["approaches"][a]["mean_liver_dice"]),
        )
    (work / "quick_cv.json").write_text(json.dumps(results, indent=2))
    return results


def collect(work: Path, out: Path, best: str, max_files: int = 7, max_mb: float = 60.0) -> list[str]:
    """Run bundles (one archive each) to take away from the training machine, best first: the best
    approach's folds and final run, then the other approaches' final runs, then their folds, within a
    file count and size; plus one archive of the quick CV, logs and cards."""
    out.mkdir(parents=True, exist_ok=True)
    others = [a for a in APPROACHES if a != best]
    order = list(runs(best)) + [f"{a}_final" for a in others] + [n for a in others for n in runs(a)]
    taken: list[str] = []
    size = 0.0
    for name in dict.fromkeys(order):
        run_dir = model_dir(work, name)
        if not (run_dir / "model.pt").is_file() or len(taken) == max_files:
            continue
        mb = (run_dir / "model.pt").stat().st_size / 1e6
        if size + mb > max_mb:
            continue
        with tarfile.open(out / f"{name}.tar", "w") as tar:
            for file in ("model.pt", "plan.json", "model_card.json", "log.csv"):
                if (run_dir / file).is_file():
                    tar.add(run_dir / file, arcname=f"{name}/{file}")
        taken.append(name)
        size += mb
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in [
            work / "quick_cv.json",
            *sorted((work / "logs").glob("*.log")),
            *sorted((work / "runs").glob("*/log.csv")),
            *sorted((work / "runs").glob("*/model_card.json")),
        ]:
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(work)))
    print(f"collected {taken} ({size:.0f} MB) into {out}")
    return taken


def evaluate(work: Path, approach: str, shifts: tuple[str, ...] = SHIFTS) -> dict:
    """Native-grid CV of one approach (or of the teacher, ``approach="teacher"``: the imported model
    as it ships), clean and shifted; results are kept per case and shift, so a rerun goes on."""
    import torch

    from liverseg.bundle import load_bundle
    from liverseg.infer import predict_volume
    from liverseg.io import read_ct, read_label
    from liverseg.metrics import score_binary

    torch.set_num_threads(2)
    out_path = work / f"cv_{approach}.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"cases": {}}
    folds = {held: f"{approach}_{held}" for held in EXPERT_CASES}
    for held, name in folds.items():
        if approach != "teacher" and not (model_dir(work, name) / "model.pt").is_file():
            print(f"{name}: not trained yet, skipped", flush=True)
            continue
        bundle = load_bundle(TEACHER if approach == "teacher" else model_dir(work, name))
        volume = read_ct(DATA / "imagesTr" / f"{held}.nii.gz")
        reference = read_label(DATA / "labelsTr" / f"{held}.nii.gz")
        for shift in shifts:
            key = f"{held}/{shift}"
            if key in results["cases"]:
                continue
            image, label = native_shift(shift, volume, reference)
            start = time.perf_counter()
            labels = predict_volume(image, bundle).labels
            liver = score_binary(
                labels > 0, label.array > 0, image.spacing, voxel_volume_ml=image.voxel_volume_ml
            )
            row = {
                "model": "teacher" if approach == "teacher" else model_dir(work, name).name,
                "liver_dice": round(liver["dice"], 4),
                "liver_hd95_mm": round(liver["hd95_mm"], 2),
                "seconds": round(time.perf_counter() - start, 1),
            }
            if (label.array == 2).any() and approach != "teacher":
                tumour = score_binary(
                    labels == 2, label.array == 2, image.spacing, voxel_volume_ml=image.voxel_volume_ml
                )
                row["tumour_dice"] = round(tumour["dice"], 4)
            results["cases"][key] = row
            print(key, json.dumps(row), flush=True)
            out_path.write_text(json.dumps(results, indent=2))
    return results


def _cv_table(work: Path, approach: str) -> dict[str, dict[str, dict]]:
    """case -> shift -> {"model": row, "teacher": row} from the native evaluations."""
    ours = json.loads((work / f"cv_{approach}.json").read_text())["cases"]
    teacher_path = work / "cv_teacher.json"
    theirs = json.loads(teacher_path.read_text())["cases"] if teacher_path.is_file() else {}
    table: dict[str, dict[str, dict]] = {}
    for key, row in ours.items():
        case, shift = key.split("/")
        table.setdefault(case, {})[shift] = {"model": row, "teacher": theirs.get(key)}
    return dict(sorted(table.items()))  # cases in order, however often a fold was re-evaluated


def package(work: Path, approach: str) -> Path:
    """The approach's final run -> liverseg/models/liver_default (pipelines/default_v2_card.py)."""
    from default_v2_card import package as package_bundle

    return package_bundle(model_dir(work, f"{approach}_final"), _cv_table(work, approach), approach,
                          APPROACHES[approach]["config"], EXPERT_CASES)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage", choices=["prepare", "train", "quick-cv", "collect", "evaluate", "package", "card"]
    )
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=None, help="seconds each training run may take")
    parser.add_argument("--approaches", nargs="*", default=list(APPROACHES))
    parser.add_argument("--runs", nargs="*", default=None, help="train only these runs")
    parser.add_argument("--approach", default=None, help="for collect / evaluate / package")
    parser.add_argument("--out", type=Path, default=None, help="collect: where the archives go")
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS), help="evaluate: these conditions only")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="train: an extra config override for every run (e.g. a smoke test's patch size)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "prepare":
        prepare(args.work)
    elif args.stage == "train":
        train(
            args.work, args.runs or list(all_runs(args.approaches)), args.device, args.budget, args.overrides
        )
    elif args.stage == "quick-cv":
        quick_cv(args.work, args.device, args.approaches)
    elif args.stage == "collect":
        best = args.approach or json.loads((args.work / "quick_cv.json").read_text()).get("best", "distill")
        collect(args.work, args.out or args.work / "collected", best)
    elif args.stage == "evaluate":
        evaluate(args.work, args.approach or "distill", tuple(args.shifts))
    elif args.stage == "package":
        package(args.work, args.approach or "distill")
    elif args.stage == "card":  # after bench_infer.py timed the packaged weights; CV rows may be newer
        from default_v2_card import refresh_card

        approach = args.approach or "distill"
        cv_known = (args.work / f"cv_{approach}.json").is_file()
        refresh_card(_cv_table(args.work, approach) if cv_known else None, EXPERT_CASES)
    shutil.rmtree(args.work / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
