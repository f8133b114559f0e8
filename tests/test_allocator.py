"""``liverseg train`` moves itself to tcmalloc where it is installed (liverseg/allocator.py): the
command it reruns, when it does not, and a real run's card saying which allocator trained it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_options import CPU_SMALL, TINY

from liverseg import allocator

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "libtcmalloc_minimal.so.4"


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: LIBRARY)
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")


def test_train_reruns_itself_with_tcmalloc_preloaded(installed: None) -> None:
    argv = ["/usr/bin/liverseg", "train", "cache", "-o", "run", "--resume"]
    planned = allocator.preload_command(argv)
    assert planned is not None
    command, env = planned
    assert command == [sys.executable, "-m", "liverseg", "train", "cache", "-o", "run", "--resume"]
    assert env["LD_PRELOAD"] == f"{LIBRARY} libother.so"  # what was preloaded stays


@pytest.mark.parametrize("argv, env", [
    (["liverseg", "infer", "ct.nii.gz"], {}),  # inference allocates little: not worth a second start
    (["liverseg"], {}),
    (["liverseg", "train", "cache"], {allocator.OPT_OUT: "system"}),
    (["liverseg", "train", "cache"], {"LD_PRELOAD": LIBRARY}),  # already under tcmalloc: no loop
])
def test_no_rerun(installed: None, monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert allocator.preload_command(argv) is None


def test_no_rerun_without_tcmalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocator.preload_command(["liverseg", "train", "cache"]) is None


def test_train_command_records_its_allocator(small_liver_cache: Path, tmp_path: Path) -> None:
    """End to end through the console entry point: where this machine has tcmalloc (the README's
    apt line installs it) the run trains under it, and its card says so."""
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", allocator.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    overrides = [arg for item in TINY for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "liverseg", "train", str(small_liver_cache), "-o", str(tmp_path / "run"),
           "--config", str(CPU_SMALL), *overrides, "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    expected = "tcmalloc" if allocator.find_tcmalloc() else "system"
    assert card["machine"]["allocator"] == expected
