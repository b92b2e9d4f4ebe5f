"""Signals in subprocesses: a signal during an evaluation stops at once, two Ctrl-C merged inside
one C call still abort, SIGHUP stops like SIGTERM, and a killed command cleans up after itself."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from craft.training import checkpoint as ckpt
from tests.training._helpers import MICRO, REPO, TINY

pytestmark = pytest.mark.slow
PLUGINS = "imports=['tests.security.signal_plugins']"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _train(tmp_path: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    args = [str(MICRO), *TINY, f"run.output_dir={tmp_path / 'outputs'}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "craft.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def _run_dir(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "outputs" / "micro").iterdir()
    return run


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("split") == "train"]


def test_signal_during_evaluation_stops_without_another_step(tmp_path: Path) -> None:
    flag = tmp_path / "evaluating"
    proc = _train(
        tmp_path,
        "training.max_steps=100000",
        "eval.interval=3",
        "checkpoint.interval=100000",
        PLUGINS,
        "training.callbacks=['test_slow_eval']",
        env=_env(CRAFT_TEST_FLAG=str(flag), CRAFT_TEST_SLEEP="3"),
    )
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = _run_dir(tmp_path)
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert latest is not None and ckpt.read_trainer_state(latest)["step"] == 3
    assert max(_steps(run)) == 3  # no step after the evaluation that the signal interrupted
    assert len(ckpt.complete_checkpoints(run / "checkpoints")) == 1


def test_two_ctrl_c_inside_one_c_call_still_abort(tmp_path: Path) -> None:
    flag = tmp_path / "busy"
    proc = _train(
        tmp_path,
        "training.max_steps=100000",
        "checkpoint.interval=100000",
        PLUGINS,
        "training.callbacks=['test_busy_c']",
        env=_env(CRAFT_TEST_FLAG=str(flag), CRAFT_TEST_STEP="2"),
    )
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # both arrive before Python runs any handler
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "error: interrupted" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints") is None


def test_sighup_stops_training_like_sigterm(tmp_path: Path) -> None:
    flag = tmp_path / "evaluating"
    proc = _train(
        tmp_path,
        "training.max_steps=100000",
        "eval.interval=2",
        "checkpoint.interval=100000",
        PLUGINS,
        "training.callbacks=['test_slow_eval']",
        env=_env(CRAFT_TEST_FLAG=str(flag), CRAFT_TEST_SLEEP="0.2"),
    )
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received SIGHUP" in out + err
    latest = ckpt.latest_checkpoint(_run_dir(tmp_path) / "checkpoints")
    assert latest is not None
    assert ckpt.read_trainer_state(latest)["step"] == max(_steps(_run_dir(tmp_path)))


def test_sigterm_during_prepare_restores_the_terminal_and_removes_temporary_output(
    tmp_path: Path,
) -> None:
    line = "".join(chr(c) for c in range(32, 127)) + "\n"
    (tmp_path / "big.txt").write_text(line * (3 * (1 << 20) // len(line)))  # 3 chunks of 1 MB
    (tmp_path / "recipe.toml").write_text(
        'imports = ["tests.security.signal_plugins"]\n'
        '[data]\nfiles = ["big.txt"]\ndir = "out"\n[tokenizer]\ntype = "test_sigterm"\n'
    )
    master, slave = pty.openpty()  # stderr on a terminal: the rich progress bar hides the cursor
    proc = subprocess.Popen(
        [sys.executable, "-m", "craft", "data", "prepare", "--config", "recipe.toml"],
        cwd=tmp_path,
        env=_env(TERM="xterm"),
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("prepare did not finish")
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = seen.decode("utf-8", "replace")
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "terminated by SIGTERM" in text and "Traceback" not in text
    hide, show = text.rfind("\x1b[?25l"), text.rfind("\x1b[?25h")
    assert hide >= 0 and show > hide  # the cursor was hidden by the bar and shown again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "recipe.toml"]
