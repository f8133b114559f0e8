"""Speed and peak memory of the imported Tang et al. 2020 model in liverseg, against the package's own.

    OMP_NUM_THREADS=2 python pipelines/bench_tang2020.py --original "PY run_reference.py {input} {output}"

Each side runs as its own process, end to end (start-up, reading, writing included), interleaved case by
case and repeated (best of ``--repeats``), on the 512 x 512 CTs of ../shared/data/liver. The original
is ``pyliverlesionseg`` 0.3's own code under ``tensorflow-cpu==2.15.1`` in a throwaway environment
outside this project (docs/tang2020.md); ``--original`` is the command that runs it on one CT, with
``{input}`` and ``{output}`` placeholders. Peak memory is the process's maximum resident set size.
Results: pipelines/results/bench_tang2020.json (read by the bundle's card).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "liver"
OUT = REPO / "pipelines" / "results" / "bench_tang2020.json"
CASES = ("ircadb01", "ircadb07", "chaos01", "chaos03")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one process, from wait4's resource usage."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return seconds, usage.ru_maxrss / 1024**2  # ru_maxrss is in kB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--original", required=True, help="command running the original on {input} -> {output}"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            image = DATA / "imagesTr" / f"{case}.nii.gz"
            ours_cmd = [
                sys.executable,
                "-m",
                "liverseg",
                "infer",
                str(image),
                "--model",
                "liver_tang2020",
                "-o",
                f"{tmp}/{case}_ours.nii.gz",
                "--force",
                "--quiet",
            ]
            theirs_cmd = shlex.split(args.original.format(input=image, output=f"{tmp}/{case}_theirs.nii.gz"))
            ours, theirs = [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                ours.append(timed(ours_cmd, env))
                theirs.append(timed(theirs_cmd, env))
            (o_s, _o_gb), (t_s, _t_gb) = min(ours), min(theirs)
            rows[case] = {
                "liverseg_seconds": round(o_s, 1),
                "liverseg_peak_gb": round(max(g for _, g in ours), 2),
                "original_seconds": round(t_s, 1),
                "original_peak_gb": round(max(g for _, g in theirs), 2),
                "speedup": round(t_s / o_s, 2),
            }
            print(case, json.dumps(rows[case]), flush=True)
    report = {
        "command": "OMP_NUM_THREADS=2 python pipelines/bench_tang2020.py --original ...",
        "machine": f"{os.cpu_count()} CPU cores, {env['OMP_NUM_THREADS']} threads, {platform.machine()}, "
        f"measured {time.strftime('%Y-%m-%d %H:%M')}; best of {args.repeats}, interleaved",
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
