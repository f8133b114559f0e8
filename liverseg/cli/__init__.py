"""The ``liverseg`` command: argument parsing, progress and error presentation only.

Each subcommand lives in its own module and calls one library function of its stage.
"""

from __future__ import annotations

import sys

import typer

from liverseg import __version__
from liverseg.allocator import reexec_with_tcmalloc
from liverseg.cli import evaluate, infer, models, preprocess, score, train

app = typer.Typer(
    name="liverseg",
    help="Segment the liver and liver tumours in 3D CT: preprocess, train, infer, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"liverseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Segment the liver and liver tumours in 3D CT (NIfTI, NRRD/MHA or DICOM)."""


app.command("preprocess")(preprocess.command)
app.command("train")(train.command)
app.command("infer")(infer.command)
app.command("score")(score.command)
app.command("evaluate")(evaluate.command)
app.command("models")(models.command)


def run() -> None:
    """The ``liverseg`` console script: ``liverseg train`` first moves to tcmalloc where it is
    installed (liverseg.allocator), then every command runs as the app says."""
    reexec_with_tcmalloc(sys.argv)
    app()
