"""Recipes by name: lookup order, `experiment=NAME`, did-you-mean, and the copies wheels carry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from craft.config import load_config
from craft.config.recipes import available_recipes, find_recipe, split_recipe_args
from craft.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))


def test_names_resolve_to_installed_recipes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the checkout's own are the installed ones
    for ref in ("char_small", "char_small.toml", "experiment=char_small"):
        assert find_recipe(ref) == REPO / "recipes" / "char_small.toml"
    assert sorted(available_recipes()) == SHIPPED
    assert load_config("micro").run.name == "micro"  # includes resolve next to the recipe


def test_local_recipes_come_first_and_files_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    mine = tmp_path / "recipes" / "micro.toml"
    mine.write_text("# Mine.\n[run]\nname = 'mine'\n")
    assert find_recipe("micro").resolve() == mine
    recipes = available_recipes()
    assert recipes["micro"].origin == "./recipes" and recipes["micro"].description == "Mine."
    assert recipes["char_small"].origin == "installed"
    (tmp_path / "micro").write_text("[run]\nname = 'file'\n")  # an existing file is a path
    assert find_recipe("micro") == Path("micro")


def test_unknown_names_list_the_available_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        find_recipe("char_smal")
    msg = e.value.message
    assert msg.startswith("recipe char_smal: not found") and "Did you mean 'char_small'?" in msg
    assert all(name in msg for name in SHIPPED) and "\n" not in msg
    with pytest.raises(ConfigError, match=r"recipe nowhere/x\.toml: file not found\.$"):
        find_recipe("nowhere/x.toml")
    with pytest.raises(ConfigError, match=r"file not found\. Did you mean 'micro'\?"):
        find_recipe("nowhere/micr.toml")


def test_experiment_anywhere_among_the_arguments() -> None:
    assert split_recipe_args("a.b=1", ["experiment=micro", "c.d=2"]) == (
        "experiment=micro",
        ["a.b=1", "c.d=2"],
    )
    assert split_recipe_args("micro", ["a.b=1"]) == ("micro", ["a.b=1"])
    with pytest.raises(ConfigError, match="a recipe is already given"):
        split_recipe_args("micro", ["experiment=char_small"])
    with pytest.raises(ConfigError, match="give one recipe"):
        split_recipe_args("experiment=micro", ["experiment=char_small"])


def test_built_package_carries_recipes_and_configs(tmp_path: Path) -> None:
    """setup.py's build step (what `pip wheel` runs) copies recipes/ and configs/ into the package;
    from there a recipe name works in any directory and its includes resolve."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    for name in ("craft", "kernels", "recipes", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    lib = tmp_path / "lib"
    env = {**os.environ, "CRAFT_BUILD_CUDA": "0"}
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    shipped = lib / "craft" / "_recipes"
    assert sorted(p.stem for p in (shipped / "recipes").glob("*.toml")) == SHIPPED
    assert (shipped / "configs" / "model" / "gpt-char-small.toml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "craft", "config", "show", "char_small"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(lib)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert 'name = "char_small"' in res.stdout and "n_layer = 4" in res.stdout
