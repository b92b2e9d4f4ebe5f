"""One process owns a run directory: a second `--resume auto` on it is refused before it writes
anything, and a killed owner leaves nothing stuck."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from craft.training import checkpoint as ckpt
from craft.training.run import train
from tests.training._helpers import MICRO, REPO, TINY, run_cli, tiny_config

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=4", "checkpoint.interval=2", "eval.interval=2"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the first run exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the first run did not start training in time")
        time.sleep(0.02)


def test_second_resume_on_a_run_directory_is_refused_and_a_killed_owner_frees_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "outputs"
    done = train(tiny_config(tmp_path, *STEPS))  # a finished run to continue
    run_dir = done.run_dir
    hold = tmp_path / "hold"
    common = [str(MICRO), *TINY, f"run.output_dir={out}", "training.max_steps=8", "--resume"]
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "craft.train",
            *common[:-1],
            "imports=['tests.training.plugins']",
            "training.callbacks=['test_hold']",
            "--resume",
            "auto",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "CRAFT_TEST_HOLD": str(hold)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(Path(f"{hold}.started"), first)  # it owns the run and is about to train
        before = _snapshot(run_dir)
        second = run_cli([*common[:-1], "optimizer.lr=0.01", "--resume", "auto"], cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"run directory {run_dir}" in lines[0] and f"pid {first.pid}" in lines[0]
        assert _snapshot(run_dir) == before  # no metrics, log, config or checkpoint touched
        assert [p.name for p in out.joinpath("micro").iterdir()] == [run_dir.name]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The kernel dropped the killed owner's lock: the next resume owns the run and continues it.
    again = train(tiny_config(tmp_path, "training.max_steps=6"), resume="auto")
    assert again.run_dir == run_dir and again.step == 6
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == 6
    assert not (run_dir / ".lock").exists()  # released and removed when the run ended
