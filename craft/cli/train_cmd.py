"""`craft train RECIPE [key=value ...] [--resume auto|PATH]`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        recipe: Path = typer.Argument(
            ...,
            help="Recipe TOML file, or a recipe name: `char_small` or `experiment=char_small` "
            "(./recipes/NAME.toml, else one installed with craft; see `craft config list`).",
            show_default=False,
        ),
        overrides: list[str] | None = typer.Argument(
            None, help="Overrides: section.key=value.", show_default=False
        ),
        resume: str | None = typer.Option(
            None,
            "--resume",
            help="'auto' (newest complete checkpoint of the run) or a checkpoint path (a run or "
            "checkpoint directory, or its checkpoints/latest pointer).",
        ),
    ) -> None:
        """Train a model from a recipe (also under `accelerate launch` / `torchrun` via `python -m craft.train`)."""
        from craft.cli.errors import run_guarded
        from craft.train import train_from_recipe

        run_guarded(lambda: train_from_recipe(recipe, overrides or [], resume=resume))
