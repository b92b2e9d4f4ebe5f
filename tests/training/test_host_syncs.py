"""The training step reads one value from the device per step (the go/no-go of the non-finite
guard); losses and gradient norms are read only when a line is logged.

Counted on the CPU as calls of `aten._local_scalar_dense` (what `.item()`, `float(t)` and
`bool(t)` run); on a GPU each is a host synchronisation. SGD, because AdamW reads its own step
counter (a CPU tensor, no device sync) with `.item()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from craft.training.trainer import Trainer
from tests.training._helpers import tiny_config

QUIET = [
    "optimizer.type=sgd",
    "training.log_interval=1000",  # lines at the first and the last step only
    "eval.interval=1000",
    "eval.at_end=false",
    "checkpoint.interval=1000",
    "checkpoint.save_at_end=false",
    "checkpoint.export=false",
]


class _ScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads_during_fit(tmp_path: Path, steps: int) -> int:
    trainer = Trainer(tiny_config(tmp_path, *QUIET, f"training.max_steps={steps}"))
    with _ScalarReads() as reads:
        trainer.fit()
    return reads.count


def test_each_step_reads_one_scalar_from_the_device(tmp_path: Path) -> None:
    short = _reads_during_fit(tmp_path / "a", 3)
    long = _reads_during_fit(tmp_path / "b", 7)
    assert (long - short) / 4 == 1  # per extra step: the guard's decision, nothing else
