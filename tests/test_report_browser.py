"""The scoring report, opened in a real browser (headless Chromium): no console errors, every
picture loaded, the tables there. In CI a missing browser is a failure (see .ci/run)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from scipy import ndimage
from typer.testing import CliRunner

from liverseg import qc
from liverseg.browser import check_page, find_browser
from liverseg.cli import app
from liverseg.infer import volume_stats
from liverseg.io import read_ct, read_label, write_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def score_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`liverseg score` of a real label's erosion (with a tumour painted in, so both classes and
    their worst-case pictures appear), beside the sidecar `liverseg infer` would have written."""
    root = tmp_path_factory.mktemp("browser")
    ct = read_ct(shared_file("liver/imagesTr/tsexample.nii.gz"))
    ref = read_label(shared_file("liver/labelsTr/tsexample.nii.gz"))
    pred = ref.array.copy()
    in_plane = np.ones((3, 3, 1), dtype=bool)  # eroded within each slice: it still reaches the dome
    pred[~ndimage.binary_erosion(pred > 0, structure=in_plane)] = 0
    centre = np.argwhere(pred > 0).mean(axis=0).astype(int)
    pred[tuple(slice(c - 3, c + 3) for c in centre)] = 2
    write_mask(pred, ref, root / "pred" / "tsexample.nii.gz")
    sidecar = {"qc": qc.assess(ct, pred, {}, volume_stats(ct, pred))}
    (root / "pred" / "tsexample.json").write_text(json.dumps(sidecar))
    out = root / "report"
    result = runner.invoke(app, ["score", str(root / "pred" / "tsexample.nii.gz"),
                                 str(shared_file("liver/labelsTr/tsexample.nii.gz")), "-o", str(out),
                                 "--worst", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_score_reads_the_qc_that_infer_recorded(score_report: Path) -> None:
    summary = json.loads((score_report / "summary.json").read_text())
    (case,) = summary["metric_per_case"]
    assert "liver_cut_by_field_of_view" in case["qc"]["flags"]  # tsexample ends at the dome
    assert summary["qc"]["liver_dice_by_flag"][0] == {
        "flag": "any flag", "n_flagged": 1, "dice_flagged": round(case["metrics"]["liver"]["dice"], 4),
        "min_dice_flagged": round(case["metrics"]["liver"]["dice"], 4), "n_clear": 0,
        "dice_clear": None, "min_dice_clear": None}
    assert "liver_cut_by_field_of_view" in (score_report / "cases.csv").read_text()


def test_report_renders_in_headless_chromium(score_report: Path, tmp_path: Path) -> None:
    if find_browser() is None:
        message = "Chromium not installed: apt-get install -y chromium (README, .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    shot = tmp_path / "report.png"
    page = check_page(score_report / "report.html", shot)
    assert page.console_errors == []
    assert len(page.images) >= 6 + 2  # six box plots, the worst liver and tumour pictures
    assert page.broken_images == []
    assert all(image["naturalWidth"] >= 100 for image in page.images)
    # Summary, quality control and cases tables, with rows.
    assert len(page.tables) == 3 and min(page.tables) >= 2
    assert "Quality control" in page.text and "tsexample" in page.text
    # A full-page PNG as wide as the window and taller than one screen.
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width == 1280 and height > 900


def test_a_broken_page_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: a missing picture and a script error are reported."""
    if find_browser() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium not installed: apt-get install -y chromium (README, .ci/run)")
        pytest.skip("Chromium not installed")
    page = tmp_path / "broken.html"
    page.write_text("<html><body><table><tr><td>1</td></tr></table><img src='missing.png'>"
                    "<script>undefinedFunction()</script></body></html>")
    result = check_page(page)
    assert len(result.broken_images) == 1
    assert any("missing.png" in e for e in result.console_errors)
    assert any("undefinedFunction" in e for e in result.console_errors)
