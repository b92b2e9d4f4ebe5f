"""Every bad recipe or override ends the real CLI with exit code 2, no traceback, and a message
naming where, which key, which value and what was expected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BAD = Path(__file__).parent / "bad"
RECIPES = sorted(p for p in BAD.glob("*.toml"))


def _expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path} lacks an '# expect:' header"
    return first[len("# expect: ") :]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CRAFT_DEBUG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_corpus_is_large_enough() -> None:
    assert len(RECIPES) + len(OVERRIDE_CASES) >= 20


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_bad_recipe(recipe: Path) -> None:
    res = run_cli("config", "validate", str(recipe.relative_to(REPO)))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert _expected(recipe) in res.stderr, res.stderr
    assert res.stderr.startswith("error: ")


OVERRIDE_CASES = [
    (
        ["training.max_steps=ten"],
        'command line: training.max_steps = "ten": expected a valid integer',
    ),
    (
        ["model.n_heads=4"],
        "command line: model.n_heads: unknown key for model type 'gpt' (did you mean 'model.n_head'?)",
    ),
    (["optimzer.lr=1e-3"], "optimzer: unknown section (did you mean 'optimizer'?)"),
    (["model.type=mamba"], 'command line: model.type = "mamba": unknown model type'),
    (["run.seed=-1"], "command line: run.seed = -1: expected greater than or equal to 0"),
    (["training.batch_size"], "override 'training.batch_size' is not of the form key=value"),
    (['data.files=["a.txt"'], "is not valid TOML"),
    (["training.max_steps.x=1"], "training.max_steps is a value, not a table"),
    (
        ["scheduler.type=cosine", "scheduler.decay_fraction=0.5"],
        "scheduler.decay_fraction: unknown key for scheduler type 'cosine'",
    ),
]


@pytest.mark.parametrize(("overrides", "fragment"), OVERRIDE_CASES, ids=lambda x: str(x)[:40])
def test_bad_override(overrides: list[str], fragment: str) -> None:
    res = run_cli("config", "validate", "tests/config/good/base.toml", *overrides)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert fragment in res.stderr, res.stderr


def test_all_problems_reported_at_once() -> None:
    res = run_cli(
        "config",
        "validate",
        "tests/config/good/base.toml",
        "training.max_steps=0",
        "model.n_layr=2",
        "kernels.norm=fast",
    )
    assert res.returncode == 2
    assert "3 problems" in res.stderr
    for frag in ("training.max_steps", "model.n_layr", "kernels.norm"):
        assert frag in res.stderr


def test_missing_recipe_is_named() -> None:
    res = run_cli("config", "show", "recipes/does_not_exist.toml")
    assert res.returncode == 2
    assert "recipes/does_not_exist.toml: file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_debug_shows_traceback() -> None:
    res = run_cli("config", "validate", "tests/config/bad/bad_enum.toml", env={"CRAFT_DEBUG": "1"})
    assert res.returncode != 0
    assert "Traceback" in res.stderr


def test_valid_recipe_exits_zero() -> None:
    res = run_cli("config", "validate", "tests/config/good/base.toml")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["trian"], "No such command 'trian'. Did you mean 'train'?"),
        (["config", "show", "--bogus"], "No such option: --bogus (see '"),
        (["generate", "--checkpoint", "x", "--top-k", "0"], "Invalid value for '--top-k'"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str], fragment: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert fragment in lines[0]
