"""`craft config show|validate|schema|list`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from craft.cli.errors import run_guarded

app = typer.Typer(help="Inspect and validate recipes.", no_args_is_help=True)

RECIPE = typer.Argument(
    ..., help="Recipe TOML file, or a recipe name (see `craft config list`).", show_default=False
)
OVERRIDES = typer.Argument(
    None, help="Overrides: section.key=value (value parsed as TOML).", show_default=False
)


def resolved(cfg: Any) -> Any:
    """Apply `model.init_from` (reads the source's config; imports torch only then)."""
    if not getattr(cfg.model, "init_from", None):
        return cfg
    from craft.training.pretrained import resolve_pretrained

    return resolve_pretrained(cfg)


@app.command("show")
def show(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Print the resolved, validated config as TOML (with `model.init_from`, the model section
    filled from the pretrained source)."""
    from craft.config import load_config, to_toml

    cfg = run_guarded(lambda: resolved(load_config(recipe, overrides or [])))
    typer.echo(to_toml(cfg), nl=False)


@app.command("validate")
def validate_cmd(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Exit 0 when the recipe is valid, else print every problem and exit 2."""
    from craft.config import load_config

    run_guarded(lambda: resolved(load_config(recipe, overrides or [])))
    typer.echo(f"{recipe}: ok")


@app.command("schema")
def schema() -> None:
    """Print the JSON Schema of recipes (for editor completion)."""
    from craft.config import build_schema

    typer.echo(json.dumps(build_schema().model_json_schema(), indent=2))


@app.command("list")
def list_cmd() -> None:
    """List the recipes that can be named instead of a path (./recipes first, then installed)."""
    from craft.config.loader import display_path
    from craft.config.recipes import available_recipes

    recipes = available_recipes()
    if not recipes:
        typer.echo("no recipes found (none in ./recipes and none installed with craft)")
        return
    rows = [
        (r.name, display_path(r.path) if r.origin == "./recipes" else f"{r.path} (installed)",
         r.description)
        for r in recipes.values()
    ]  # fmt: skip
    w0, w1 = (max(len(row[i]) for row in rows) for i in (0, 1))
    for name, where, description in rows:
        typer.echo(f"{name:<{w0}}  {where:<{w1}}  {description}".rstrip())
