"""Load a recipe: TOML files with includes, deep merge, `key=value` overrides, with provenance.

Every leaf key remembers where it was set (a file and its include chain, or the command line) so
that validation errors can point at it.

Tables merge key by key, except when a later file or an override gives a table another `type`
(`scheduler.type=constant` over a recipe's cosine schedule): the keys files set in that table
described the old type, so they are dropped with a warning that names them, and the new type
starts from its defaults plus what the command line sets (before or after the type).
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("craft.config")

COMMAND_LINE = "command line"
# Keys that say the same thing two ways: an override of one replaces the other when a file set it.
EXCLUSIVE_KEYS = {"eval.windows": "eval.batches", "eval.batches": "eval.windows"}
MAX_DEPTH = 64  # tables and arrays nested deeper than this are refused (no RecursionError later)
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")


def display_path(path: Path) -> str:
    """A path relative to the working directory when it lies below it, for short messages."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class RawConfig:
    """A merged, unvalidated config: the data, where each leaf came from, and modules to import."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    path: Path | None = None
    import_origins: dict[str, str] = field(default_factory=dict)  # module -> where it was listed
    recipe_dir: Path | None = None  # where `imports` may also be found: the recipe's directory

    def origin(self, dotted: str) -> str:
        """Where `dotted` (or its nearest set ancestor or descendant) was set, else 'default'."""
        key = dotted
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        for k, v in self.origins.items():
            if k.startswith(dotted + "."):
                return v
        return "default"


def _leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_leaves(v, dotted + "."))
        else:
            out.append(dotted)
    return out


def _drop_origins(origins: dict[str, str], dotted: str, old: Any) -> None:
    """Forget where `dotted` and the leaves of its old value `old` were set.

    Only the old value's own leaves are visited (never every origin), so N overrides cost O(N).
    """
    origins.pop(dotted, None)
    if isinstance(old, dict) and old:
        for leaf in _leaves(old, dotted + "."):
            origins.pop(leaf, None)


def deep_merge(
    base: dict[str, Any],
    over: dict[str, Any],
    origins: dict[str, str],
    over_origin: dict[str, str] | str,
    prefix: str = "",
) -> None:
    """Merge `over` into `base` in place: tables merge key by key, anything else replaces; a
    table given another `type` first loses the keys files set in it (`_switch_type`)."""
    if "type" in over and base.get("type", over["type"]) != over["type"]:
        where = over_origin if isinstance(over_origin, str) else over_origin[f"{prefix}type"]
        _switch_type(base, origins, prefix, over["type"], where)
    for k, v in over.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v, origins, over_origin, dotted + ".")
            continue
        _drop_origins(origins, dotted, base.get(k))
        base[k] = _copy(v)
        leaves = _leaves(v, dotted + ".") if isinstance(v, dict) and v else [dotted]
        for leaf in leaves:
            origins[leaf] = over_origin if isinstance(over_origin, str) else over_origin[leaf]


def _switch_type(
    table: dict[str, Any], origins: dict[str, str], prefix: str, new: Any, where: str
) -> None:
    """Drop the keys of `table` (at `prefix`) that files set: they were for its old type."""
    dropped = []
    for leaf in _leaves({k: v for k, v in table.items() if k != "type"}):
        origin = origins.get(prefix + leaf)
        if origin == COMMAND_LINE:
            continue
        parts = leaf.split(".")
        chain = [table]
        for part in parts[:-1]:
            chain.append(chain[-1][part])
        chain[-1].pop(parts[-1])
        for parent, part in zip(reversed(chain[:-1]), reversed(parts[:-1]), strict=True):
            if parent[part]:
                break
            del parent[part]  # a table emptied here
        origins.pop(prefix + leaf, None)
        dropped.append((prefix + leaf, origin))
    if dropped:
        old = f"{table['type']!r} ({origins.get(prefix + 'type', 'default')})"
        by_origin: dict[str | None, list[str]] = {}
        for key, origin in dropped:
            by_origin.setdefault(origin, []).append(key)
        keys = "; ".join(f"{', '.join(k)} (set in {o})" for o, k in by_origin.items())
        log.warning(
            "%s: %stype = %r replaces %s, so the keys set for the old type are dropped: %s",
            where, prefix, new, old, keys,
        )  # fmt: skip


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _parse_toml(path: Path, label: str) -> dict[str, Any]:
    from craft.safety import MAX_TOML_BYTES, read_bytes_bounded

    # A FIFO, a device (/dev/zero) or a huge file is an error, not a hang or a MemoryError.
    data = read_bytes_bounded(path, MAX_TOML_BYTES, what=label, error=ConfigError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = ""
        if e.start < 2 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "; it starts with a UTF-16 byte order mark, save it as UTF-8"
        raise ConfigError(f"{label}: not UTF-8 text (byte {e.start}){hint}") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark (some editors write one)
    try:
        return _check_depth(tomllib.loads(text), label)
    except RecursionError:
        raise ConfigError(f"{label}: nested more than {MAX_DEPTH} levels deep") from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _POS_RE.search(msg)
        if m:
            reason = _POS_RE.sub("", msg).strip()
            raise ConfigError(
                f"{label}:{m.group(1)}:{m.group(2)}: TOML syntax error at line {m.group(1)}, "
                f"column {m.group(2)}: {reason}"
            ) from None
        raise ConfigError(f"{label}: TOML syntax error: {msg}") from None


def _depth(value: Any) -> int:
    """Nesting depth of tables and arrays, without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _check_depth(data: dict[str, Any], label: str) -> dict[str, Any]:
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(f"{label}: nested more than {MAX_DEPTH} levels deep")
    return data


def string_list(value: Any, key: str, label: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    raise ConfigError(f"{label}: {key} = {value!r}: expected a list of strings")


def load_file(path: Path, chain: tuple[Path, ...] = ()) -> RawConfig:
    """Load one TOML file and, depth first, the files it includes (paths relative to it)."""
    resolved = path.resolve()
    label = display_path(path)
    if chain:
        label += "".join(f" (included from {display_path(p)})" for p in reversed(chain))
    if resolved in chain:
        cycle = " -> ".join(display_path(p) for p in (*chain, resolved))
        raise ConfigError(f"include cycle: {cycle}")
    data = _parse_toml(resolved, label)
    includes = string_list(data.pop("include", []), "include", label)
    imports = string_list(data.pop("imports", []), "imports", label)

    raw = RawConfig(path=resolved)
    for inc in includes:
        inc_path = Path(inc).expanduser()
        if not inc_path.is_absolute():
            inc_path = resolved.parent / inc_path
        if not inc_path.exists():
            raise ConfigError(
                f"{label}: include {inc!r} not found (looked for {display_path(inc_path)})"
            )
        sub = load_file(inc_path, (*chain, resolved))
        deep_merge(raw.data, sub.data, raw.origins, sub.origins)
        raw.imports += [m for m in sub.imports if m not in raw.imports]
        for m, where in sub.import_origins.items():
            raw.import_origins.setdefault(m, where)
    deep_merge(raw.data, data, raw.origins, label)
    raw.imports += [m for m in imports if m not in raw.imports]
    for m in imports:
        raw.import_origins.setdefault(m, label)
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is TOML, and a bare word is a string."""
    if "=" not in text:
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not of the form key=value")
    key, _, value = text.partition("=")
    key = key.strip().lstrip("+")
    if not _KEY_RE.match(key):
        raise ConfigError(f"{COMMAND_LINE}: override {text!r}: {key!r} is not a dotted key")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
        _check_depth({"v": parsed}, f"{COMMAND_LINE}: override {text[:40]!r}")
    except RecursionError:
        raise ConfigError(
            f"{COMMAND_LINE}: override {text[:40]!r}: nested more than {MAX_DEPTH} levels deep"
        ) from None
    except tomllib.TOMLDecodeError:
        if value and value[0] in "[{\"'":
            raise ConfigError(
                f"{COMMAND_LINE}: override {text!r}: value {value!r} is not valid TOML"
            ) from None
        parsed = value
    return key, parsed


def apply_overrides(raw: RawConfig, overrides: list[str]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        if key == "imports":
            for m in string_list(value, key, COMMAND_LINE):
                if m not in raw.imports:
                    raw.imports.append(m)
                raw.import_origins.setdefault(m, COMMAND_LINE)
            continue
        parts = key.split(".")
        node = raw.data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"{COMMAND_LINE}: override {text!r}: {where} is a value, not a table"
                )
            node = child
        deep_merge(
            node,
            {parts[-1]: value},
            raw.origins,
            COMMAND_LINE,
            ".".join(parts[:-1]) + "." if len(parts) > 1 else "",
        )
        other = EXCLUSIVE_KEYS.get(key)
        if other is not None and raw.origins.get(other, COMMAND_LINE) != COMMAND_LINE:
            table, _, leaf = other.rpartition(".")
            parent = raw.data
            for part in table.split("."):
                parent = parent.get(part, {})
            _drop_origins(raw.origins, other, parent.pop(leaf, None))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> RawConfig:
    """Load a recipe given by path or by name (`char_small`, `experiment=char_small`)."""
    from craft.config.recipes import find_recipe, split_recipe_args

    ref, overrides = split_recipe_args(path, list(overrides or []))
    recipe = find_recipe(ref)
    raw = load_file(recipe)
    raw.recipe_dir = Path(recipe).resolve().parent
    apply_overrides(raw, overrides or [])
    return raw
