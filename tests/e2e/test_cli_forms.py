"""The command forms users bring from other tools, through the real CLI in a subprocess, run from
a directory that has no recipes/ (so recipe names come from the recipes installed with Craft)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training._helpers import REPO, TINY

pytestmark = pytest.mark.slow

RUN = [*TINY, "training.max_steps=2", "eval.interval=2", "checkpoint.interval=2"]


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("CRAFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def craft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run("craft", list(args), cwd)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m craft.cli.run train experiment=micro ...`: the module form and a Hydra-style
    recipe name, in one short run (two checkpoints' worth of steps)."""
    cwd = tmp_path_factory.mktemp("module_form")
    res = _run("craft.cli.run", ["train", "experiment=micro", *RUN], cwd)
    assert res.returncode == 0, res.stderr
    (run,) = (cwd / "outputs" / "micro").iterdir()
    return run


def test_module_form_runs_the_same_app(run_dir: Path) -> None:
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    res = _run("craft.cli.run", ["--help"], run_dir)
    assert res.returncode == 0 and "python -m craft.cli.run" in res.stdout
    for command in ("train", "generate", "data", "dataset", "config"):
        assert command in res.stdout


def test_recipe_by_name(tmp_path: Path) -> None:
    res = craft("train", "micro", *RUN, "training.max_steps=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "outputs" / "micro").iterdir()
    assert (run / "checkpoints" / "step_00000001").is_dir()


def test_recipe_name_in_local_recipes_wins_and_unknown_names_are_listed(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "micro.toml").write_text(
        f'# My own micro.\ninclude = ["{REPO / "recipes" / "micro.toml"}"]\n[run]\nname = "mine"\n'
    )
    res = craft("config", "show", "experiment=micro", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'name = "mine"' in res.stdout
    listed = craft("config", "list", cwd=tmp_path)
    assert listed.returncode == 0
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("micro "))
    assert "recipes/micro.toml" in line and "My own micro." in line
    assert any(ln.startswith("char_small ") for ln in listed.stdout.splitlines())
    bad = craft("train", "char_smal", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: recipe char_smal: not found")
    assert "Did you mean 'char_small'?" in bad.stderr and "micro" in bad.stderr


def test_dataset_prepare_with_tokenizer_type(tmp_path: Path, shakespeare: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(shakespeare.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    res = craft(
        "dataset", "prepare", "--input", "raw.txt", "--output-dir", "out",
        "--tokenizer-type", "char", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "meta.json").is_file() and "char" in res.stdout
    helped = craft("data", "prepare", "--help", cwd=tmp_path)
    assert "--tokenizer-type" in helped.stdout and "alias" in helped.stdout


def test_generate_text(run_dir: Path) -> None:
    res = craft(
        "generate", "text", "--checkpoint", str(run_dir), "--prompt", "ROMEO:",
        "--max-new-tokens", "8", "--seed", "1", cwd=run_dir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ROMEO:") and len(res.stdout) > len("ROMEO:\n")
    other = craft("generate", "image", "--checkpoint", str(run_dir), cwd=run_dir)
    assert other.returncode == 2 and "'image' is not one of 'text'" in other.stderr


def test_generate_from_the_latest_pointer(run_dir: Path) -> None:
    latest = run_dir / "checkpoints" / "latest"
    res = craft(
        "generate", "--checkpoint", str(latest), "--prompt", "ROMEO:", "--max-new-tokens", "8",
        "--seed", "1", cwd=run_dir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ROMEO:")
