"""The top-level `Config` model, built from the fixed sections and the component registry."""

from __future__ import annotations

import difflib
import importlib
import json
import re
import sys
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, ValidationError, create_model

from craft.config import components, registry
from craft.config.loader import RawConfig
from craft.config.sections import (
    CheckpointConfig,
    EvalConfig,
    KernelsConfig,
    LoggingConfig,
    RunConfig,
    Section,
    TrainingConfig,
)
from craft.errors import ConfigError

FIXED_SECTIONS: dict[str, type[Section]] = {
    "run": RunConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "kernels": KernelsConfig,
}
COMPONENT_SECTIONS = ("model", "data", "tokenizer", "optimizer", "scheduler")
SECTION_ORDER = (
    "run",
    "model",
    "data",
    "tokenizer",
    "optimizer",
    "scheduler",
    "training",
    "eval",
    "checkpoint",
    "logging",
    "kernels",
)


def _component_type(kind: str) -> Any:
    classes = [c.config_cls for c in registry.components(kind) if c.config_cls is not None]
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]  # noqa: UP007


_SCHEMA_CACHE: dict[int, type[BaseModel]] = {}
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def build_schema() -> type[BaseModel]:
    """The Config model for what is registered now (plugins included).

    Cached per registry state: configs validated against the same registrations share one class
    (and so compare equal).
    """
    cached = _SCHEMA_CACHE.get(registry.version())
    if cached is not None:
        return cached
    fields: dict[str, Any] = {
        "imports": (
            list[str],
            Field(
                default_factory=list,
                description="Modules imported before validation (they may register components).",
            ),
        )
    }
    for name in SECTION_ORDER:
        if name in FIXED_SECTIONS:
            cls = FIXED_SECTIONS[name]
            fields[name] = (cls, Field(default_factory=cls, description=cls.__doc__))
        else:
            default_cls = registry.get(name, components.DEFAULT_TYPES[name]).config_cls
            fields[name] = (_component_type(name), Field(default_factory=default_cls))
    schema = create_model("Config", __base__=Section, **fields)
    _SCHEMA_CACHE[registry.version()] = schema
    return schema


def import_plugins(modules: list[str], raw: RawConfig | None = None) -> None:
    """Import the recipe's `imports` modules; this runs their code, like any Python import.

    Modules are found on `sys.path` and next to the recipe file (a recipe is run on purpose, so
    its directory is trusted); the working directory is never added.
    """
    here = str(raw.recipe_dir) if raw and raw.recipe_dir else None
    if modules and here and here not in sys.path:
        sys.path.append(here)
    for mod in modules:
        where = (raw.import_origins.get(mod) or raw.origin("imports")) if raw else "imports"
        if not _MODULE_RE.match(mod):
            raise ConfigError(
                f"{where}: imports: {mod!r} is not a module name; expected a dotted Python module "
                "name such as 'my_plugins' or 'pkg.plugins' (not a file path)"
            )
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"{where}: imports: cannot import module {mod!r}: {e}") from None
        except Exception as e:  # the module's own code failed while it was imported
            raise ConfigError(
                f"{where}: imports: module {mod!r} failed while being imported: "
                f"{type(e).__name__}: {e}"
            ) from None


def _fill_default_types(raw: RawConfig) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.data.items()}
    for kind in COMPONENT_SECTIONS:
        sec = data.get(kind)
        if isinstance(sec, dict) and "type" not in sec:
            sec["type"] = components.DEFAULT_TYPES[kind]
    data["imports"] = list(raw.imports)
    return data


def _fmt_value(v: Any) -> str:
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _model_at(
    schema: type[BaseModel], path: list[str], data: dict[str, Any]
) -> type[BaseModel] | None:
    """The config class that holds the key at `path` (a list of keys below the top)."""
    cls: type[BaseModel] | None = schema
    node: Any = data
    for part in path:
        if cls is None:
            return None
        if cls is schema and part in COMPONENT_SECTIONS:
            tag = node.get(part, {}).get("type") if isinstance(node, dict) else None
            try:
                cls = registry.get(part, str(tag)).config_cls
            except registry.RegistryError:
                return None
            node = node.get(part) if isinstance(node, dict) else None
            continue
        info = cls.model_fields.get(part)
        ann = getattr(info, "annotation", None)
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        node = node.get(part) if isinstance(node, dict) else None
    return cls


def _lookup(data: Any, loc: list[str]) -> Any:
    for part in loc:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _describe(
    err: dict[str, Any], schema: type[BaseModel], data: dict[str, Any], raw: RawConfig
) -> str:
    loc = [str(x) for x in err["loc"]]
    # Tagged unions put the tag in the location: ('model', 'gpt', 'n_layer') -> model.n_layer.
    if len(loc) >= 2 and loc[0] in COMPONENT_SECTIONS:
        tag = data.get(loc[0], {}).get("type") if isinstance(data.get(loc[0]), dict) else None
        if loc[1] == tag:
            loc = [loc[0], *loc[2:]]
    dotted = ".".join(loc)
    origin = raw.origin(dotted)
    etype = err["type"]
    if etype == "extra_forbidden":
        parent = _model_at(schema, loc[:-1], data)
        hint = ""
        if parent is not None:
            allowed = [f for f in parent.model_fields if f != "type" or parent is not schema]
            close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)"
            elif parent is schema:
                hint = f" (sections are: {', '.join(SECTION_ORDER)})"
            else:
                hint = f" (known keys: {', '.join(allowed)})"
        what = "section" if len(loc) == 1 else "key"
        if len(loc) >= 2 and loc[0] in COMPONENT_SECTIONS and parent is not None:
            what = f"key for {loc[0]} type '{data[loc[0]].get('type')}'"
        return f"{origin}: {dotted}: unknown {what}{hint}"
    if etype == "union_tag_invalid":
        ctx = err.get("ctx", {})
        kind = loc[0]
        return (
            f"{raw.origin(dotted + '.type')}: {dotted}.type = {_fmt_value(ctx.get('tag'))}: "
            f"unknown {kind} type; expected one of {ctx.get('expected_tags')}"
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return f"{origin}: {dotted}: {msg[len('Value error, ') :]}"
    msg = msg.replace("Input should be ", "expected ").replace("Input ", "value ")
    if etype == "missing":
        if loc[-1].isdigit():  # a tuple with too few items
            parent = ".".join(loc[:-1])
            return f"{origin}: {parent} = {_fmt_value(_lookup(data, loc[:-1]))}: too few items"
        return f"{origin}: {dotted}: required key is missing"
    return f"{origin}: {dotted} = {_fmt_value(err.get('input'))}: {msg}"


def validate(raw: RawConfig) -> BaseModel:
    """Validate a merged raw config, reporting every problem at once."""
    import_plugins(raw.imports, raw)
    schema = build_schema()
    data = _fill_default_types(raw)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e, schema, data, raw) for e in exc.errors()]
        label = raw.path.name if raw.path else "config"
        n = len(problems)
        head = f"invalid config {label}: {n} problem{'s' if n != 1 else ''}"
        raise ConfigError(head, [f"  {p}" for p in problems]) from None
