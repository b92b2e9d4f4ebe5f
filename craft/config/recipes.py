"""Recipes by name: `char_small` or `experiment=char_small` for `recipes/char_small.toml`.

A recipe argument that is an existing file is used as it is. Otherwise a bare name (no directory
part; `.toml` optional) is looked up in `./recipes/` of the working directory first and then among
the recipes installed with Craft: the wheel carries `recipes/` and `configs/` as
`craft/_recipes/`, and a source checkout (editable install) reads its own `recipes/`. No torch here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from craft.errors import ConfigError

RECIPE_SUFFIX = ".toml"
EXPERIMENT_PREFIX = "experiment="  # the Hydra-style form: `craft train experiment=char_small`
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PACKAGE = Path(__file__).resolve().parents[1]  # craft/


@dataclass(frozen=True)
class Recipe:
    """A recipe found by name: where it lives and the first line of its leading comment."""

    name: str
    path: Path
    origin: str  # "./recipes" or "installed"
    description: str


def installed_recipes_dir() -> Path | None:
    """The recipes installed with Craft: the wheel's copy, else the source checkout's `recipes/`."""
    wheel = _PACKAGE / "_recipes" / "recipes"
    if wheel.is_dir():
        return wheel
    root = _PACKAGE.parent
    checkout = root / "recipes"
    if checkout.is_dir() and (root / "pyproject.toml").is_file():
        return checkout
    return None


def _search_dirs() -> list[tuple[str, Path]]:
    dirs = [("./recipes", Path.cwd() / "recipes")]
    installed = installed_recipes_dir()
    if installed is not None:
        dirs.append(("installed", installed))
    return dirs


def _description(path: Path) -> str:
    """The first sentence of the comment block a recipe starts with ('' when it has none)."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if not text.startswith("#"):
                    break
                lines.append(text.lstrip("#").strip())
    except (OSError, UnicodeDecodeError):
        return ""
    return re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0]


def available_recipes() -> dict[str, Recipe]:
    """Every recipe a name can refer to, sorted by name; `./recipes` shadows installed ones."""
    found: dict[str, Recipe] = {}
    seen: set[Path] = set()
    for origin, directory in _search_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{RECIPE_SUFFIX}")):
            key = path.resolve()
            if path.stem in found or key in seen or not path.is_file():
                continue
            seen.add(key)
            found[path.stem] = Recipe(path.stem, path, origin, _description(path))
    return dict(sorted(found.items()))


def is_recipe_name(text: str) -> bool:
    """A bare name such as `char_small` or `char_small.toml` (no directory part)."""
    return "/" not in text and "\\" not in text and bool(_NAME_RE.match(text))


def _not_found(ref: str) -> ConfigError:
    recipes = available_recipes()
    stem = ref.removesuffix(RECIPE_SUFFIX)
    close = difflib.get_close_matches(Path(stem).name, list(recipes), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if is_recipe_name(ref):
        listed = ", ".join(recipes) if recipes else "none"
        return ConfigError(
            f"recipe {ref}: not found (no such file, no recipes/{stem}{RECIPE_SUFFIX} here, no "
            f"installed recipe of that name).{hint} Available recipes: {listed} "
            "(craft config list)."
        )
    from craft.config.loader import display_path

    return ConfigError(f"recipe {display_path(Path(ref))}: file not found.{hint}")


def find_recipe(ref: str | Path) -> Path:
    """The recipe file that `ref` (a path, a name, or `experiment=name`) refers to."""
    text = str(ref)
    if text.startswith(EXPERIMENT_PREFIX):
        text = text[len(EXPERIMENT_PREFIX) :]
    path = Path(text).expanduser()
    if path.is_file() or not is_recipe_name(text):
        if path.exists():
            return path  # the loader reports directories and unreadable files
        raise _not_found(text)
    name = text.removesuffix(RECIPE_SUFFIX)
    for _, directory in _search_dirs():
        candidate = directory / f"{name}{RECIPE_SUFFIX}"
        if candidate.is_file():
            return candidate
    if path.exists():
        return path  # e.g. a directory of that name: the loader says what is wrong with it
    raise _not_found(text)


def split_recipe_args(recipe: str | Path, overrides: list[str]) -> tuple[str | Path, list[str]]:
    """Allow `experiment=NAME` anywhere among the arguments: (recipe reference, overrides)."""
    exp = [o for o in overrides if o.startswith(EXPERIMENT_PREFIX)]
    if not exp:
        return recipe, list(overrides)
    if len(exp) > 1 or str(recipe).startswith(EXPERIMENT_PREFIX):
        raise ConfigError("experiment=NAME: give one recipe, not several")
    first = str(recipe)
    if "=" not in first or Path(first).is_file():
        raise ConfigError(
            f"{exp[0]}: a recipe is already given ({first}); give either a recipe or experiment=NAME"
        )
    rest = [o for o in overrides if o != exp[0]]
    return exp[0], [first, *rest]
