"""`liverseg infer` (not yet available)."""

from __future__ import annotations

from liverseg.cli.common import not_yet


def command() -> None:
    """Not yet available."""
    not_yet("infer")
