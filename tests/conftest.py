"""Shared fixtures. Real CT comes from ../shared/data; a missing file fails the test (never skips)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LIVER_DATASET = SHARED_DATA / "liver"
DICOM_DIR = SHARED_DATA / "dicom"


def shared_file(relative: str) -> Path:
    """A path in ../shared/data that must exist: CI treats missing data as a failure."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the repository expects ../shared/data beside it)")
    return path


@pytest.fixture(scope="session")
def liver_dataset() -> Path:
    return shared_file("liver")


def liver_case_ids() -> list[str]:
    """The case names listed in ../shared/data/liver/dataset.json, sorted: tests follow the data."""
    import json

    listed = json.loads(shared_file("liver/dataset.json").read_text())["training"]
    cases = sorted(Path(entry["label"]).name.removesuffix(".nii.gz") for entry in listed)
    if not cases:
        pytest.fail(f"{LIVER_DATASET / 'dataset.json'} lists no training cases")
    return cases


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI has 2 cores: keep torch from oversubscribing them when tests spawn subprocesses.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")


# --- A small trained model, shared by the train, infer and score tests ---------------------------

TRAINED_CASE = "ircadb07"


def crop_case_to_liver(image_path: Path, label_path: Path, out_dir: Path, case_id: str,
                       margin_mm: float = 15.0) -> None:
    """Write an MSD-layout dataset holding one real case cropped (on its native grid, no resampling)
    to the liver's bounding box plus a margin; the affine is shifted so geometry stays exact."""
    import json

    import numpy as np

    from liverseg.io import Volume, read_ct, read_label, save_volume

    image, label = read_ct(image_path), read_label(label_path)
    where = np.argwhere(label.array > 0)
    margin = np.ceil(margin_mm / np.asarray(image.spacing)).astype(int)
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + 1 + margin, image.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ lo + image.affine[:3, 3]
    for sub, vol in (("imagesTr", image), ("labelsTr", label)):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        save_volume(Volume(np.ascontiguousarray(vol.array[box]), affine), out_dir / sub / f"{case_id}.nii.gz")
    (out_dir / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}],
    }))


@pytest.fixture(scope="session")
def small_liver_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MSD dataset with one real case: ircadb07 cropped to its liver (+15 mm), about 99x74x66 at 3 mm."""
    out = tmp_path_factory.mktemp("small_liver_dataset")
    crop_case_to_liver(shared_file(f"liver/imagesTr/{TRAINED_CASE}.nii.gz"),
                       shared_file(f"liver/labelsTr/{TRAINED_CASE}.nii.gz"), out, TRAINED_CASE)
    return out


@pytest.fixture(scope="session")
def small_liver_cache(small_liver_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_liver_dataset`` preprocessed (configs/cpu_small.yaml: 3 mm, window) into a cache."""
    from liverseg.config import load_config
    from liverseg.preprocess import preprocess_dataset

    cache = tmp_path_factory.mktemp("small_liver_cache") / "cache"
    config = load_config(REPO / "configs" / "cpu_small.yaml")
    report = preprocess_dataset(small_liver_dataset, cache, config.preprocess, quiet=True)
    assert report.done == [TRAINED_CASE], report.failed
    return cache


@pytest.fixture(scope="session")
def trained_bundle(small_liver_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_DIR of a small DynUNet (configs/cpu_small.yaml) trained ~70 s (2 idle cores) on the cropped
    ircadb07 case (validated on itself), loadable with ``liverseg.bundle.load_bundle(path)``.

    The CT it was trained on is ``small_liver_dataset / "imagesTr" / "ircadb07.nii.gz"`` (label in
    ``labelsTr``); its model-space cache is the ``small_liver_cache`` fixture.
    Set LIVERSEG_TEST_TRAIN_ITERATIONS to change the number of training steps.
    """
    import json
    import os

    from liverseg.config import load_config
    from liverseg.train import train

    run_dir = tmp_path_factory.mktemp("trained_bundle") / "run"
    run_dir.mkdir()
    (run_dir / "splits.json").write_text(json.dumps([{"train": [TRAINED_CASE], "val": [TRAINED_CASE]}]))
    iterations = int(os.environ.get("LIVERSEG_TEST_TRAIN_ITERATIONS", "100"))
    # A fixed number of seeded steps (not a time budget), so the model is the same however busy the
    # machine is; about 70 s on 2 idle cores (~1.4 CPU-s a step). No augmentation and a high
    # learning rate: the point is to fit this one case fast. Validation (same case) once, at the end.
    config = load_config(REPO / "configs" / "cpu_small.yaml", [
        f"train.iterations={iterations}", f"train.val_every={iterations}",
        f"train.checkpoint_every={iterations}", "train.augment=false", "train.lr=0.01"])
    train(small_liver_cache, run_dir, config, fold=0, device="cpu", quiet=True)
    return run_dir


# --- Small inputs for inference tests -------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small network: enough for geometry, CLI and error handling."""
    import torch

    from liverseg.bundle import save_bundle
    from liverseg.config import Config, ModelConfig
    from liverseg.networks import build_network

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(filters=[8, 16, 32, 64], kernel_size=[3, 3, 3, 3],
                                   strides=[1, 2, 2, 2], deep_supr_num=1))
    path = tmp_path_factory.mktemp("tiny_bundle")
    save_bundle(path, cfg, build_network(cfg.model).state_dict(), card={"name": "tiny", "version": "0"})
    return path


@pytest.fixture(scope="session")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CT at 3 mm (TotalSegmentator example), cropped to 72 x 64 x 56 around the upper
    abdomen so the CLI tests take about a second per case."""
    import numpy as np

    from liverseg.io import Volume, read_ct, save_volume

    volume = read_ct(shared_file("liver/imagesTr/tsexample.nii.gz"))
    start = (20, 20, 40)
    crop = volume.array[20:92, 20:84, 40:96].copy()
    shift = np.eye(4)
    shift[:3, 3] = start
    return save_volume(Volume(crop, volume.affine @ shift),
                       tmp_path_factory.mktemp("small_ct") / "small.nii.gz")
