"""The offline lock-file check of .ci/run: green when the locks match pyproject.toml, red (naming
the requirement) when they drift."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_locks():
    spec = importlib.util.spec_from_file_location("craft_ci_locks", REPO / ".ci" / "locks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


locks = _load_locks()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what the check reads: pyproject.toml, the constraints and the lock files."""
    (tmp_path / ".ci").mkdir()
    for name in ("pyproject.toml", ".ci/lock-constraints.txt", *locks.LOCKS):
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_the_committed_locks_match() -> None:
    assert locks.check(REPO) == []
    res = subprocess.run(
        [sys.executable, ".ci/locks.py", "check"], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_a_new_dependency_is_named(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '"pyarrow>=14"]', '"pyarrow>=14", "fastapi>=0.110"]')
    problems = locks.check(tree)
    assert any(
        "requirements-dev.lock.txt" in p and "'fastapi>=0.110' (new since the lock)" in p
        for p in problems
    ), problems
    assert any("no pin for 'fastapi>=0.110'" in p for p in problems)
    assert not any(p.startswith("requirements.lock.txt") for p in problems)  # base unaffected


def test_a_changed_or_removed_requirement_is_named(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '"numpy>=1.24"', '"numpy>=99"')
    _edit(tree / "pyproject.toml", '    "tomli-w>=1.0",\n', "")
    problems = locks.check(tree)
    assert any(
        "has 'numpy>=99' (the lock was generated from 'numpy>=1.24')" in p for p in problems
    ), problems
    assert any("pins numpy==" in p and "outside 'numpy>=99'" in p for p in problems)
    assert any(
        "generated from 'tomli-w>=1.0', which pyproject.toml no longer has" in p for p in problems
    )


def test_a_hand_edited_pin_or_torch_constraint_is_named(tree: Path) -> None:
    lock = tree / "requirements.lock.txt"
    _edit(lock, "\nsafetensors==", "\nsafetensors==0.0.1\n# was ")
    problems = locks.check(tree)
    assert any("pins safetensors==0.0.1, outside 'safetensors>=0.4'" in p for p in problems)
    _edit(tree / ".ci" / "lock-constraints.txt", "torch==2.13.0", "torch==2.14.0")
    problems = locks.check(tree)
    assert any("pins torch==2.13.0, outside 'torch==2.14.0'" in p for p in problems), problems
    assert any("generated with constraints ['torch==2.13.0']" in p for p in problems)


def test_check_command_fails_with_the_fix(tree: Path) -> None:
    (tree / "requirements-dev.lock.txt").unlink()
    shutil.copytree(REPO / ".ci", tree / ".ci", dirs_exist_ok=True)
    res = subprocess.run(
        [sys.executable, ".ci/locks.py", "check"], cwd=tree, capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "requirements-dev.lock.txt: missing" in res.stderr
    assert "run `.ci/update-locks`" in res.stderr


def test_cuda_runtime_packages_are_left_out() -> None:
    text = (
        "torch==2.13.0\n    # via\n    #   craft-lm (pyproject.toml)\n    #   nvidia-x\n"
        "nvidia-cublas==13.1 ; sys_platform == 'linux'\n    # via torch\n"
        "cuda-toolkit==13.0 ; sys_platform == 'linux'\n    # via\n    #   torch\n"
        "typing-extensions==4.16.0\n    # via torch\n"
    )
    assert locks.drop_left_out(text) == (
        "torch==2.13.0\n    # via\n    #   craft-lm (pyproject.toml)\n"
        "typing-extensions==4.16.0\n    # via torch\n"
    )
