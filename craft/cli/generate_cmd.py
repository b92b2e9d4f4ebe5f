"""`craft generate`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def _cmd() -> None:
        """Not built yet."""
        from craft.cli.errors import fail

        fail("craft generate is not built yet")
