"""`liverseg score`: real labels against their erosion, reports, case matching and bad input."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import LIVER_DATASET, liver_case_ids, shared_file
from scipy import ndimage
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.io import Volume, read_label, save_volume, write_mask
from liverseg.report import SUMMARY_SCHEMA

CASES = tuple(liver_case_ids())
SCIPY_CHECKED = ("ircadb01", "tsexample")  # SciPy's dense EDT is slow; these cover both classes
runner = CliRunner()


def _eroded(labels: np.ndarray) -> np.ndarray:
    """The label map with its foreground eroded by one voxel (6-connected)."""
    out = labels.copy()
    out[~ndimage.binary_erosion(labels > 0)] = 0
    return out


@pytest.fixture(scope="module")
def eroded_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Eroded real labels as predictions, scored once against the dataset with a full report."""
    root = tmp_path_factory.mktemp("score")
    preds = root / "pred"
    for case in CASES:
        ref = read_label(shared_file(f"liver/labelsTr/{case}.nii.gz"))
        write_mask(_eroded(ref.array), ref, preds / f"{case}.nii.gz")
    report = root / "report"
    result = runner.invoke(app, ["score", str(preds), str(LIVER_DATASET), "-o", str(report),
                                 "--json", "--worst", "1"])
    return {"preds": preds, "report": report, "result": result}


def _scipy_surface(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """HD95 and ASSD (mm) from SciPy's Euclidean distance transform: an independent reference."""
    both = pred | ref
    lo = [max(int(np.flatnonzero(both.any(axis=tuple(j for j in range(3) if j != i)))[0]) - 1, 0)
          for i in range(3)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(j for j in range(3) if j != i)))[-1]) + 2
          for i in range(3)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    p, r = pred[box], ref[box]
    edge_p = p & ~ndimage.binary_erosion(p)
    edge_r = r & ~ndimage.binary_erosion(r)
    d_pr = ndimage.distance_transform_edt(~edge_r, sampling=spacing)[edge_p]
    d_rp = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_r]
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    return float(hd95), float(np.concatenate([d_pr, d_rp]).mean())


def test_eroded_real_labels_agree_with_numpy_dice_and_scipy_surface_distances(eroded_run: dict) -> None:
    assert eroded_run["result"].exit_code == 0, eroded_run["result"].output
    summary = json.loads((eroded_run["report"] / "summary.json").read_text())
    per_case = {c["case"]: c for c in summary["metric_per_case"]}
    assert sorted(per_case) == list(CASES)
    assert set(summary["classes"]) == {"liver", "tumour"}
    for case in CASES:
        ref = read_label(shared_file(f"liver/labelsTr/{case}.nii.gz"))
        pred = read_label(eroded_run["preds"] / f"{case}.nii.gz").array
        for cls, select in (("liver", lambda a: a > 0), ("tumour", lambda a: a == 2)):
            got = per_case[case]["metrics"][cls]
            p, r = select(pred), select(ref.array)
            if not r.any() and not p.any():  # tsexample has no tumour: both empty
                assert got["dice"] == 1.0 and got["hd95_mm"] == 0.0
                continue
            dice = 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())
            assert got["dice"] == pytest.approx(dice, abs=1e-6)
            assert got["tp"] == int(np.logical_and(p, r).sum())
            if case not in SCIPY_CHECKED:
                continue
            hd95, assd = _scipy_surface(p, r, ref.spacing)
            assert got["hd95_mm"] == pytest.approx(hd95, abs=0.1)
            assert got["assd_mm"] == pytest.approx(assd, abs=0.1)
            assert 0 < got["assd_mm"] < 2 * max(ref.spacing)  # one-voxel erosion: about a voxel


def test_json_output_is_the_aggregate_of_summary_json(eroded_run: dict) -> None:
    stdout = eroded_run["result"].stdout
    printed = json.loads(stdout)
    summary = json.loads((eroded_run["report"] / "summary.json").read_text())
    assert printed == summary["aggregate"]
    assert printed["n_scored"] == len(CASES) and printed["n_failed"] == 0
    liver = printed["classes"]["liver"]
    dices = [c["metrics"]["liver"]["dice"] for c in summary["metric_per_case"]]
    assert liver["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert liver["dice"]["min"] == pytest.approx(min(dices))
    assert liver["dice"]["median"] == pytest.approx(np.median(dices))
    tp, fp, fn = (sum(c["metrics"]["liver"][k] for c in summary["metric_per_case"])
                  for k in ("tp", "fp", "fn"))
    assert liver["global_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_report_html_embeds_its_images_and_lists_every_case(eroded_run: dict) -> None:
    report = eroded_run["report"]
    html = (report / "report.html").read_text()
    sources = re.findall(r"<img[^>]*\ssrc='([^']*)'", html)
    assert len(sources) >= 6 + 2  # six box plots + worst liver and tumour pictures
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for case in CASES:
        assert f"<td class='l'>{case}</td>" in html
    assert "Worst cases" in html
    rows = list(csv.DictReader((report / "cases.csv").open()))
    assert {(r["case"], r["class"]) for r in rows} == {(c, k) for c in CASES for k in ("liver", "tumour")}


def test_summary_json_validates_against_the_documented_structure(eroded_run: dict) -> None:
    summary = json.loads((eroded_run["report"] / "summary.json").read_text())
    jsonschema.validate(summary, SUMMARY_SCHEMA)
    broken = dict(summary)
    del broken["aggregate"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SUMMARY_SCHEMA)


@pytest.fixture(scope="module")
def small_case() -> Volume:
    return read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))


def test_bad_inputs_are_reported_per_case_and_the_rest_is_scored(tmp_path: Path,
                                                                  small_case: Volume) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    for name in ("good", "shifted_grid", "corrupt", "lonely"):
        write_mask(small_case.array, small_case, refs / f"{name}.nii.gz")
    write_mask(_eroded(small_case.array), small_case, preds / "good_0000.nii.gz")  # nnU-Net name
    cropped = Volume(small_case.array[:, :, 10:], small_case.affine.copy())
    cropped.affine[:3, 3] += small_case.affine[:3, 2] * 10  # same world position, other grid
    save_volume(cropped, preds / "shifted_grid.nii.gz")
    (preds / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_mask(small_case.array, small_case, preds / "orphan.nii.gz")

    result = runner.invoke(app, ["score", str(preds), str(refs), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    err = result.stderr
    assert "shifted_grid" in err and str(preds / "shifted_grid.nii.gz") in err
    assert str(refs / "shifted_grid.nii.gz") in err and "different grids" in err
    assert "corrupt.nii.gz" in err and "missing prediction" in err and "lonely" in err
    assert "missing reference" in err and "orphan" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["good"]
    assert 0.5 < summary["metric_per_case"][0]["metrics"]["liver"]["dice"] < 1.0
    assert sorted(f["case"] for f in summary["failures"]) == ["corrupt", "lonely", "orphan",
                                                               "shifted_grid"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert all(name in html for name in ("good", "corrupt", "lonely", "orphan", "shifted_grid"))

    # --resample-to-ref scores the other-grid case: identical anatomy except the cut-off slices.
    result = runner.invoke(app, ["score", str(preds / "shifted_grid.nii.gz"),
                                 str(refs / "shifted_grid.nii.gz"), "--resample-to-ref", "--json"])
    assert result.exit_code == 0, result.output
    liver = json.loads(result.stdout)["classes"]["liver"]
    removed = int((small_case.array[:, :, :10] > 0).sum())
    assert liver["fn"] == removed and liver["fp"] == 0


def test_lits_names_are_matched_and_single_files_work(tmp_path: Path, small_case: Volume) -> None:
    lits, preds = tmp_path / "lits", tmp_path / "preds"
    write_mask(small_case.array, small_case, lits / "segmentation-3.nii")
    save_volume(Volume(np.zeros(small_case.shape, np.int16), small_case.affine), lits / "volume-3.nii")
    write_mask(small_case.array, small_case, preds / "prediction-3.nii.gz")
    result = runner.invoke(app, ["score", str(preds), str(lits), "--json"])
    assert result.exit_code == 0, result.output
    agg = json.loads(result.stdout)
    assert agg["n_scored"] == 1 and agg["classes"]["liver"]["dice"]["mean"] == 1.0

    result = runner.invoke(app, ["score", str(preds / "prediction-3.nii.gz"),
                                 str(lits / "segmentation-3.nii")])
    assert result.exit_code == 0 and "1 of 1 cases scored" in result.stderr
    result = runner.invoke(app, ["score", str(preds), str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.output
