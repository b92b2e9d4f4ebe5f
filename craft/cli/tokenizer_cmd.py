"""`craft tokenizer ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="tokenizer commands.", no_args_is_help=True)


@app.command("placeholder", hidden=True)
def _placeholder() -> None:
    """Replaced by the real commands."""
