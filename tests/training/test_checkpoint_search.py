"""Finding the checkpoint a path names and the run `--resume auto|PATH` continues, on directories
built by hand (no training): run order, damaged and newer state, exports, symlinks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from craft.errors import CheckpointError
from craft.training import checkpoint_search as search
from craft.training.checkpoint_dirs import CHECKPOINTS, EXPORT, MARKER, checkpoint_name


def _complete(d: Path, kind: str = "checkpoint", step: int = 0, complete: bool = True) -> Path:
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    files = {"model.safetensors": 10 if complete else 11}  # a wrong size: interrupted
    (d / MARKER).write_text(json.dumps({"kind": kind, "step": step, "files": files}))
    return d


def _ckpt(run: Path, step: int, complete: bool = True) -> Path:
    return _complete(run / CHECKPOINTS / checkpoint_name(step), step=step, complete=complete)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("20260101-120000", ("20260101-120000", 0)),  # a bare stamp: its -HHMMSS is no counter
        ("20260101-120000-3", ("20260101-120000", 3)),
        ("20260101-120000-12", ("20260101-120000", 12)),
        ("run-12345", ("run", 12345)),
        ("run-123456", ("run-123456", 0)),  # six digits: a time, not a counter
        ("20260101-120000-old", ("20260101-120000-old", 0)),
        ("12345", ("12345", 0)),  # no dash at all
    ],
)
def test_run_order_key(name: str, key: tuple[str, int]) -> None:
    assert search._run_order(Path(name)) == key


def test_find_resume_takes_the_newest_run_with_a_complete_checkpoint(tmp_path: Path) -> None:
    assert search.find_resume(tmp_path / "missing") is None
    assert search.newest_run_with_checkpoint(tmp_path / "missing") is None
    runs = tmp_path / "runs"
    runs.mkdir()
    assert search.find_resume(runs) is None
    (runs / "zzz-not-a-run.txt").write_text("a file is not a run")
    older = tmp_path / "runs" / "20260101-120000"
    _ckpt(older, 5)
    _ckpt(runs / "20260101-120000-2", 7)
    best = _ckpt(runs / "20260101-120000-10", 3)  # counter 10 > 2: newer, whatever its step
    damaged_a = _ckpt(runs / "20260101-120000-11", 9, complete=False)
    damaged_b = _ckpt(runs / "20260101-120000-12", 9, complete=False)
    (runs / "20260101-120000-13").mkdir()  # a run without checkpoints
    run, ck, skipped = search.find_resume(runs)
    assert (run, ck) == (runs / "20260101-120000-10", best)
    assert [p for p, _ in skipped] == [damaged_b, damaged_a]  # newest first, both runs
    assert all("holds 10 bytes" in why for _, why in skipped), skipped
    assert search.newest_run_with_checkpoint(runs) == (run, ck)
    assert search.run_dir_of(ck) == run


def test_run_dir_of_needs_the_standard_layout(tmp_path: Path) -> None:
    assert search.run_dir_of(tmp_path / "run" / CHECKPOINTS / "step_00000004") == tmp_path / "run"
    assert search.run_dir_of(tmp_path / "run" / "elsewhere" / "step_00000004") is None
    assert search.run_dir_of(tmp_path / "run" / CHECKPOINTS / "best") is None


def test_later_state_lists_newer_damaged_steps_and_a_later_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _ckpt(run, 2, complete=False)  # older damage: not in the way
    ck = _ckpt(run, 4)
    assert search.later_state(run, ck) == []
    assert search.later_state(run, tmp_path / "model") == []  # not a step directory
    _complete(run / EXPORT, kind="export", step=4)  # exported at this very step: fine
    assert search.later_state(run, ck) == []
    _ckpt(run, 6, complete=False)
    later = search.later_state(run, ck)
    assert len(later) == 1 and later[0].startswith("step_00000006 (")
    (run / EXPORT / MARKER).write_text(
        json.dumps({"kind": "export", "step": 8, "files": {"model.safetensors": 10}})
    )
    assert search.later_state(run, ck)[1:] == [f"{EXPORT}/ (exported at step 8)"]
    (run / EXPORT / MARKER).write_text(
        json.dumps({"kind": "export", "step": "8", "files": {"model.safetensors": 10}})
    )
    assert len(search.later_state(run, ck)) == 1  # a step that is not a number is no step


def test_choose_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    with caplog.at_level(logging.WARNING, logger="craft.training"):
        assert search.choose_resume(runs, "auto") == (None, None)
    assert "no complete checkpoint" in caplog.text
    run = runs / "20260101-120000"
    old, new = _ckpt(run, 2), _ckpt(run, 4)
    assert search.choose_resume(runs, "auto") == (run, new)
    assert search.choose_resume(runs, str(new)) == (run, new)
    assert search.choose_resume(runs, str(run)) == (run, new)
    assert search.choose_resume(runs, str(old)) == (None, old)  # older: a new run directory
    moved = _complete(tmp_path / "loose" / "step_00000004", step=4)
    assert search.choose_resume(runs, str(moved)) == (None, moved)  # outside a run's layout
    export = _complete(run / EXPORT, kind="export", step=4)
    with pytest.raises(CheckpointError, match="exported model"):
        search.choose_resume(runs, str(export))
    _ckpt(run, 6, complete=False)  # later state that resuming in place would overwrite
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="craft.training"):
        assert search.choose_resume(runs, "auto") == (None, new)
        assert search.choose_resume(runs, str(new)) == (None, new)
    assert "step_00000006" in caplog.text and "new run directory" in caplog.text


def test_resolve_source_passes_hub_ids_through(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ck = _ckpt(run, 3)
    assert search.resolve_source(run) == ck
    assert search.resolve_source(str(run)) == ck
    assert search.resolve_source("someone/some-model") == "someone/some-model"


def test_resolve_checkpoint_refuses_what_is_not_this_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _ckpt(run, 2)
    outside = _complete(tmp_path / "elsewhere" / "step_00000009", step=9)
    (run / CHECKPOINTS / "step_00000009").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint: .* points outside"):
        search.resolve_checkpoint(run)
    doctored = _complete(tmp_path / "doctored", step=1)
    (doctored / MARKER).write_text(json.dumps({"kind": "checkpoint", "files": {"../x": 1}}))
    with pytest.raises(CheckpointError, match="lists a file that"):
        search.resolve_checkpoint(doctored)


def test_resolve_checkpoint_names_the_newest_damaged_ones(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _ckpt(run, step, complete=False)
    with pytest.raises(CheckpointError) as e:
        search.resolve_checkpoint(run)
    names = [n for n in ("step_00000001", "step_00000002", "step_00000003", "step_00000004")]
    msg = e.value.message
    assert names[0] not in msg and all(n in msg for n in names[1:])
    why = msg.split("step_00000002: ", 1)[1].split("; ", 1)[0]
    assert msg.endswith(f"(step_00000002: {why}; step_00000003: {why}; step_00000004: {why})")


def test_resolve_checkpoint_on_a_plain_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="not a run, checkpoint or exported model directory"):
        search.resolve_checkpoint(plain)
    (plain / "step_00000003").write_text("a file, not a checkpoint")
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        search.resolve_checkpoint(plain)
