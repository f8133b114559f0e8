"""Training on the CPU with tcmalloc instead of glibc's malloc, where the machine has it.

A training step allocates and frees tensors of tens of megabytes. glibc's malloc gives blocks that
large straight back to the kernel and maps fresh zeroed pages for the next step, so a training run
on the CPU spent 15-40% of its time in the kernel (sys). tcmalloc keeps them for reuse: measured
in ``pipelines/bench_train.py`` (the ``@tcmalloc`` sides, results in
``pipelines/results/bench_train_tcmalloc.json``). jemalloc, tried the same way, was slower here.

An allocator can only be chosen before the process starts, so ``liverseg train`` re-executes
itself once with tcmalloc in ``LD_PRELOAD`` (as PyTorch's own CPU launcher,
``torch.backends.xeon.run_cpu``, does). Nothing changes where tcmalloc is not installed (Debian/
Ubuntu: ``apt-get install libtcmalloc-minimal4``), or with ``LIVERSEG_ALLOCATOR=system``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Sequence

OPT_OUT = "LIVERSEG_ALLOCATOR"  # "system": keep glibc's malloc
_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc() -> str | None:
    """The file name of an installed tcmalloc the dynamic linker can load, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for name in _LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_in_use() -> str:
    """"tcmalloc" when this process runs with tcmalloc preloaded, else "system"."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def preload_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment that rerun ``argv`` (a ``liverseg`` command line, program name
    first) with tcmalloc preloaded; None when it should run as it is: not ``train``, opted out,
    tcmalloc already loaded, or not installed."""
    if list(argv[1:2]) != ["train"] or os.environ.get(OPT_OUT) == "system" or allocator_in_use() != "system":
        return None
    library = find_tcmalloc()
    if library is None:
        return None
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD", "")]))
    env = {**os.environ, "LD_PRELOAD": preload}
    # tcmalloc reports every allocation over 1 GB on stderr (a large 3D batch makes some): not news.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return [sys.executable, "-m", "liverseg", *argv[1:]], env


def reexec_with_tcmalloc(argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` under tcmalloc where :func:`preload_command` says so (the
    same process id, so ``torchrun`` and job schedulers see nothing); otherwise return."""
    planned = preload_command(argv)
    if planned is not None:
        command, env = planned
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command[0], command, env)
