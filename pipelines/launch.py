"""Training runs side by side, for the recipes in this folder: each run is one ``liverseg train``
process with its own log; the CPU's cores are split evenly between them (threads in one process
scale worse than processes), on a GPU they share the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_side_by_side(commands: dict[str, list[str]], logs: dict[str, Path]) -> list[str]:
    """Start every ``commands[name]`` (appending its output to ``logs[name]``), wait for all, and
    return the names of the runs that failed."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(commands))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    procs = {}
    for name, cmd in commands.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        log = logs[name].open("a")
        print(" ".join(cmd), flush=True)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    return failed


def exit_if_failed(failed: list[str], logs: str) -> None:
    if failed:
        sys.exit(f"training failed for {failed}; see {logs}")
