"""Crashes and concurrent runs: `infer`, `train --resume` and `preprocess` killed with SIGKILL at
random moments (from outside at a random time, or from inside just before a randomly chosen
atomic rename or optimiser step, see crash_helper.py) end, after a rerun, exactly where an
uninterrupted run ends, with no temporary file left and nothing finished redone; two `infer`
runs on one output folder split the cases between them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, shared_file
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.io import Volume, read_ct, read_label, save_volume

HELPER = Path(__file__).with_name("crash_helper.py")
CPU_SMALL = REPO / "configs" / "cpu_small.yaml"
CASES = ("a", "b", "c", "d")
runner = CliRunner()
SEED = int.from_bytes(os.urandom(4), "little")  # printed with every failure, to replay a run


def _rng(salt: str) -> random.Random:
    return random.Random(f"{SEED}-{salt}")


def _start(*args: str, kill: str | None = None, threads: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(HELPER), *([kill] if kill else []), "--", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"seed {SEED}: not killed ({proc.returncode}): {err[-2000:]}"


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and claims (liverseg's only dot files) anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def _stamps(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern) if not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------
# infer


@pytest.fixture(scope="module")
def case_folder(small_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real CT crops, a little different each (so their masks differ)."""
    folder = tmp_path_factory.mktemp("crash_cases")
    volume = read_ct(small_ct)
    for i, name in enumerate(CASES):
        crop = 3 * i
        shift = np.eye(4)
        shift[:3, 3] = [crop, 0, crop]
        save_volume(Volume(volume.array[crop:, :, crop:].copy(), volume.affine @ shift),
                    folder / f"{name}.nii.gz")
    return folder


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {c: np.asarray(nib.load(out / f"{c}.nii.gz").dataobj) for c in CASES}


def _sidecar(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("seconds")
    return data


@pytest.fixture(scope="module")
def reference_run(case_folder: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = runner.invoke(app, ["infer", str(case_folder), "-o", str(out), "--model", str(tiny_bundle),
                                 "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_infer_killed_at_random_moments_then_rerun_equals_an_uninterrupted_run(
        case_folder: Path, tiny_bundle: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["infer", str(case_folder), "-o", str(out), "--model", str(tiny_bundle), "-q"]
    # 1. Killed from inside, just before a random one of the 8 renames (mask or sidecar of a case).
    rng = _rng("infer")
    _killed(_start(*args, kill=f"replace:{out}:{rng.randint(1, 2 * len(CASES))}"))
    # 2. Killed from outside at a random moment once the run has got going.
    before = set(_stamps(out, "*.json"))
    proc = _start(*args)
    deadline = time.monotonic() + 120
    while proc.poll() is None and set(_stamps(out, "*.json")) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finished = {c for c in CASES if (out / f"{c}.json").is_file()}
    stamps = {**_stamps(out, "*.json"), **{f"{c}.nii.gz": (out / f"{c}.nii.gz").stat().st_mtime_ns
                                          for c in finished}}
    # 3. The rerun: finished cases are kept as they are, the rest done, nothing left behind.
    result = runner.invoke(app, [*args[:-1], "--json"])
    assert result.exit_code == 0, f"seed {SEED}: {result.output}"
    report = json.loads(result.stdout)
    assert (report["skipped"], report["done"]) == (len(finished), len(CASES) - len(finished)), SEED
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items()
               if name.removesuffix(".json").removesuffix(".nii.gz") in finished), SEED
    assert _leftovers(out) == [], f"seed {SEED}"
    assert sorted(p.name for p in out.iterdir()) == [f"{c}{s}" for c in CASES for s in (".json", ".nii.gz")]
    expected = _masks(reference_run)
    for case, mask in _masks(out).items():
        np.testing.assert_array_equal(mask, expected[case], err_msg=f"{case}, seed {SEED}")
        assert _sidecar(out / f"{case}.json") == {**_sidecar(reference_run / f"{case}.json"),
                                                  "input": str(case_folder / f"{case}.nii.gz"),
                                                  "mask": str(out / f"{case}.nii.gz")}


def test_two_infer_runs_on_one_output_folder_split_the_cases(
        case_folder: Path, tiny_bundle: Path, reference_run: Path, tmp_path: Path) -> None:
    """Two runs at once, with different models so that a mask from one and a sidecar from the
    other would show: each case is computed once, by one run, and mask and sidecar agree."""
    from liverseg.bundle import save_bundle
    from liverseg.config import Config, ModelConfig
    from liverseg.networks import build_network

    torch.manual_seed(1)
    cfg = Config(model=ModelConfig(filters=[8, 16, 32, 64], kernel_size=[3, 3, 3, 3],
                                   strides=[1, 2, 2, 2], deep_supr_num=1))
    other = save_bundle(tmp_path / "other", cfg, build_network(cfg.model).state_dict(),
                        card={"name": "other", "version": "0"})
    other_out = tmp_path / "other_reference"
    assert runner.invoke(app, ["infer", str(case_folder), "-o", str(other_out), "--model", str(other),
                               "-q"]).exit_code == 0
    references = {"tiny": _masks(reference_run), "other": _masks(other_out)}
    assert any(not np.array_equal(references["tiny"][c], references["other"][c]) for c in CASES)

    out = tmp_path / "out"
    runs = [_start("infer", str(case_folder), "-o", str(out), "--model", str(model), "--json", threads=1)
            for model in (tiny_bundle, other)]
    reports = []
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        reports.append(json.loads(stdout))
    done = [{c["case"] for c in r["cases"] if c["status"] == "done"} for r in reports]
    assert done[0] | done[1] == set(CASES) and not done[0] & done[1], done  # each case once
    for r in reports:  # and each run returns only when every case is finished
        assert sorted(c["case"] for c in r["cases"] if c["status"] in ("done", "skipped")) == list(CASES)
    masks = _masks(out)
    for case in CASES:
        model = json.loads((out / f"{case}.json").read_text())["model_id"]
        np.testing.assert_array_equal(masks[case], references[model][case], err_msg=case)
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# train --resume

TINY = ["model.filters=[4,8,16]", "model.kernel_size=[3,3,3]", "model.strides=[1,2,2]",
        "model.deep_supr_num=1", "train.patch_size=[32,32,32]", "train.batch_size=1",
        "train.iterations=6", "train.checkpoint_every=2", "train.deterministic=true", "train.num_workers=0"]


def test_train_killed_in_a_checkpoint_write_and_in_a_step_resumes_to_the_same_weights(
        small_liver_cache: Path, tmp_path: Path) -> None:
    from liverseg.config import load_config
    from liverseg.train import train

    straight = tmp_path / "straight"
    train(small_liver_cache, straight, load_config(CPU_SMALL, TINY), device="cpu", quiet=True)
    run = tmp_path / "run"
    args = ["train", str(small_liver_cache), "-o", str(run), "--config", str(CPU_SMALL),
            *[a for s in TINY for a in ("--set", s)], "--device", "cpu", "-q"]
    # Killed while its first checkpoint is written (step 2): no last.pt yet, but --resume goes on.
    _killed(_start(*args, kill="replace:last.pt:1"))
    assert not (run / "checkpoints" / "last.pt").exists()
    # Killed in the middle of a random later step (between backward and the optimiser's update).
    step = _rng("train").randint(3, 6)
    _killed(_start(*args, "--resume", kill=f"call:torch.optim:AdamW.step:{step}"))
    resumed = train(small_liver_cache, run, load_config(CPU_SMALL, TINY), device="cpu", quiet=True,
                    resume=True)
    assert resumed.iterations == 6
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"step {step}, seed {SEED}"
    logs = [[r.split(",")[:2] for r in (d / "log.csv").read_text().splitlines()[1:]] for d in (straight, run)]
    assert [r[0] for r in logs[1]] == ["1", "2", "3", "4", "5", "6"]
    assert logs[0] == logs[1], f"step {step}, seed {SEED}"  # the same losses, step for step
    assert _leftovers(run) == [], f"seed {SEED}"


# ---------------------------------------------------------------------------------------------
# preprocess


@pytest.fixture(scope="module")
def three_case_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MSD layout, three real labelled crops of tsexample (3 mm) around its liver."""
    root = tmp_path_factory.mktemp("three_cases")
    image = read_ct(shared_file("liver/imagesTr/tsexample.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))
    training = []
    for i, name in enumerate(("p", "q", "r")):
        lo = np.array([20 + 2 * i, 20, 40 + 2 * i])
        box = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, (60, 56, 44), strict=True))
        shift = np.eye(4)
        shift[:3, 3] = lo
        for sub, vol in (("imagesTr", image), ("labelsTr", label)):
            save_volume(Volume(vol.array[box].copy(), vol.affine @ shift), root / sub / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"},
                                                   "training": training}))
    return root


def test_preprocess_killed_at_a_random_write_then_rerun_equals_an_uninterrupted_run(
        three_case_dataset: Path, tmp_path: Path) -> None:
    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset

    cfg = load_config(CPU_SMALL).preprocess
    straight = tmp_path / "straight"
    preprocess_dataset(three_case_dataset, straight, cfg)
    cache = tmp_path / "cache"
    # 3 cases x (sample, arrays, sidecar) + fingerprint + preprocess.json = 11 renames.
    moment = _rng("preprocess").randint(1, 11)
    _killed(_start("preprocess", str(three_case_dataset), "-o", str(cache), "--config", str(CPU_SMALL), "-q",
                   kill=f"replace:{cache}:{moment}"))
    finished = _stamps(cache / "cases", "*.json")
    report = preprocess_dataset(three_case_dataset, cache, cfg)
    assert sorted(report.skipped) == sorted(Path(n).stem for n in finished), f"moment {moment}, seed {SEED}"
    assert {n: s for n, s in _stamps(cache / "cases", "*.json").items() if n in finished} == finished
    assert _leftovers(cache) == [], f"moment {moment}, seed {SEED}"
    files = sorted(str(p.relative_to(straight)) for p in straight.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == files
    for name in files:
        a, b = straight / name, cache / name
        if name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                assert all(np.array_equal(x[k], y[k]) for k in x.files) and x.files == y.files, name
        elif name.endswith(".npy"):
            assert np.array_equal(np.load(a), np.load(b)), name
        else:
            assert json.loads(a.read_text().replace(str(straight), "")) == \
                json.loads(b.read_text().replace(str(cache), "")), name
