"""`--force` replaces only what Craft wrote and can prove it wrote; staging names are never
predictable; nothing a user made is ever deleted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from craft.fileio import atomic_write_bytes
from tests.security._helpers import run_craft, tree

TEXT = "".join(
    f"{i}: some words to learn a tokenizer from, and then some more.\n" for i in range(60)
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project directory: corpus, notes, sources, and a stray tokenizer.json."""
    p = tmp_path / "project"
    (p / "src").mkdir(parents=True)
    (p / "corpus.txt").write_text(TEXT)
    (p / "notes.md").write_text("my notes")
    (p / "src" / "main.py").write_text("print('hi')")
    (p / "tokenizer.json").write_text('{"type": "sentencepiece", "format_version": 1}')
    return p


def _train(out: str, cwd: Path, capsys, *extra: str):
    return run_craft(
        ["tokenizer", "train", "-i", "corpus.txt", "--vocab-size", "295", "-o", out, "-q", *extra],
        capsys,
        cwd=cwd,
    )


def test_tokenizer_train_force_never_empties_the_working_directory(project, capsys) -> None:
    before = tree(project)
    res = _train(".", project, capsys, "--force")
    assert res.code == 2, res
    assert "working directory" in res.err and len(res.err.strip().splitlines()) == 1
    assert tree(project) == before


def test_tokenizer_train_force_never_replaces_a_dataset(project, capsys) -> None:
    res = run_craft(
        ["data", "prepare", "-i", "corpus.txt", "-o", "data", "-t", "char", "-q"],
        capsys,
        cwd=project,
    )
    assert res.code == 0, res.err
    (project / "data" / "tokenizer.json").touch(exist_ok=True)
    before = tree(project)
    res = _train("data", project, capsys, "--force")
    assert res.code == 2 and "did not write" in res.err, res
    assert tree(project) == before


def test_tokenizer_train_refuses_a_symlinked_output(project, tmp_path, capsys) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (project / "link").symlink_to(real)
    res = _train("link", project, capsys, "--force")
    assert res.code == 2 and "symbolic link" in res.err, res
    assert not any(p.name.startswith(".link") for p in project.iterdir())
    assert list(real.iterdir()) == []


def test_tokenizer_train_force_replaces_only_its_own_tokenizer(project, capsys) -> None:
    assert _train("tok", project, capsys).code == 0
    first = (project / "tok" / "tokenizer.model").read_bytes()
    res = _train("tok", project, capsys, "--force", "--model-type", "unigram")
    assert res.code == 0, res.err
    assert (project / "tok" / "tokenizer.model").read_bytes() != first
    assert sorted(p.name for p in (project / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer.model",
    ]
    (project / "tok" / "README").write_text("about my tokenizer")
    res = _train("tok", project, capsys, "--force")
    assert res.code == 2 and "did not write (README)" in res.err, res
    assert (project / "tok" / "README").exists()
    assert not any(".tok." in p.name for p in project.iterdir())  # no staging left behind


def test_tokenizer_staging_never_follows_a_planted_symlink(project, tmp_path, capsys) -> None:
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (project / ".tok.training").symlink_to(attacker)  # the old fixed staging name
    res = _train("tok", project, capsys)
    assert res.code == 0, res.err
    out = project / "tok"
    assert out.is_dir() and not out.is_symlink()
    assert list(attacker.iterdir()) == []
    assert (project / ".tok.training").is_symlink()  # left alone, not Craft's


def test_prepare_force_needs_a_dataset_craft_wrote(tmp_path, capsys) -> None:
    (tmp_path / "small.txt").write_text(TEXT)
    p = tmp_path / "p"
    (p / "sub").mkdir(parents=True)
    (p / "meta.json").write_text("{}")
    (p / "thesis.tex").write_text("\\documentclass{article}")
    before = tree(tmp_path)
    res = run_craft(
        ["data", "prepare", "-i", "small.txt", "-o", "p", "-t", "char", "--force", "-q"],
        capsys,
        cwd=tmp_path,
    )
    assert res.code == 2 and "not one Craft wrote" in res.err, res
    assert tree(tmp_path) == before


def test_prepare_force_refuses_the_working_directory_and_input_parents(tmp_path, capsys) -> None:
    (tmp_path / "small.txt").write_text(TEXT)
    (tmp_path / "meta.json").write_text("{}")
    before = tree(tmp_path)
    for out in (".", str(tmp_path)):
        res = run_craft(
            ["data", "prepare", "-i", "small.txt", "-o", out, "-t", "char", "--force", "-q"],
            capsys,
            cwd=tmp_path,
        )
        assert res.code == 2 and "working directory" in res.err, res
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    (corpus / "small.txt").write_text(TEXT)
    (corpus / "meta.json").write_text("{}")
    before = tree(tmp_path)
    res = run_craft(
        ["data", "prepare", "-i", str(corpus / "small.txt"), "-o", str(corpus), "-t", "char",
         "--force", "-q"],
        capsys,
        cwd=elsewhere,
    )  # fmt: skip
    assert res.code == 2 and "holds the input" in res.err, res
    assert tree(tmp_path) == before


def test_prepare_force_replaces_exactly_the_dataset_files(tmp_path, capsys) -> None:
    (tmp_path / "small.txt").write_text(TEXT)
    args = ["data", "prepare", "-i", "small.txt", "-o", "d", "-t", "char", "-q"]
    assert run_craft(args, capsys, cwd=tmp_path).code == 0
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    (tmp_path / "small.txt").write_text(TEXT + "more text here\n")
    res = run_craft([*args, "--force"], capsys, cwd=tmp_path)
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == names
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["sources"][0]["bytes"] == len(TEXT) + len("more text here\n")
    (tmp_path / "d" / "plot.png").write_bytes(b"png")
    res = run_craft([*args, "--force"], capsys, cwd=tmp_path)
    assert res.code == 2 and "did not write (plot.png)" in res.err
    assert (tmp_path / "d" / "plot.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "small.txt"]


def test_atomic_writes_never_follow_a_planted_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "tokenizer.model"
    target.parent.mkdir()
    (target.parent / f".{target.name}.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content" and not target.is_symlink()
    assert victim.read_text() == "precious"
    shutil.rmtree(target.parent)
