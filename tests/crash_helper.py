"""Run the ``liverseg`` command and SIGKILL it at a chosen moment, the way a crash would stop it.

    python tests/crash_helper.py SPEC -- liverseg-arguments...

SPEC is ``replace:TEXT:N`` (die just before the N-th atomic rename onto a path containing TEXT:
the temporary file is fully written, the target not yet replaced) or ``call:MODULE:NAME:N`` (die
at the N-th call of MODULE.NAME, e.g. an optimiser step). Nothing runs after the kill: no
``finally``, no ``atexit``, exactly as with ``kill -9`` or the OOM killer.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(spec: str) -> None:
    kind, *rest = spec.split(":")
    calls = {"n": 0}
    if kind == "replace":
        text, n = rest[0], int(rest[1])
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if text in os.fspath(dst):
                calls["n"] += 1
                if calls["n"] == n:
                    _die()
            return replace(src, dst, *args, **kwargs)

        os.replace = killing_replace  # type: ignore[assignment]
    elif kind == "call":
        module_name, name, n = rest[0], rest[1], int(rest[2])
        owner = importlib.import_module(module_name)
        path = name.split(".")
        for part in path[:-1]:
            owner = getattr(owner, part)
        original = getattr(owner, path[-1])

        def killing_call(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == n:
                _die()
            return original(*args, **kwargs)

        setattr(owner, path[-1], killing_call)
    else:
        raise SystemExit(f"unknown spec {spec}")


if __name__ == "__main__":
    separator = sys.argv.index("--")
    for spec in sys.argv[1:separator]:
        _arm(spec)
    from liverseg.cli import app

    app(sys.argv[separator + 1:], prog_name="liverseg")
