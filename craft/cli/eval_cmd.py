"""`craft eval`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def _cmd() -> None:
        """Not built yet."""
        from craft.cli.errors import fail

        fail("craft eval is not built yet")
