"""`checkpoints/latest` is accepted wherever a checkpoint path is: followed, never outside its
directory, and every way it can be wrong is a one-line CheckpointError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft.errors import CheckpointError
from craft.training import checkpoint as ckpt


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / ckpt.checkpoint_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    size = 10 if complete else 11  # a marker that does not match: interrupted
    marker = {"kind": "checkpoint", "step": step, "files": {"model.safetensors": size}}
    (d / ckpt.MARKER).write_text(json.dumps(marker))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "run" / ckpt.CHECKPOINTS
    _checkpoint(root, 2)
    _checkpoint(root, 4)
    return root


def test_latest_pointer_is_followed(root: Path) -> None:
    (root / ckpt.LATEST).write_text("step_00000002\n")  # older than the newest: still followed
    assert ckpt.resolve_checkpoint(root / ckpt.LATEST) == root / "step_00000002"
    assert ckpt.resolve_checkpoint(root) == root / "step_00000004"  # the directory: newest


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("../../elsewhere", "not a latest pointer"),
        ("/etc", "not a latest pointer"),
        ("step_00000009", "points to step_00000009, which is not a checkpoint directory"),
        ("", "not a latest pointer"),
    ],
)
def test_bad_pointer_is_a_one_line_error(root: Path, content: str, message: str) -> None:
    (root / ckpt.LATEST).write_text(content)
    with pytest.raises(CheckpointError, match=message) as e:
        ckpt.resolve_checkpoint(root / ckpt.LATEST)
    assert "\n" not in e.value.message


def test_pointer_to_incomplete_checkpoint_or_symlink(root: Path, tmp_path: Path) -> None:
    _checkpoint(root, 6, complete=False)
    (root / ckpt.LATEST).write_text("step_00000006")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve_checkpoint(root / ckpt.LATEST)
    outside = _checkpoint(tmp_path / "elsewhere", 8)
    (root / "step_00000008").symlink_to(outside, target_is_directory=True)
    (root / ckpt.LATEST).write_text("step_00000008")
    with pytest.raises(CheckpointError, match="not a checkpoint directory next to it"):
        ckpt.resolve_checkpoint(root / ckpt.LATEST)


def test_other_files_are_still_rejected(root: Path) -> None:
    (root / "notes.txt").write_text("step_00000002")
    with pytest.raises(CheckpointError, match=r"is a file; expected a run.*latest pointer"):
        ckpt.resolve_checkpoint(root / "notes.txt")
