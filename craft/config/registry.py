"""Component registry: each `type` name of a kind maps to its config class and its builder.

The config schema for `model`, `data`, `tokenizer`, `optimizer` and `scheduler` is built from this
registry, so a plugin registered here validates exactly like a built-in. Builders may be given as a
`"module:attribute"` string so that validating a config never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

KINDS = ("model", "data", "tokenizer", "optimizer", "scheduler", "callback")

T = TypeVar("T")


class RegistryError(ValueError):
    """Raised for programming errors: a duplicate name, an unknown kind or name."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    config_cls: type[BaseModel] | None
    builder: Callable[..., Any] | str

    def build_fn(self) -> Callable[..., Any]:
        """The builder, importing it first when it was registered by path."""
        if callable(self.builder):
            return self.builder
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
_VERSION = [0]  # bumped on every change, so schemas built from the registry can be cached


def version() -> int:
    return _VERSION[0]


def register(
    kind: str,
    name: str,
    *,
    config: type[BaseModel] | None = None,
    builder: Callable[..., Any] | str,
) -> Component:
    """Register `name` under `kind`. Registering a name twice raises `RegistryError`."""
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
    if name in _REGISTRY[kind]:
        raise RegistryError(f"{kind} {name!r} is already registered")
    if config is not None:
        tag = config.model_fields.get("type")
        if tag is None or tag.default != name:
            raise RegistryError(
                f"config class {config.__name__} for {kind} {name!r} needs a field "
                f"`type: Literal[{name!r}] = {name!r}`"
            )
    comp = Component(kind, name, config, builder)
    _REGISTRY[kind][name] = comp
    _VERSION[0] += 1
    return comp


def registry_decorator(kind: str, name: str, *, config: type[BaseModel] | None = None):
    """`@register_model("mygpt", config=MyConfig)` style decorator over a builder or class."""

    def wrap(obj: T) -> T:
        register(kind, name, config=config, builder=obj)  # type: ignore[arg-type]
        return obj

    return wrap


def register_model(name: str, *, config: type[BaseModel]):
    return registry_decorator("model", name, config=config)


def register_dataset(name: str, *, config: type[BaseModel]):
    return registry_decorator("data", name, config=config)


def register_tokenizer(name: str, *, config: type[BaseModel]):
    return registry_decorator("tokenizer", name, config=config)


def register_optimizer(name: str, *, config: type[BaseModel]):
    return registry_decorator("optimizer", name, config=config)


def register_scheduler(name: str, *, config: type[BaseModel]):
    return registry_decorator("scheduler", name, config=config)


def register_callback(name: str):
    return registry_decorator("callback", name)


def get(kind: str, name: str) -> Component:
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY.get(kind, {}))) or "none"
        raise RegistryError(f"unknown {kind} {name!r}; registered: {known}") from None


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def components(kind: str) -> list[Component]:
    return [_REGISTRY[kind][n] for n in sorted(_REGISTRY[kind])]


def build(kind: str, cfg: BaseModel, *args: Any, **kwargs: Any) -> Any:
    """Build the component named by `cfg.type` with `builder(cfg, *args, **kwargs)`."""
    return get(kind, cfg.type).build_fn()(cfg, *args, **kwargs)  # type: ignore[attr-defined]


def unregister(kind: str, name: str) -> None:
    """Remove a registration (tests use it to clean up plugins)."""
    if _REGISTRY[kind].pop(name, None) is not None:
        _VERSION[0] += 1
