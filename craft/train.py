"""Module entry point: `python -m craft.train RECIPE [key=value ...] [--resume auto|PATH]`.

This is what `accelerate launch -m craft.train` and `torchrun -m craft.train` run on every process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def train_from_recipe(recipe: str | Path, overrides: list[str], resume: str | None = None) -> None:
    from craft.config import load_config

    cfg = load_config(recipe, overrides)  # a bad recipe fails here, before torch is imported
    from craft.training.run import train

    try:
        train(cfg, resume=resume)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit, so no rank aborts in a late destructor."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from craft.cli.errors import run_guarded

    parser = argparse.ArgumentParser(
        prog="python -m craft.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("recipe", help="Recipe TOML file, or a recipe name (char_small).")
    parser.add_argument("overrides", nargs="*", help="Overrides: section.key=value.")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint path.")
    args = parser.parse_args(argv)
    run_guarded(lambda: train_from_recipe(args.recipe, args.overrides, resume=args.resume))


if __name__ == "__main__":
    main(sys.argv[1:])
