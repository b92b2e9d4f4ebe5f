"""`craft train` on a fresh directory: a real run, then its checkpoint generates; bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from craft.generation import generate
from craft.training import checkpoint as ckpt
from tests.training._helpers import MICRO, REPO, TINY

pytestmark = pytest.mark.slow


def _craft(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_craft_train_then_generate(tmp_path: Path) -> None:
    res = _craft(
        ["train", str(MICRO), *TINY, "training.max_steps=10", "logging.plot=true"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "outputs" / "micro").iterdir()  # default output_dir, relative
    for name in ("config.toml", "metrics.jsonl", "train.log", "loss_curve.png", "model"):
        assert (run_dir / name).exists(), name
    assert "step 10/10" in res.stdout  # plain progress lines when stdout is not a terminal
    model, tok, _ = ckpt.load_model(run_dir)
    (text,) = generate(model, tok, "ROMEO:", max_new_tokens=20, seed=0)
    assert len(text) > 0


def test_bad_resume_path_is_a_one_line_error(tmp_path: Path) -> None:
    res = _craft(["train", str(MICRO), *TINY, "--resume", str(tmp_path / "nope")], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "nope: not found" in res.stderr
