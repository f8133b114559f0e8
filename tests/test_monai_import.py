"""liverseg.monai_import: the infer command's MONAI, imported without its unused optional extras.
Each check runs in a fresh interpreter (the test process has imported MONAI long before)."""

from __future__ import annotations

import json
import subprocess
import sys

LEAN_IMPORT = """
import json, sys
from liverseg import monai_import
{setup}
first = monai_import.import_monai_for_inference()
loaded = [m for m in monai_import.ABSENT_WHILE_IMPORTING if m in sys.modules]
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
net = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2]).eval()
with torch.no_grad():
    out = sliding_window_inference(torch.zeros(1, 1, 20, 20, 20), (16, 16, 16), 1, net)
import matplotlib.figure, scipy.stats  # absent only while MONAI was being imported
print(json.dumps({{"first": first, "loaded": loaded, "shape": list(out.shape),
                  "again": monai_import.import_monai_for_inference()}}))
"""


def _run(setup: str = "") -> dict:
    result = subprocess.run([sys.executable, "-c", LEAN_IMPORT.format(setup=setup)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_monai_works_without_the_extras_which_stay_importable() -> None:
    outcome = _run()
    assert outcome["first"] is True and outcome["again"] is False  # once per process
    assert outcome["loaded"] == []  # MONAI's import pulled none of them in
    assert outcome["shape"] == [1, 2, 20, 20, 20]


def test_a_monai_that_needs_an_extra_is_imported_as_installed() -> None:
    # As if a MONAI version imported pyplot unconditionally: the lean import fails, and MONAI is
    # imported again the ordinary way, extras included.
    outcome = _run('monai_import.INFERENCE_MODULES = ("monai.inferers", "matplotlib.pyplot")')
    assert outcome["first"] is False
    assert "matplotlib" in outcome["loaded"]
    assert outcome["shape"] == [1, 2, 20, 20, 20]
