"""Config system: TOML recipes with includes and overrides, validated by Pydantic.

`load_config(path, overrides)` is the one entry point the rest of Craft uses. No torch import here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from craft.config import components as _components  # noqa: F401  (registers built-ins)
from craft.config.loader import RawConfig, load_raw, parse_override, string_list
from craft.config.schema import build_schema, validate

Config = BaseModel  # the dynamic model built by build_schema(); typed loosely on purpose


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load, merge, override and validate a recipe. Raises ConfigError with every problem."""
    return validate(load_raw(path, overrides))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict with None values dropped (TOML has no null; None is every such default)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(cfg.model_dump(mode="json"))


def to_toml(cfg: BaseModel) -> str:
    """The resolved config as TOML; loading it again gives an equal config."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def from_dict(data: dict[str, Any], label: str = "config") -> Any:
    """Validate an already-resolved dict (e.g. the config stored in a checkpoint).

    Its `imports` are imported: check them first when the dict comes from a file Craft did not
    write (`craft.training.checkpoint.read_config` does).
    """
    imports = string_list(data.get("imports", []), "imports", label)
    raw = RawConfig(
        data={k: v for k, v in data.items() if k != "imports"},
        imports=imports,
        import_origins=dict.fromkeys(imports, label),
    )
    raw.origins = {}
    raw.path = Path(label)
    return validate(raw)


__all__ = [
    "Config",
    "RawConfig",
    "build_schema",
    "from_dict",
    "load_config",
    "load_raw",
    "parse_override",
    "to_dict",
    "to_toml",
]
