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


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI has 2 cores: keep torch from oversubscribing them when tests spawn subprocesses.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
