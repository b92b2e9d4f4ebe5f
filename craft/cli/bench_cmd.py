"""`craft bench`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def _cmd() -> None:
        """Not built yet."""
        from craft.cli.errors import fail

        fail("craft bench is not built yet")
