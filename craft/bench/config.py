"""The config of a training benchmark: a recipe (or the built-in one) plus overrides. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A small GPT on random tokens: what `craft bench all` trains when no recipe is given.
DEFAULT_CONFIG: dict[str, Any] = {
    "run": {"name": "bench"},
    "model": {"type": "gpt", "n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128},
    "data": {"type": "random", "vocab_size": 256},
    "optimizer": {"type": "adamw", "lr": 3e-4},
    "training": {"batch_size": 8},
}
QUICK_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}


def load_bench_config(recipe: str | Path | None, overrides: list[str], quick: bool = False) -> Any:
    """The validated config of a recipe (or the built-in one) with `key=value` overrides.

    With `data.type=random` the other keys of the recipe's data section are dropped, so any recipe
    can be benchmarked without its dataset.
    """
    from craft.config import RawConfig
    from craft.config.loader import apply_overrides, load_raw
    from craft.config.schema import validate

    if recipe is None:
        data = {k: dict(v) for k, v in DEFAULT_CONFIG.items()}
        if quick:
            data["model"].update(QUICK_MODEL)
            data["training"]["batch_size"] = 4
        raw = RawConfig(data=data, path=Path("built-in bench config"))
        apply_overrides(raw, overrides)
    else:
        raw = load_raw(recipe, overrides)
    section = raw.data.get("data")
    if isinstance(section, dict) and section.get("type") == "random":
        from craft.config import registry

        allowed = registry.get("data", "random").config_cls.model_fields  # type: ignore[union-attr]
        raw.data["data"] = {k: v for k, v in section.items() if k in allowed}
    return validate(raw)
