"""Where Craft keeps downloaded sources and prepared datasets (`CRAFT_HOME`, default ~/.cache/craft)."""

from __future__ import annotations

import os
from pathlib import Path

from craft.errors import CraftError

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


def cache_dir(*parts: str, error: type[CraftError] = CraftError) -> Path:
    """`<CRAFT_HOME>/<parts...>`, created (mode 0700) and checked at every level.

    A level that another user owns or can write is refused (see `craft.safety.check_private`):
    what Craft finds in its cache (prepared datasets, compiled kernels) is used without asking.
    """
    from craft.safety import private_dir

    path = private_dir(craft_home(), what="CRAFT_HOME", error=error)
    for part in parts:
        path = private_dir(path / part, what="CRAFT_HOME", error=error)
    return path
