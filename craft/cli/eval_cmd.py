"""`craft eval --checkpoint PATH [--data DIR] [--split val|train] [--windows N] [--json]`."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from craft.cli.generate_cmd import (
    CHECKPOINT,
    DEVICE,
    TRUST_IMPORTS,
    Device,
    DType,
    stderr_logging,
)


class Split(str, Enum):
    val = "val"
    train = "train"


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def format_report(result: dict[str, Any]) -> str:
    """The human-readable metrics block printed without --json."""
    if result["complete"]:
        scope = "whole split"
    elif result.get("selection") == "spread":
        scope = f"{result['windows']:,} windows spread evenly"
    else:
        scope = f"first {result['batches']} batches"
    lines = [
        f"checkpoint      {result['checkpoint']}",
        f"data            {result['data']} ({result['split']}, {scope})",
        f"tokens scored   {result['tokens']:,} in {result['windows']:,} windows of "
        f"<= {result['window']}",
        f"loss            {result['loss']:.4f}",
        f"perplexity      {result['perplexity']:.3f}",
        f"bits/token      {result['bits_per_token']:.4f}",
        f"bits/char       {result['bits_per_char']:.4f}  ({result['characters']:,} characters)",
        f"bits/byte       {result['bits_per_byte']:.4f}  ({result['bytes']:,} UTF-8 bytes)",
    ]
    from craft.safety import printable

    return printable("\n".join(lines))  # paths may come from a checkpoint's config


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate(
        checkpoint: Path = CHECKPOINT,
        data: Path | None = typer.Option(
            None,
            "--data",
            help="Prepared dataset directory; default: the checkpoint's own data.",
            show_default=False,
        ),
        split: Split = typer.Option(Split.val, "--split", help="Split to score."),
        windows: int | None = typer.Option(
            None,
            "--windows",
            min=1,
            help="Score N windows spread evenly over the split, as training's evaluation with "
            "eval.windows = N does (default: the whole split).",
            show_default=False,
        ),
        max_batches: int | None = typer.Option(
            None,
            "--max-batches",
            min=1,
            help="Score only the first N batches (depends on --batch-size; prefer --windows).",
            show_default=False,
        ),
        batch_size: int | None = typer.Option(
            None,
            "--batch-size",
            min=1,
            help="Windows per forward pass (default: eval.batch_size, else training.batch_size); "
            "the result does not depend on it.",
            show_default=False,
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
        device: Device = DEVICE,
        dtype: DType = typer.Option(
            DType.float32, "--dtype", help="Autocast dtype of the forward pass."
        ),
        trust_imports: bool = TRUST_IMPORTS,
    ) -> None:
        """Loss, perplexity and bits per token/character/byte of a checkpoint on a data split."""
        from craft.cli.errors import run_guarded

        def run() -> None:
            from craft.evaluation import evaluate_checkpoint

            stderr_logging()
            result = evaluate_checkpoint(
                checkpoint,
                data=data,
                split=split.value,
                max_batches=max_batches,
                windows=windows,
                batch_size=batch_size,
                device=device.value,
                dtype=dtype.value,
                trust_imports=trust_imports,
            )
            out = {"checkpoint": result.checkpoint, **result.to_dict()}
            out["selection"] = "spread" if windows else ("prefix" if max_batches else "all")
            if as_json:
                typer.echo(json.dumps({k: _json_value(v) for k, v in out.items()}, indent=2))
            else:
                typer.echo(format_report(out))

        run_guarded(run)
