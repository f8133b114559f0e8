"""`liverseg preprocess`: the cache, its fingerprint, reruns, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import liver_case_ids, shared_file
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.config import PreprocessConfig
from liverseg.datasets import Case
from liverseg.preprocess import (
    SAMPLES_PER_CASE,
    is_cache,
    list_cached_cases,
    load_cached_case,
    preprocess_case,
    read_cache_config,
)

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["preprocess", *[str(a) for a in args]])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real CT crop (tsexample, 3 mm, 70x55x47) and its liver label, as NIfTI files."""
    folder = tmp_path_factory.mktemp("small")
    ct = nib.load(shared_file("liver/imagesTr/tsexample.nii.gz"))
    lab = nib.load(shared_file("liver/labelsTr/tsexample.nii.gz"))
    sl = (slice(30, 100), slice(20, 75), slice(65, 112))  # around the liver
    image = nib.Nifti1Image(np.asarray(ct.dataobj)[sl], ct.slicer[sl].affine)
    label = nib.Nifti1Image(np.asarray(lab.dataobj)[sl].astype(np.uint8), lab.slicer[sl].affine)
    assert np.asarray(label.dataobj).sum() > 1000  # the crop holds liver
    nib.save(image, folder / "ct.nii.gz")
    nib.save(label, folder / "ct_label.nii.gz")
    return folder / "ct.nii.gz", folder / "ct_label.nii.gz"


def csv_dataset(folder: Path, rows: list[tuple[Path | str, Path | str | None]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    path.write_text("image,label\n" + "".join(f"{i},{lab or ''}\n" for i, lab in rows))
    return path


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ---- acceptance: the real dataset ------------------------------------------------------------


def test_real_dataset_volumes_within_one_percent(liver_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code, _, err = run(liver_dataset, "-o", cache, "--quiet")
    assert code == 0, err
    assert is_cache(cache)
    assert list_cached_cases(cache) == liver_case_ids()
    cfg, labels = read_cache_config(cache)
    assert cfg == PreprocessConfig() and labels == {0: "background", 1: "liver", 2: "tumour"}
    meta = json.loads((cache / "preprocess.json").read_text())
    assert meta["layout"] == "msd" and Path(meta["dataset"]) == liver_dataset.resolve()
    fingerprint = json.loads((cache / "fingerprint.json").read_text())

    for case_id in list_cached_cases(cache):
        original = nib.load(liver_dataset / "labelsTr" / f"{case_id}.nii.gz")
        data = np.asarray(original.dataobj)
        voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
        liver_ml = (data == 1).sum() * voxel_ml  # liver parenchyma
        whole_ml = (data > 0).sum() * voxel_ml  # liver with its tumours (LiTS convention)

        cached = load_cached_case(cache, case_id)
        recorded = cached.sidecar["label_volumes_ml"]
        assert recorded["liver"] == pytest.approx(liver_ml, rel=0.01)
        assert fingerprint["cases"][case_id]["label_volumes_ml"]["liver"] == pytest.approx(liver_ml,
                                                                                            rel=0.01)
        # The cached model-space label itself keeps the liver volume (one-hot resampling).
        model_voxel_ml = np.prod(cached.sidecar["model_spacing"]) / 1000
        assert (cached.label > 0).sum() * model_voxel_ml == pytest.approx(whole_ml, rel=0.01)
        assert cached.image.dtype == np.float32 and cached.image.shape == (1, *cached.label.shape)
        assert cached.image.min() >= 0.0 and cached.image.max() <= 1.0  # window -175..250 HU
        assert cached.sidecar["spatial"]["native_shape"] == list(data.shape)

    stats = fingerprint["summary"]["foreground_hu"]
    assert stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    assert 30 < stats["mean"] < 200  # contrast-enhanced liver
    assert stats["num_samples"] == SAMPLES_PER_CASE * len(liver_case_ids())  # every case has liver

    # Rerun: everything unchanged is skipped and no array file is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (cache / "cases").glob("*.npz")}
    code, out, _ = run(liver_dataset, "-o", cache, "--json")
    assert code == 0
    report = json.loads(out)
    assert sorted(report["skipped"]) == liver_case_ids() and report["done"] == []
    assert {p: p.stat().st_mtime_ns for p in (cache / "cases").glob("*.npz")} == before


def test_force_workers_config_and_overrides(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = small_case
    (tmp_path / "b").mkdir()
    second = tmp_path / "b" / "ct2.nii.gz"
    second.write_bytes(image.read_bytes())
    dataset = csv_dataset(tmp_path, [(image, label), (second, label)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preprocess:\n  target_spacing: [4, 4, 4]\n")
    cache = tmp_path / "cache"

    code, out, err = run(dataset, "-o", cache, "--config", recipe, "--workers", "2", "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["done"]) == ["ct", "ct2"]
    assert load_cached_case(cache, "ct").sidecar["model_spacing"] == pytest.approx([4, 4, 4], rel=0.07)
    a, b = load_cached_case(cache, "ct"), load_cached_case(cache, "ct2")
    np.testing.assert_array_equal(a.image, b.image)  # same input, same output, in any worker

    code, out, _ = run(dataset, "-o", cache, "--config", recipe, "--json")
    assert json.loads(out)["skipped"] == ["ct", "ct2"]
    code, out, _ = run(dataset, "-o", cache, "--config", recipe, "--json", "--force")
    assert sorted(json.loads(out)["done"]) == ["ct", "ct2"]
    # A changed setting is a changed config: the cases are redone at the new spacing.
    code, out, _ = run(dataset, "-o", cache, "--config", recipe, "--json",
                       "--set", "preprocess.target_spacing=[5,5,5]")
    assert sorted(json.loads(out)["done"]) == ["ct", "ct2"]
    assert load_cached_case(cache, "ct").sidecar["model_spacing"] == pytest.approx([5, 5, 5], rel=0.1)
    assert read_cache_config(cache)[0].target_spacing == (5.0, 5.0, 5.0)


def test_zscore_from_fingerprint(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = small_case
    dataset = csv_dataset(tmp_path, [(image, label)])
    cache = tmp_path / "cache"
    code, _, err = run(dataset, "-o", cache, "-q", "--set", "preprocess.intensity.mode=zscore")
    assert code == 0, err
    cfg, _ = read_cache_config(cache)
    stats = json.loads((cache / "fingerprint.json").read_text())["summary"]["foreground_hu"]
    assert cfg.intensity.mean == pytest.approx(stats["mean"])
    assert cfg.intensity.std == pytest.approx(stats["std"])
    assert (cfg.intensity.lower, cfg.intensity.upper) == (stats["percentile_00_5"],
                                                          stats["percentile_99_5"])
    cached = load_cached_case(cache, "ct")
    liver = cached.image[0][cached.label == 1]
    assert abs(float(np.median(liver))) < 1.0  # liver is the foreground: centred by the z-score


def test_preprocess_case_in_memory(small_case: tuple[Path, Path]) -> None:
    image, label = small_case
    labels = {0: "background", 1: "liver", 2: "tumour"}
    arr, lab, sidecar = preprocess_case(Case("ct", image, label), PreprocessConfig(), labels)
    assert arr.shape == (1, *lab.shape) and lab.dtype == np.uint8
    assert tuple(sidecar["model_shape"]) == lab.shape
    assert sidecar["sources"]["image"]["size"] == image.stat().st_size


# ---- bad input: exit 2, one clear line, no traceback, no output -------------------------------


def _bad(tmp_path: Path, dataset: Path, *needles: str) -> None:
    cache = tmp_path / "cache"
    code, out, err = run(dataset, "-o", cache)
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in err + out
    assert leftovers(cache) == []


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.nii.gz"
    _bad(tmp_path, csv_dataset(tmp_path, [(missing, None)]), str(missing), "not found")


def test_missing_dataset(tmp_path: Path) -> None:
    _bad(tmp_path, tmp_path / "no_such_dataset", "no_such_dataset", "not found")


def test_corrupt_nifti(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    _bad(tmp_path, csv_dataset(tmp_path, [(bad, None)]), str(bad), "corrupt")


def test_truncated_nifti(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    data = small_case[0].read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _bad(tmp_path, csv_dataset(tmp_path, [(cut, None)]), str(cut), "truncated")


@pytest.mark.parametrize("dims", [2, 4])
def test_2d_and_4d_images(small_case: tuple[Path, Path], tmp_path: Path, dims: int) -> None:
    ct = nib.load(small_case[0])
    array = np.asarray(ct.dataobj)
    array = array[:, :, 10] if dims == 2 else np.stack([array, array], axis=-1)
    path = tmp_path / f"img{dims}d.nii.gz"
    nib.save(nib.Nifti1Image(array, ct.affine), path)
    _bad(tmp_path, csv_dataset(tmp_path, [(path, None)]), str(path), f"{dims}D")


def test_grid_mismatch_names_both_files(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = small_case
    lab = nib.load(label)
    shifted = tmp_path / "label_other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :-5], lab.affine), shifted)
    _bad(tmp_path, csv_dataset(tmp_path, [(image, shifted)]), str(shifted), str(image), "grid")


def test_undeclared_label_values(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = small_case
    lab = nib.load(label)
    data = np.asarray(lab.dataobj).copy()
    data[data == 1] = 7
    odd = tmp_path / "label7.nii.gz"
    nib.save(nib.Nifti1Image(data, lab.affine), odd)
    _bad(tmp_path, csv_dataset(tmp_path, [(image, odd)]), str(odd), "[7]", "declared labels")


def test_empty_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, tmp_path / "empty", "no cases found")


def test_dicom_folder_with_no_images(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i:04d}.dcm").write_bytes(b"DICM but not really" * 20)
    _bad(tmp_path, folder, str(folder), "no readable DICOM image series")
    # The same folder named as a case image in a CSV fails that case with the same explanation.
    _bad(tmp_path, csv_dataset(tmp_path / "csv", [(folder, None)]), str(folder),
         "no readable DICOM image series")


def test_batch_goes_on_past_bad_cases(small_case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = small_case
    cut = tmp_path / "bad" / "broken.nii.gz"
    cut.parent.mkdir()
    cut.write_bytes(image.read_bytes()[:2000])
    dataset = csv_dataset(tmp_path, [(image, label), (cut, None)])
    cache = tmp_path / "cache"
    code, out, err = run(dataset, "-o", cache)
    assert code == 2
    assert "Traceback" not in err + out
    assert any(line.startswith("error: broken:") and str(cut) in line for line in err.splitlines())
    assert "failed 1" in err and "failed: broken" in err.splitlines()[-1]
    assert list_cached_cases(cache) == ["ct"]
    assert not any("broken" in p.name for p in leftovers(cache))
    assert json.loads((cache / "preprocess.json").read_text())["cases"] == ["ct"]
    assert not any(p.name.startswith(".") for p in leftovers(cache))  # no temporary files
