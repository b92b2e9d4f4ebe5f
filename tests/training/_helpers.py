"""Shared pieces of the training tests: a tiny recipe and callbacks that stop or corrupt a run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from craft.config import load_config
from craft.training.callbacks import Callback

REPO = Path(__file__).resolve().parents[2]
MICRO = REPO / "recipes" / "micro.toml"

# A model and batch small enough that a step takes milliseconds on one core.
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=16",
    "model.block_size=16",
    "training.batch_size=4",
    "eval.batches=2",
    "training.log_interval=1",
    "logging.progress=plain",
]


def tiny_config(tmp_path: Path, *overrides: str) -> Any:
    """micro.toml shrunk further, writing under `tmp_path`."""
    return load_config(MICRO, [*TINY, f"run.output_dir={tmp_path / 'outputs'}", *overrides])


@contextlib.contextmanager
def one_process_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of this one process: collectives run (and return their input)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'process-group'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class StopAt(Callback):
    """Requests a stop (like a signal would) once the run reaches `step`."""

    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if metrics["step"] == self.at:
            trainer.request_stop(f"test stop at step {self.at}")


class PoisonAt(Callback):
    """Sets one weight to NaN after `step`, so the next step's loss is not finite."""

    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if metrics["step"] == self.at:
            with torch.no_grad():
                next(trainer.unwrapped_model.parameters()).view(-1)[0] = math.nan


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss from a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 120,
    env_extra: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess:
    """`python -m craft.train ...` in a subprocess with the test environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "craft.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
