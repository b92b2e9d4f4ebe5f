"""Training under faults, in subprocesses: SIGTERM / SIGINT, a second Ctrl-C, kill -9, NaN."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from craft.training import checkpoint as ckpt
from tests.training._helpers import MICRO, REPO, TINY, run_cli

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [str(MICRO), *TINY, f"run.output_dir={tmp_path / 'outputs'}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "craft.train", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _logged_steps(tmp_path: Path) -> list[int]:
    steps = []
    for metrics in (tmp_path / "outputs" / "micro").glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("split") == "train":
                steps.append(rec["step"])
    return steps


def _wait_for_step(tmp_path: Path, proc: subprocess.Popen, above: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if max(_logged_steps(tmp_path), default=0) > above:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not reach a logged step in time")


def _wait_for_training(tmp_path: Path, proc: subprocess.Popen, start: int) -> None:
    """Wait until process number `start` (1-based) of this run has logged a training step."""
    end = time.monotonic() + 90
    while time.monotonic() < end:
        logs = list((tmp_path / "outputs" / "micro").glob("*/train.log"))
        text = logs[0].read_text() if logs else ""
        parts = text.split(" training: ")
        if len(parts) > start and "| loss" in parts[start]:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not reach a logged step in time")


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "outputs" / "micro").iterdir()
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_step_checkpoints_and_exits_cleanly(tmp_path: Path, sig: int) -> None:
    proc = _start(tmp_path, "training.max_steps=100000", "checkpoint.interval=100000")
    _wait_for_step(tmp_path, proc, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    assert f"received {signal.Signals(sig).name}" in out
    latest = ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints")
    assert latest is not None
    state = ckpt.read_trainer_state(latest)
    assert state["step"] == max(_logged_steps(tmp_path)) > 2  # the step in flight was finished


def test_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    proc = _start(
        tmp_path,
        "training.max_steps=100000",
        "checkpoint.interval=100000",
        "imports=['tests.training.plugins']",
        "training.callbacks=['test_sleep']",
        env={"CRAFT_TEST_SLEEP": "1.0"},
    )
    _wait_for_step(tmp_path, proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "error: interrupted" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints") is None


def test_kill9_at_random_moments_never_breaks_resume(tmp_path: Path) -> None:
    """Kill repeatedly (checkpointing every step, so many kills land mid-save), then finish."""
    rng = random.Random(0)
    extra = ["training.max_steps=60", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    newest = 0
    for attempt in range(1, 4):
        proc = _start(tmp_path, *extra, "--resume", "auto")
        if attempt == 1:  # past step 1, so the first checkpoint is complete
            _wait_for_step(tmp_path, proc, 1)
        else:
            _wait_for_training(tmp_path, proc, attempt)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        latest = ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints")
        assert latest is not None
        ckpt.load_model(latest)  # the newest complete checkpoint always loads
        step = ckpt.read_trainer_state(latest)["step"]
        assert step >= newest
        newest = step
    done = run_cli(
        [str(MICRO), *TINY, f"run.output_dir={tmp_path / 'outputs'}", *extra, "--resume", "auto"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    run_dir = _run_dir(tmp_path)
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == 60
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert steps == sorted(set(steps))  # replayed steps were dropped, none logged twice


def test_nan_is_a_one_line_error_naming_the_step(tmp_path: Path) -> None:
    res = run_cli(
        [
            str(MICRO),
            *TINY,
            f"run.output_dir={tmp_path / 'outputs'}",
            "training.max_steps=20",
            "checkpoint.interval=3",
            "imports=['tests.training.plugins']",
            "training.callbacks=['test_nan']",
        ],
        cwd=tmp_path,
        env_extra={"CRAFT_TEST_NAN_STEP": "4"},
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite training loss") and "at step 5" in line
    latest = ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints")
    assert latest is not None and latest.name == "step_00000003"


def test_resume_from_a_corrupt_optimizer_state_is_a_one_line_error(tmp_path: Path) -> None:
    base = [str(MICRO), *TINY, f"run.output_dir={tmp_path / 'outputs'}", "training.max_steps=2"]
    first = run_cli([*base, "checkpoint.interval=2", "eval.interval=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    latest = ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints")
    assert latest is not None
    path = latest / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = bytes(8)  # same size, so the COMPLETE marker still matches
    path.write_bytes(bytes(data))
    res = run_cli([*base, "training.max_steps=4", "--resume", str(latest)], cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cannot read the optimizer state" in line
