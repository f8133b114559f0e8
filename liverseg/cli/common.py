"""What every command shares: one-line errors, JSON output and progress on stderr."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import typer

from liverseg.errors import LiversegError

T = TypeVar("T")
EXIT_BAD_INPUT = 2


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LiversegError into 'error: <one line>' on stderr and exit code 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LiversegError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def emit_json(data: Any) -> None:
    """Machine-readable result on stdout (one JSON document)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(items: Iterable[T], total: int | None = None, desc: str = "",
             quiet: bool = False) -> Iterator[T]:
    """A progress bar on stderr unless quiet (stdout stays clean for --json)."""
    if quiet:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    disable=None)  # None: off when stderr is not a terminal


def not_yet(stage: str) -> None:
    typer.echo(f"error: 'liverseg {stage}' is not yet available in this version", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)
