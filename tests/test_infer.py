"""`liverseg infer`: geometry on any input grid, agreement across orientations and formats, the
batch runner (resume, shard, failures) and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_file
from scipy import ndimage
from typer.testing import CliRunner

from liverseg.bundle import default_bundle_path, load_bundle, save_bundle
from liverseg.cli import app
from liverseg.config import Config, ModelConfig
from liverseg.infer import predict_volume
from liverseg.io import Volume, read_ct, read_label, save_volume
from liverseg.networks import build_network

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Models and inputs


@pytest.fixture(scope="session")
def real_bundle() -> Path:
    """The model shipped in the package: it has learnt livers, so agreement can be demanded."""
    path = default_bundle_path()
    if not (path / "plan.json").is_file():
        pytest.fail(f"the shipped model is missing at {path}")
    return path


AGREEMENT = 0.98


def _resample(volume: Volume, affine: np.ndarray, shape: tuple[int, ...], order: int,
              cval: float) -> np.ndarray:
    """Values of ``volume`` on another grid (world-coordinate mapping, scipy interpolation)."""
    index_map = np.linalg.inv(volume.affine) @ affine
    return ndimage.affine_transform(volume.array, index_map[:3, :3], offset=index_map[:3, 3],
                                    output_shape=shape, order=order, cval=cval, mode="constant")


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def _grid_around(volume: Volume, axes: np.ndarray, spacing: tuple[float, float, float]
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid with the given axis directions and spacing covering all of ``volume``."""
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, volume.shape[0] - 0.5)
                        for j in (-0.5, volume.shape[1] - 0.5) for k in (-0.5, volume.shape[2] - 0.5)])
    world = (volume.affine @ corners.T)[:3]
    local = axes.T @ world  # coordinates along the new (unit) axes
    low, high = local.min(axis=1), local.max(axis=1)
    shape = tuple(int(np.ceil((h - lo) / s)) for lo, h, s in zip(low, high, spacing, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(spacing)
    affine[:3, 3] = axes @ (low + 0.5 * np.array(spacing))
    return affine, shape  # type: ignore[return-value]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def _liver_on(mask_path: Path, reference: Volume) -> np.ndarray:
    """A predicted liver (label > 0) mapped onto the reference grid (linear, threshold 0.5)."""
    mask = read_label(mask_path)
    liver = mask.with_array((mask.array > 0).astype(np.float32))
    return _resample(liver, reference.affine, reference.shape, order=1, cval=0.0) >= 0.5


# ---------------------------------------------------------------------------------------------
# Acceptance: orientations and formats


def test_masks_on_input_grid_and_agree_across_orientations(real_bundle: Path, small_liver_dataset: Path,
                                                           tmp_path: Path) -> None:
    """Real CT re-saved as RAS, LPS, oblique (20 degrees about z) and anisotropic: every mask has
    its input's shape and affine, and the four agree (Dice >= 0.98 on a common grid)."""
    # Real CT around a liver (ircadb07, LPS), on a 1.5 mm grid: finer than the model's 3 mm so the
    # comparison is not dominated by voxelisation, light enough for seconds per variant.
    source = read_ct(small_liver_dataset / "imagesTr" / "ircadb07.nii.gz")
    lps = np.diag([-1.0, -1.0, 1.0])
    base_affine, base_shape = _grid_around(source, lps, (1.5, 1.5, 1.5))
    base = Volume(_resample(source, base_affine, base_shape, 1, -1024.0), base_affine)
    flip_xy = np.array([[-1, 0, 0, base.shape[0] - 1], [0, -1, 0, base.shape[1] - 1], [0, 0, 1, 0],
                        [0, 0, 0, 1.0]])
    ras = Volume(np.ascontiguousarray(base.array[::-1, ::-1]), base.affine @ flip_xy)
    oblique_affine, oblique_shape = _grid_around(base, _rotation_z(20.0)[:3, :3] @ lps, (1.5, 1.5, 1.5))
    aniso_affine, aniso_shape = _grid_around(base, lps, (1.1, 1.3, 2.6))
    variants = {
        "lps": base,
        "ras": ras,
        "oblique": Volume(_resample(base, oblique_affine, oblique_shape, 1, -1024.0), oblique_affine),
        "aniso": Volume(_resample(base, aniso_affine, aniso_shape, 1, -1024.0), aniso_affine),
    }
    assert base.axcodes == "LPS" and ras.axcodes == "RAS"
    inputs = [save_volume(Volume(np.rint(v.array).astype(np.int16), v.affine),
                          tmp_path / "in" / f"{name}.nii.gz") for name, v in variants.items()]
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", *map(str, inputs), "-o", str(out), "--model", str(real_bundle),
                                 "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    livers = {}
    for name, path in zip(variants, inputs, strict=True):
        written = nib.load(out / f"{name}.nii.gz")
        given = nib.load(path)
        assert written.shape == given.shape, name
        np.testing.assert_allclose(written.affine, given.affine, atol=1e-5, err_msg=name)
        assert written.get_data_dtype() == np.uint8
        livers[name] = _liver_on(out / f"{name}.nii.gz", base)
    assert livers["lps"].sum() * 1.5**3 / 1000 > 300, "the model found no liver-sized object"
    dice = {name: round(_dice(livers["lps"], livers[name]), 4) for name in ("ras", "oblique", "aniso")}
    assert min(dice.values()) >= AGREEMENT, dice


def test_oblique_scan_mask_agrees_with_the_upright_scan(real_bundle: Path) -> None:
    """A real CT resampled onto a grid tilted 20 degrees about the body axis (anatomy upright in the
    world): its mask, brought back onto the upright grid by nearest neighbour, agrees with the
    upright scan's mask. The bound beside it is what the expert label keeps of that round trip."""
    ct = read_ct(shared_file("liver/imagesTr/ircadb01.nii.gz"))
    label = read_label(shared_file("liver/labelsTr/ircadb01.nii.gz"))
    # The liver and 2 cm around it, every second voxel in-plane (1.14 x 1.14 x 1.6 mm): a real
    # upright (LPS) scan, light enough for a few seconds per prediction.
    where = np.argwhere(label.array > 0)
    margin = np.array([36, 36, 12])
    low = np.maximum(where.min(0) - margin, 0)
    high = np.minimum(where.max(0) + margin, ct.shape)
    crop = tuple(slice(int(a), int(b), step) for a, b, step in zip(low, high, (2, 2, 1), strict=True))
    index = np.diag([2.0, 2.0, 1.0, 1.0])
    index[:3, 3] = low
    upright = Volume(ct.array[crop].copy(), ct.affine @ index)
    reference = Volume((label.array[crop] > 0).astype(np.float32), upright.affine)
    axes = np.asarray(upright.affine)[:3, :3] / np.asarray(upright.spacing)
    tilted_affine, tilted_shape = _grid_around(upright, _rotation_z(20.0)[:3, :3] @ axes, upright.spacing)
    tilted = Volume(_resample(upright, tilted_affine, tilted_shape, 1, -1024.0), tilted_affine)

    bundle = load_bundle(real_bundle)
    mask_upright = predict_volume(upright, bundle).labels > 0
    mask_tilted = predict_volume(tilted, bundle).labels
    assert mask_tilted.shape == tilted.shape
    back = _resample(tilted.with_array(mask_tilted.astype(np.float32)), upright.affine, upright.shape,
                     0, 0.0) > 0
    label_tilted = tilted.with_array(_resample(reference, tilted_affine, tilted_shape, 0, 0.0))
    bound = _dice(reference.array > 0, _resample(label_tilted, upright.affine, upright.shape, 0, 0.0) > 0)
    agreement = _dice(mask_upright, back)
    assert mask_upright.sum() * np.prod(upright.spacing) / 1000 > 1000, "no liver-sized object found"
    assert agreement >= 0.97, f"oblique vs upright Dice {agreement:.4f} (round-trip bound {bound:.4f})"
    print(f"oblique vs upright liver Dice {agreement:.4f}; the label's round trip keeps {bound:.4f}")


def test_dicom_series_and_nifti_give_the_same_mask(real_bundle: Path, tmp_path: Path) -> None:
    series = shared_file("dicom/tsexample_series")
    volume = read_ct(series)
    nifti = save_volume(volume, tmp_path / "as_nifti.nii.gz")
    bundle = load_bundle(real_bundle)
    from_dicom = predict_volume(volume, bundle)
    from_nifti = predict_volume(read_ct(nifti), bundle)
    assert (from_dicom.labels > 0).sum() > 1000, "no liver found in the series"
    assert _dice(from_dicom.labels > 0, from_nifti.labels > 0) >= 0.999
    # The written mask carries the series' own geometry.
    out = tmp_path / "mask.nii.gz"
    result = runner.invoke(app, ["infer", str(series), "-o", str(out), "--model", str(real_bundle), "-q"])
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj), from_dicom.labels)


def test_plan_decision_rule_reaches_the_native_grid(real_bundle: Path) -> None:
    """Argmax, or the nested-class rule (label > 0 exactly where P(background) < 0.5), as the
    plan says, on both resampling paths; the nested foreground contains the argmax one."""
    volume = read_ct(shared_file("dicom/tsexample_series"))
    bundle = load_bundle(real_bundle)
    masks = {}
    for nested in (False, True):
        bundle.plan.infer.nested_classes = nested
        with_probs = predict_volume(volume, bundle, postprocess=False, keep_probabilities=True)
        probs = with_probs.probabilities
        assert probs is not None
        if nested:
            np.testing.assert_array_equal(with_probs.labels > 0, probs[0] < 0.5)
        else:
            np.testing.assert_array_equal(with_probs.labels, probs.argmax(0))
        labels_only = predict_volume(volume, bundle, postprocess=False).labels
        np.testing.assert_array_equal(labels_only, with_probs.labels)
        masks[nested] = labels_only > 0
    assert masks[False].sum() > 1000
    assert not np.any(masks[False] & ~masks[True])


def test_bfloat16_agrees_with_float32_and_auto_uses_it_only_where_native(
        real_bundle: Path, small_liver_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 arithmetic (infer.precision) is a speed choice: the masks must not change."""
    import torch

    from liverseg.infer import resolve_precision

    volume = read_ct(next((small_liver_dataset / "imagesTr").glob("*.nii.gz")))
    bundle = load_bundle(real_bundle)
    runs = {p: predict_volume(volume, bundle, precision=p) for p in ("float32", "bfloat16")}
    assert {p: r.precision for p, r in runs.items()} == {"float32": "float32", "bfloat16": "bfloat16"}
    full, low = (runs[p].labels > 0 for p in ("float32", "bfloat16"))
    assert full.sum() > 10_000
    assert 2 * (full & low).sum() / (full.sum() + low.sum()) >= 0.995
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == "float32"  # emulated bfloat16 would be slower
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    assert resolve_precision("float32", "cpu") == "float32"


# ---------------------------------------------------------------------------------------------
# Outputs, batch behaviour


def test_single_output_file_sidecar_preview_probabilities(tiny_bundle: Path, small_ct: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "result" / "liver.nii.gz"
    result = runner.invoke(app, ["infer", str(small_ct), "-o", str(out), "--model", str(tiny_bundle),
                                 "--preview", "--save-probabilities", "--tta", "--overlap", "0.5",
                                 "--precision", "float32"])
    assert result.exit_code == 0, result.output
    image = nib.load(small_ct)
    mask = nib.load(out)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    sidecar = json.loads((tmp_path / "result" / "liver.json").read_text())
    labels = np.asarray(mask.dataobj)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
    assert sidecar["liver_volume_ml"] == pytest.approx((labels > 0).sum() * voxel_ml, rel=1e-4)
    assert sidecar["tumour_volume_ml"] == pytest.approx((labels == 2).sum() * voxel_ml, rel=1e-4)
    if (labels == 1).any():
        hu = image.get_fdata()[labels == 1].mean()
        assert sidecar["mean_liver_hu"] == pytest.approx(hu, abs=0.01)
    assert sidecar["model_id"] == "tiny" and sidecar["model_version"] == "0"
    assert sidecar["precision"] == "float32"
    assert set(sidecar["qc"]) == {"flags", "measures"}
    assert sidecar["qc"]["measures"]["liver_volume_ml"] == sidecar["liver_volume_ml"]
    assert "QC" in result.output  # the summary line says what QC found
    assert {"read", "preprocess", "predict", "resample", "postprocess", "write"} <= set(sidecar["seconds"])
    png = tmp_path / "result" / "liver.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    probs = nib.load(tmp_path / "result" / "liver_probabilities.nii.gz")
    assert probs.shape == (*image.shape, 3) and np.allclose(probs.affine, image.affine)
    total = probs.get_fdata(dtype=np.float32).sum(axis=-1)
    assert np.abs(total - 1.0).max() < 0.02  # 8-bit quantised softmax


def _copy_ct(source: Path, target: Path, crop: int) -> Path:
    """A real CT cropped a little differently per case (so cases differ), as NIfTI."""
    volume = read_ct(source)
    return save_volume(Volume(volume.array[crop:, :, crop:].copy(), volume.affine @ np.array(
        [[1, 0, 0, crop], [0, 1, 0, 0], [0, 0, 1, crop], [0, 0, 0, 1.0]])), target)


def test_batch_resumes_shards_and_survives_a_bad_case(tiny_bundle: Path, small_ct: Path,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    for i, name in enumerate(["a", "b", "c"]):
        _copy_ct(small_ct, folder / f"{name}.nii.gz", crop=4 * i)
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    out = tmp_path / "out"
    args = ["infer", str(folder), "-o", str(out), "--model", str(tiny_bundle), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 2
    report = json.loads(first.stdout)
    assert (report["done"], report["skipped"], report["failed"]) == (3, 0, 1)
    failed = [c for c in report["cases"] if c["status"] == "failed"]
    assert failed[0]["case"] == "broken" and "broken.nii.gz" in failed[0]["error"]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz",
                                                     "c.json", "c.nii.gz"]
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    second = json.loads(runner.invoke(app, args).stdout)
    assert (second["done"], second["skipped"], second["failed"]) == (0, 3, 1)
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp  # finished cases are not redone
    forced = json.loads(runner.invoke(app, [*args, "--force"]).stdout)
    assert forced["done"] == 3 and (out / "a.nii.gz").stat().st_mtime_ns != stamp
    # Shards partition the cases (sorted by name, every N-th from I).
    seen = []
    for index in range(2):
        shard = json.loads(runner.invoke(app, [*args, "--shard", f"{index}/2"]).stdout)
        seen.append({c["case"] for c in shard["cases"]})
    assert seen[0] | seen[1] == {"a", "b", "c", "broken"} and not seen[0] & seen[1]
    bad_shard = runner.invoke(app, [*args, "--shard", "2/2"])
    assert bad_shard.exit_code == 2 and "--shard" in bad_shard.stderr


def test_read_ahead_gives_each_case_its_own_volume_and_error(small_ct: Path, tmp_path: Path) -> None:
    """The batch reads the next CT in the background: each case still gets its own volume, a bad
    file's error comes out when its case is taken, and a case taken out of order is read then."""
    from liverseg.batch import ReadAhead
    from liverseg.errors import LiversegError
    from liverseg.jobs import CaseJob

    paths = [_copy_ct(small_ct, tmp_path / f"{name}.nii.gz", crop=4 * i) for i, name in enumerate("abc")]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 not a gzip stream")
    jobs = [CaseJob(p.name, p, tmp_path / "out" / p.name) for p in [paths[0], broken, *paths[1:]]]
    with ReadAhead(jobs) as reader:
        first, _, seconds = reader.take(jobs[0])
        assert first.shape == read_ct(paths[0]).shape and seconds > 0
        reader.start_next()  # what the batch does once the network is done with a case
        reader.start_next()  # once only
        with pytest.raises(LiversegError, match=r"broken\.nii\.gz"):
            reader.take(jobs[1])
        reader.start_next()
        last, _, _ = reader.take(jobs[3])  # jobs[2] was read ahead; jobs[3] is read when asked
        np.testing.assert_array_equal(last.array, read_ct(paths[2]).array)
        again, _, _ = reader.take(jobs[2])
        np.testing.assert_array_equal(again.array, read_ct(paths[1]).array)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, no output


def _two_d(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((64, 64), dtype=np.int16) - 1000, np.eye(4)), str(path))
    return path


def _mr_like(source: Path, path: Path) -> Path:
    """Real anatomy with an MR-like, non-negative intensity range (0 .. ~1500)."""
    volume = read_ct(source)
    array = np.clip(volume.array + 1024.0, 0, None) * 0.6
    return save_volume(Volume(array.astype(np.float32), volume.affine), path)


@pytest.mark.parametrize("kind", ["unreadable", "2d", "mr_like", "missing_model"])
def test_bad_input_gives_one_line_error_and_no_output(kind: str, tiny_bundle: Path, small_ct: Path,
                                                      tmp_path: Path) -> None:
    model = tiny_bundle
    source = small_ct
    expected = {"unreadable": "cannot read", "2d": "2D", "mr_like": "does not look like CT",
                "missing_model": "model bundle not found"}[kind]
    if kind == "unreadable":
        source = tmp_path / "ct.nii.gz"
        source.write_bytes(b"not an image at all")
    elif kind == "2d":
        source = _two_d(tmp_path / "slice.nii.gz")
    elif kind == "mr_like":
        source = _mr_like(small_ct, tmp_path / "mr.nii.gz")
    else:
        model = tmp_path / "no_such_bundle"
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(source), "-o", str(out), "--model", str(model)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_tta_flips_only_axes_the_model_was_trained_mirrored_on(tiny_bundle: Path, small_ct: Path,
                                                               tmp_path: Path) -> None:
    from liverseg.infer import _flips

    bundle = load_bundle(tiny_bundle)
    bundle.plan.train.flip_axes = [0]
    assert _flips(True, bundle) == [(), (2,)]  # (batch, channel) come first in the tensor
    assert _flips(False, bundle) == [()]
    plan = json.loads((tiny_bundle / "plan.json").read_text())
    plan["train"]["flip_axes"] = []
    unmirrored = tmp_path / "unmirrored"
    unmirrored.mkdir()
    (unmirrored / "plan.json").write_text(json.dumps(plan))
    (unmirrored / "model.pt").write_bytes((tiny_bundle / "model.pt").read_bytes())
    out = tmp_path / "mask.nii.gz"
    result = runner.invoke(app, ["infer", str(small_ct), "-o", str(out), "--model", str(unmirrored), "--tta"])
    assert result.exit_code == 2
    assert "without mirroring" in result.stderr and "\n" not in result.stderr.strip()
    assert not out.exists()


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """model.pt is a function of the weights (the card's benchmark check compares its hash)."""
    import torch

    cfg = Config(model=ModelConfig(filters=[8, 16, 32, 64], kernel_size=[3, 3, 3, 3],
                                   strides=[1, 2, 2, 2], deep_supr_num=1))
    state = build_network(cfg.model).state_dict()
    first = save_bundle(tmp_path / "a", cfg, state) / "model.pt"
    second = save_bundle(tmp_path / "b", cfg, state) / "model.pt"
    assert first.read_bytes() == second.read_bytes()
    loaded = load_bundle(tmp_path / "a").network.state_dict()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state
               if state[k].is_floating_point())


def test_weights_trained_on_another_device_are_saved_under_their_own_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: on a GPU each tensor's copy to the CPU is a fresh, short-lived allocation, so
    its address is reused by the next copy; aliases must be found on the source tensors, or one
    weight is saved under another's name (GPU-trained bundles then failed to load)."""
    import torch

    cfg = Config(model=ModelConfig(filters=[8, 16, 32, 64], kernel_size=[3, 3, 3, 3],
                                   strides=[1, 2, 2, 2], deep_supr_num=1))
    state = build_network(cfg.model).state_dict()
    original_to = torch.Tensor.to

    def copying_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        # what .to("cpu") does to a CUDA tensor: a new tensor, never the source's storage
        return original_to(self, *args, **kwargs).clone()

    monkeypatch.setattr(torch.Tensor, "to", copying_to)
    save_bundle(tmp_path / "gpu", cfg, state)
    monkeypatch.undo()
    loaded = load_bundle(tmp_path / "gpu").network.state_dict()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state
               if state[k].is_floating_point())
