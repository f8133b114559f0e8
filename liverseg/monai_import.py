"""MONAI for the ``liverseg infer`` command, without the optional packages inference never uses.

MONAI's package ``__init__`` imports every submodule, and they import optional third-party
packages eagerly through ``optional_import``: matplotlib's pyplot (plots), scipy.signal and
scipy.stats (ultrasound confidence maps), scikit-image, requests (dataset downloads) and
jsonschema (bundle validation). That is about 0.6 s of a 3.8 s ``liverseg infer`` on 2 cores, for
features inference does not touch. MONAI is made to work without them (they are optional; a
minimal install lacks them), so the infer command imports MONAI as such an install would: while
MONAI is imported, those packages are marked absent (``sys.modules[name] = None``, Python's own
way to make an import fail) and MONAI records them as unavailable; afterwards they can be
imported again (liverseg's pictures use matplotlib).

Only the command does this, and only in a process that has not imported MONAI yet: code that
imports liverseg as a library gets MONAI exactly as installed. Should a MONAI version need one of
these packages when imported, the import is redone the ordinary way.
"""

from __future__ import annotations

import importlib
import sys

# Optional dependencies of MONAI that its import pulls in and liverseg's inference never needs.
ABSENT_WHILE_IMPORTING = ("matplotlib", "scipy.signal", "scipy.stats", "skimage", "requests", "jsonschema")
# What inference uses of MONAI: the window engine and the network classes.
INFERENCE_MODULES = ("monai.inferers", "monai.networks.nets")


def import_monai_for_inference() -> bool:
    """Import MONAI's inference modules with the optional extras marked absent; False (and
    nothing done) when MONAI is imported already."""
    if "monai" in sys.modules:
        return False
    hidden = [name for name in ABSENT_WHILE_IMPORTING if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for module in INFERENCE_MODULES:
            importlib.import_module(module)
        lean = True
    except ImportError:  # a MONAI that needs one of them after all: forget the partial import
        for name in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
            del sys.modules[name]
        lean = False
    finally:
        _unhide(hidden)
    if not lean:  # ... and import it as installed
        for module in INFERENCE_MODULES:
            importlib.import_module(module)
    return lean


def _unhide(names: list[str]) -> None:
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
