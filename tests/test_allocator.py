"""``liverseg train`` moves itself to tcmalloc where it is installed (liverseg/allocator.py): the
command it reruns, when it does not, and a real run's card saying which allocator trained it."""

from __future__ import annotations

import csv
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
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no warnings on big batches


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


def _train(cache: Path, run: Path, env_extra: dict[str, str]) -> tuple[str, list[str]]:
    """``python -m liverseg train`` on the tiny network: the card's allocator and the logged losses."""
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", allocator.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    overrides = [arg for item in TINY for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "liverseg", "train", str(cache), "-o", str(run), "--config", str(CPU_SMALL),
           *overrides, "--quiet"]
    result = subprocess.run(cmd, env={**env, **env_extra}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((run / "model_card.json").read_text())
    with (run / "log.csv").open(newline="") as f:
        assert card["machine"]["precision"] == "float32"  # cpu_small trains without bf16 autocast
        return card["machine"]["allocator"], [row["loss"] for row in csv.DictReader(f)]


def test_train_records_its_allocator_and_trains_the_same(small_liver_cache: Path, tmp_path: Path) -> None:
    """End to end through the entry point: where this machine has tcmalloc (the README's apt line
    installs it) the run trains under it and its card says so; the losses are those of glibc's
    malloc to the last digit (an allocator changes speed, not arithmetic)."""
    default = _train(small_liver_cache, tmp_path / "default", {})
    system = _train(small_liver_cache, tmp_path / "system", {allocator.OPT_OUT: "system"})
    assert default[0] == ("tcmalloc" if allocator.find_tcmalloc() else "system")
    assert system[0] == "system"
    assert len(set(system[1])) > 1 and default[1] == system[1]
