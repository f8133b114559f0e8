"""`liverseg train DATA -o RUN_DIR`: train a network and write a model bundle into RUN_DIR."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from liverseg.cli.common import emit_json, friendly_errors


@friendly_errors
def command(
    data: Path = typer.Argument(..., help="A preprocess cache (from 'liverseg preprocess') or a raw "
                                "dataset, which is then preprocessed into RUN_DIR/cache."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: checkpoints, logs and the "
                                "model bundle ('liverseg infer --model RUN_DIR')."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe (configs/*.yaml)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a setting, e.g. "
                                        "--set train.iterations=200 (repeatable)."),
    fold: int | None = typer.Option(None, "--fold", "-f", min=0, help="Validate on this fold of "
                                    "splits.json (made with 5 folds if absent); omit to train on all."),
    splits: Path | None = typer.Option(None, "--splits", help="splits.json with explicit train/val "
                                       "case lists (nnU-Net format); default RUN_DIR or cache."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/checkpoints/last.pt."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Train on DATA and write RUN_DIR (itself a model bundle).

    Multi-process: torchrun --nproc_per_node N -m liverseg train ... (DDP; gloo on CPU, NCCL on GPU).
    """
    from liverseg.config import load_config
    from liverseg.train import train

    cfg = load_config(config, overrides)
    result = train(data, output, cfg, fold=fold, resume=resume, device=device, quiet=quiet or as_json,
                   splits=splits)
    if as_json:
        emit_json(asdict(result))
    elif not quiet:
        dice = f", best val Dice {result.best_dice:.4f} at step {result.best_iteration}" \
            if result.best_dice is not None else ""
        typer.echo(f"trained {result.iterations} steps in {result.seconds:.0f} s{dice} -> {result.bundle}",
                   err=True)
