"""What a training run reports: RUN_DIR/log.csv (one row a step), progress.png and the progress bar.

On ``--resume`` the rows written after the checkpoint being resumed are dropped: those steps are
run again and logged again, so the log of a resumed run reads like that of an uninterrupted one.
"""

from __future__ import annotations

import csv
import io as _io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.io import atomic_path

LOG_FILE = "log.csv"
PROGRESS_FILE = "progress.png"
LOG_FIELDS = ["step", "loss", "lr", "val_dice", "val_liver", "val_tumour", "seconds"]


def step_row(step: int, loss: float, lr: float, seconds: float, val: dict | None = None) -> dict[str, Any]:
    """One log row; the validation columns stay empty on steps without validation."""
    row: dict[str, Any] = {"step": step, "loss": f"{loss:.6f}", "lr": f"{lr:.6g}",
                           "val_dice": "", "val_liver": "", "val_tumour": "", "seconds": f"{seconds:.2f}"}
    if val is not None:
        row.update(val_dice=f"{val['dice']:.4f}", val_liver=f"{val['liver']:.4f}",
                   val_tumour=f"{val['tumour']:.4f}")
    return row


def trim_log(path: Path, last_step: int) -> list[dict]:
    """Rows up to ``last_step`` (rows written after the checkpoint are replayed on resume)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        # A row cut short by a kill has missing fields (None); rows after the checkpoint are redone.
        rows = [r for r in csv.DictReader(f) if None not in r.values() and None not in r
                and r["step"].isdigit() and int(r["step"]) <= last_step]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


class TrainLog:
    """RUN_DIR/log.csv, appended a row per step, and RUN_DIR/progress.png drawn from it."""

    def __init__(self, run_dir: Path, *, resume: bool, step: int) -> None:
        self.path = run_dir / LOG_FILE
        self.plot_path = run_dir / PROGRESS_FILE
        self.rows: list[dict] = trim_log(self.path, step) if resume else []
        if not resume or not self.path.is_file():
            with atomic_path(self.path) as tmp:
                tmp.write_text(",".join(LOG_FIELDS) + "\n", encoding="utf-8")

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)

    def plot(self) -> None:
        plot_progress(self.rows, self.plot_path)


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (None when disabled); tqdm itself stays quiet when stderr is no terminal."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", file=sys.stderr, dynamic_ncols=True,
                disable=None)


def plot_progress(rows: list[dict], path: Path) -> None:
    """Loss per step (and a running mean) with validation Dice on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    if len(loss) >= 5:
        w = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=1.5, label=f"loss (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [(int(r["step"]), float(r["val_dice"]), float(r["val_liver"]), float(r["val_tumour"]))
           for r in rows if r.get("val_dice") not in (None, "")]
    if val:
        ax2 = ax.twinx()
        s = [v[0] for v in val]
        ax2.plot(s, [v[1] for v in val], "o-", color="tab:red", label="val Dice (mean)")
        ax2.plot(s, [v[2] for v in val], "s--", color="tab:orange", label="val Dice liver")
        ax2.plot(s, [v[3] for v in val], "^--", color="tab:purple", label="val Dice tumour")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation Dice")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
