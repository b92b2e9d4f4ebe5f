"""Where Craft keeps downloaded sources and prepared datasets (`CRAFT_HOME`, default ~/.cache/craft)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.cache/craft")


def craft_home() -> Path:
    """The cache root: `$CRAFT_HOME` when set, else `~/.cache/craft`."""
    value = os.environ.get("CRAFT_HOME", "").strip()
    return Path(value).expanduser() if value else DEFAULT_HOME.expanduser()


def sources_dir() -> Path:
    """Downloaded named sources live in `<CRAFT_HOME>/sources/<name>/`."""
    return craft_home() / "sources"


def datasets_dir() -> Path:
    """Prepared datasets that a recipe does not place explicitly live in `<CRAFT_HOME>/datasets/`."""
    return craft_home() / "datasets"
