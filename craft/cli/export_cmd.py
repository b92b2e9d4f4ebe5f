"""`craft export CHECKPOINT --output DIR [--format hf|craft] [--dtype ...] [--force]`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Format(str, Enum):
    hf = "hf"
    craft = "craft"


class ExportDType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        checkpoint: str = typer.Argument(
            ...,
            help="Run, checkpoint or export directory (or a Hugging Face model directory / Hub id).",
            show_default=False,
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", help="Directory to create.", show_default=False
        ),
        fmt: Format = typer.Option(
            Format.hf,
            "--format",
            help="hf: a directory transformers loads (config.json, model.safetensors, tokenizer); "
            "craft: Craft's own export (weights, config.toml, tokenizer/).",
        ),
        dtype: ExportDType = typer.Option(
            ExportDType.float32, "--dtype", help="Dtype of the exported weights (hf format)."
        ),
        force: bool = typer.Option(
            False, "--force", help="Replace OUTPUT when it exists and is not empty."
        ),
    ) -> None:
        """Export a model: to the Hugging Face format (transformers loads it) or Craft's own."""
        from craft.cli.errors import run_guarded

        def run() -> None:
            from craft.generation import resolve_dtype
            from craft.training.export import export as do_export

            out = do_export(
                checkpoint, output, fmt=fmt.value, force=force, dtype=resolve_dtype(dtype.value)
            )
            typer.echo(f"exported ({fmt.value}): {out}")

        run_guarded(run)
