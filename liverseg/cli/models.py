"""`liverseg models`: list the model bundles installed with the package."""

from __future__ import annotations

import typer

from liverseg.cli.common import emit_json, friendly_errors


@friendly_errors
def command(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the model bundles shipped with liverseg, with their model cards."""
    import json

    from liverseg.bundle import CARD_FILE, default_bundle_path, installed_bundles

    rows = []
    for path in installed_bundles():
        card_path = path / CARD_FILE
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
        rows.append({"name": path.name, "path": str(path), "default": path == default_bundle_path(),
                     "card": card})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no model bundles are installed; pass --model BUNDLE to 'liverseg infer'")
        return
    for row in rows:
        card = row["card"]
        mark = " (default)" if row["default"] else ""
        typer.echo(f"{row['name']}{mark}: {card.get('description', '')}")
        typer.echo(f"  path: {row['path']}")
        for key in ("version", "licence", "trained_on"):
            if key in card:
                typer.echo(f"  {key}: {card[key]}")
