"""`liverseg evaluate`: inference on every labelled case, scored in one go, with a bad case."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import shared_file
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.io import Volume, read_ct, read_label, save_volume
from liverseg.report import SUMMARY_SCHEMA

runner = CliRunner()


@pytest.fixture(scope="module")
def eval_dataset(small_liver_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MSD layout: the cropped ircadb07 case, tsexample (real, small) and a case whose label is
    corrupt, so the run must go on past it and exit non-zero."""
    root = tmp_path_factory.mktemp("eval_dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    # the trained case, every second voxel (keeps inference and surface metrics quick)
    for sub, reader in (("imagesTr", read_ct), ("labelsTr", read_label)):
        vol = reader(small_liver_dataset / sub / "ircadb07.nii.gz")
        affine = vol.affine.copy()
        affine[:3, :3] *= 2
        save_volume(Volume(np.ascontiguousarray(vol.array[::2, ::2, ::2]), affine),
                    root / sub / "ircadb07.nii.gz")
    save_volume(read_ct(shared_file("liver/imagesTr/tsexample.nii.gz")),
                root / "imagesTr" / "tsexample.nii.gz")
    save_volume(read_label(shared_file("liver/labelsTr/tsexample.nii.gz")),
                root / "labelsTr" / "tsexample.nii.gz")
    shutil.copy(root / "imagesTr" / "tsexample.nii.gz", root / "imagesTr" / "broken.nii.gz")
    (root / "labelsTr" / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    return root


@pytest.fixture(scope="module")
def evaluated(eval_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "report"
    # no --model: the model shipped in the package
    result = runner.invoke(app, ["evaluate", str(eval_dataset), "-o", str(out), "--json", "--worst", "1"])
    return {"out": out, "result": result}


def test_evaluate_scores_every_labelled_case_and_reports_the_bad_one(evaluated: dict,
                                                                     eval_dataset: Path) -> None:
    result, out = evaluated["result"], evaluated["out"]
    assert result.exit_code == 2, result.output  # the corrupt label is a failure
    assert "broken" in result.stderr and "labelsTr/broken.nii.gz" in result.stderr
    agg = json.loads(result.stdout)
    assert (agg["n_cases"], agg["n_scored"], agg["n_failed"]) == (3, 2, 1)

    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, SUMMARY_SCHEMA)
    assert summary["aggregate"] == agg
    assert summary["settings"]["model"]
    per_case = {c["case"]: c for c in summary["metric_per_case"]}
    assert sorted(per_case) == ["ircadb07", "tsexample"]
    for case, entry in per_case.items():
        liver = entry["metrics"]["liver"]
        assert 0.0 <= liver["dice"] <= 1.0 and 0.0 <= liver["nsd"] <= 1.0
        label = read_label(eval_dataset / "labelsTr" / f"{case}.nii.gz")
        assert liver["tp"] + liver["fn"] == int((label.array > 0).sum())
        # the prediction was kept, on the CT's exact grid
        pred = read_label(out / "predictions" / f"{case}.nii.gz")
        assert pred.shape == label.shape
        assert liver["tp"] + liver["fp"] == int((pred.array > 0).sum())

    # QC per case, and liver Dice per flag state computed from exactly those cases.
    assert all(set(entry["qc"]) == {"flags", "measures"} for entry in per_case.values())
    assert "liver_cut_by_field_of_view" in per_case["tsexample"]["qc"]["flags"]  # cut at the dome
    table = {row["flag"]: row for row in summary["qc"]["liver_dice_by_flag"]}
    for flag, row in table.items():
        flagged = [e["metrics"]["liver"]["dice"] for e in per_case.values()
                   if (e["qc"]["flags"] if flag == "any flag" else flag in e["qc"]["flags"])]
        assert row["n_flagged"] == len(flagged) and row["n_clear"] == 2 - len(flagged)
        if flagged:
            assert row["dice_flagged"] == pytest.approx(np.mean(flagged), abs=1e-4)

    html = (out / "report.html").read_text()
    assert "Quality control" in html and "liver_cut_by_field_of_view" in html
    assert all(name in html for name in ("ircadb07", "tsexample", "broken"))
    assert all(src.startswith("data:image/png;base64,")
               for src in re.findall(r"<img[^>]*\ssrc='([^']*)'", html))
    assert (out / "cases.csv").read_text().count("\n") >= 3


def test_evaluate_needs_labels(tmp_path: Path) -> None:
    save_volume(read_ct(shared_file("liver/imagesTr/tsexample.nii.gz")), tmp_path / "ct.nii.gz")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no labels" in result.stderr and "Traceback" not in result.output
