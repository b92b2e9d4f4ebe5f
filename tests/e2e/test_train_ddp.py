"""Two CPU processes under torchrun (gloo): one writer, distinct data, same loss, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from craft.training import checkpoint as ckpt
from craft.training.run import train
from tests.training._helpers import MICRO, REPO, TINY, run_cli, tiny_config

pytestmark = pytest.mark.slow

STEPS = ["training.max_steps=6", "checkpoint.interval=3", "eval.interval=3"]


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    ranks = tmp_path / "rank_losses"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CRAFT_TEST_RANK_FILE": str(ranks),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "craft.train",
        str(MICRO),
        *TINY,
        *STEPS,
        f"run.output_dir={out}",
        "imports=['tests.training.plugins']",
        "training.callbacks=['test_rank_losses']",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr

    # Only rank 0 wrote: one run directory, and the usual files in it.
    (run_dir,) = (out / "micro").iterdir()
    assert {p.name for p in run_dir.iterdir()} >= {"checkpoints", "metrics.jsonl", "config.toml"}
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    state = ckpt.read_trainer_state(latest)
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert state["tokens_seen"] == 6 * 2 * 4 * 16

    # Same weights on both ranks, different batches: the first-step losses differ.
    per_rank = [
        [float(line.split()[1]) for line in Path(f"{ranks}.{r}").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 6 and per_rank[0][0] != per_rank[1][0]

    # The logged loss is the mean over ranks; a single process with the same global batch
    # (2 x 4 sequences) tracks it closely.
    logged = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert logged[0]["loss"] == pytest.approx((per_rank[0][0] + per_rank[1][0]) / 2, rel=1e-6)
    single = train(tiny_config(tmp_path / "single", *STEPS, "training.batch_size=8"))
    single_val = single.last_val_loss
    ddp_val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert ddp_val["split"] == "val"
    assert abs(ddp_val["val_loss"] - single_val) < 0.05

    # The two-process checkpoint resumes in a single process.
    more = run_cli(
        [str(MICRO), *TINY, "training.max_steps=8", f"run.output_dir={out}", "--resume", "auto"],
        cwd=tmp_path,
    )
    assert more.returncode == 0, more.stderr
    assert "resuming a 2-process checkpoint with 1 process" in more.stdout
    final = ckpt.read_trainer_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert final["step"] == 8 and final["world_size"] == 1
