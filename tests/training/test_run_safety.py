"""Resuming never deletes or overwrites what it cannot use, and says what it skipped; a run that
fails to start leaves nothing; evaluation scores the same windows whatever the batch size."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from craft.config import load_config, registry
from craft.errors import CheckpointError, ConfigError
from craft.evaluation import evaluate_checkpoint
from craft.training import checkpoint as ckpt
from craft.training.run import train
from tests.training._helpers import MICRO, TINY, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 and its model/ export (step 4)."""
    tmp = tmp_path_factory.mktemp("finished")
    res = train(
        tiny_config(tmp, "training.max_steps=4", "checkpoint.interval=2", "eval.interval=2")
    )
    return res.run_dir


def _copy_run(src: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "outputs" / "micro" / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["marker", "truncate"])
def test_resume_auto_skips_a_damaged_checkpoint_without_deleting_or_overwriting(
    finished_run: Path, tmp_path: Path, damage: str
) -> None:
    run = _copy_run(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    if damage == "marker":
        (newest / "COMPLETE").unlink()
        why = "no COMPLETE marker"
    else:
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(100)
        why = "model.safetensors holds 100 bytes, COMPLETE records"
    before = _tree(run)

    res = train(tiny_config(tmp_path, "training.max_steps=6"), resume="auto")

    assert _tree(run) == before  # the damaged checkpoint and the step-4 export are untouched
    assert res.run_dir != run and res.run_dir.parent == run.parent  # continued elsewhere
    assert ckpt.read_trainer_state(res.last_checkpoint)["step"] == 6
    log = (res.run_dir / "train.log").read_text()
    assert f"skipped checkpoint {newest}: {why}" in log
    assert "resuming from" in log and "step_00000002" in log and "in a new run directory" in log


def test_clean_stale_removes_only_leftovers_of_dead_writers(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write = lambda d: (d / "w").write_text("x")  # noqa: E731
    good = ckpt.commit_directory(root / "step_00000005", write, kind="checkpoint", step=5)
    unmarked = ckpt.commit_directory(root / "step_00000006", write, kind="checkpoint", step=6)
    (unmarked / "COMPLETE").unlink()
    dead, alive = _dead_pid(), 1  # pid 1 always exists
    for name in (f".step_00000007.tmp-{dead}", f".step_00000002.trash-{dead}"):
        (root / name).mkdir()
    (root / f".step_00000008.tmp-{alive}").mkdir()  # someone else's write in progress
    moved = ckpt.commit_directory(root / "x", write, kind="checkpoint", step=3)
    moved.rename(root / f".step_00000003.replaced-{dead}")  # replaced, replacement never came

    removed = {p.name for p in ckpt.clean_stale(root)}

    assert removed == {f".step_00000007.tmp-{dead}", f".step_00000002.trash-{dead}"}
    assert good.is_dir() and unmarked.is_dir() and (unmarked / "w").exists()
    assert (root / f".step_00000008.tmp-{alive}").is_dir()
    assert ckpt.is_complete(root / "step_00000003")  # restored
    assert ckpt.checkpoint_problem(unmarked) == "no COMPLETE marker"


def test_resolving_a_run_warns_about_skipped_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run" / "checkpoints"
    write = lambda d: (d / "w").write_text("x")  # noqa: E731
    ckpt.commit_directory(root / "step_00000001", write, kind="checkpoint", step=1)
    bad = ckpt.commit_directory(root / "step_00000002", write, kind="checkpoint", step=2)
    (bad / "w").write_text("longer")
    with caplog.at_level("WARNING", logger="craft"):
        assert ckpt.resolve_checkpoint(tmp_path / "run") == root / "step_00000001"
    assert f"skipped checkpoint {bad}: w holds 6 bytes, COMPLETE records 1" in caplog.text
    (root / "step_00000001" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint .*step_00000002: w holds"):
        ckpt.resolve_checkpoint(tmp_path / "run")
    assert ckpt.later_state(tmp_path / "run", root / "step_00000001") == [
        "step_00000002 (w holds 6 bytes, COMPLETE records 1)"
    ]


def test_a_weights_file_that_disagrees_with_its_own_config_is_named(
    finished_run: Path, tmp_path: Path
) -> None:
    run = _copy_run(finished_run, tmp_path)
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len]
    assert b'"shape":[64,16]' in header  # the first MLP weight (out, in); same length swapped
    weights.write_bytes(
        data[:8]
        + header.replace(b'"shape":[64,16]', b'"shape":[16,64]', 1)
        + data[8 + header_len :]
    )
    with pytest.raises(CheckpointError) as info:
        train(tiny_config(tmp_path, "training.max_steps=6"), resume="auto")
    msg = info.value.message
    assert "does not match the checkpoint's own config" in msg and "config changes" not in msg
    assert "checkpoint (16, 64), config (64, 16)" in msg


def test_a_failed_start_leaves_no_run_directory(tmp_path: Path) -> None:
    def broken(cfg: object) -> None:
        raise CheckpointError("this callback cannot start")

    registry.register("callback", "test_broken_start", builder=broken)
    try:
        cfg = tiny_config(tmp_path / "o", "training.callbacks=['test_broken_start']")
        with pytest.raises(CheckpointError, match="cannot start"):
            train(cfg)
    finally:
        registry.unregister("callback", "test_broken_start")
    assert list(tmp_path.iterdir()) == []  # not even outputs/micro/


def _eval_config(tmp_path: Path, *overrides: str):
    base = [o for o in TINY if not o.startswith("eval.batches")]
    return load_config(MICRO, [*base, f"run.output_dir={tmp_path / 'outputs'}", *overrides])


def test_validation_loss_does_not_depend_on_the_batch_sizes(tmp_path: Path) -> None:
    first = train(_eval_config(tmp_path, "training.max_steps=2", "eval.windows=24"))
    # The same weights evaluated by a run with another training batch size (resumed at its end).
    again = train(
        _eval_config(tmp_path, "training.max_steps=2", "eval.windows=24", "training.batch_size=7"),
        resume="auto",
    )
    assert again.run_dir == first.run_dir and again.step == 2
    assert first.last_val_loss is not None and again.last_val_loss is not None
    assert math.isclose(first.last_val_loss, again.last_val_loss, rel_tol=1e-6)
    # `craft eval --windows 24` scores the same windows, whatever its --batch-size.
    for bs in (5, 24):
        scored = evaluate_checkpoint(first.run_dir, windows=24, batch_size=bs, progress=False)
        assert scored.windows == 24 and not scored.complete
        assert scored.checkpoint == str(first.last_checkpoint)
        assert math.isclose(scored.loss, first.last_val_loss, rel_tol=1e-5)


def test_a_model_vocabulary_smaller_than_the_data_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.vocab_size = 10: smaller than the tokenizer's vocabulary of 65"
    ):
        train(tiny_config(tmp_path, "model.vocab_size=10"))
    assert not (tmp_path / "outputs").exists()
