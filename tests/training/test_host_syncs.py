"""The training step reads from the device once per step: the loss and gradient norm that the
non-finite guard needs before the optimizer may step, in one transfer; nothing else in the loop
waits for the device.

Counted on the CPU as calls of the tensor methods that copy values to the host (`tolist`, `item`,
`bool(t)`, `float(t)`, `int(t)`); on a GPU each is a host synchronisation. SGD, because AdamW
reads its own step counter (a CPU tensor, no device wait) with `.item()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

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
READS = ("tolist", "item", "__bool__", "__float__", "__int__")


def _reads_during_fit(tmp_path: Path, steps: int, monkeypatch: pytest.MonkeyPatch) -> int:
    trainer = Trainer(tiny_config(tmp_path, *QUIET, f"training.max_steps={steps}"))
    count = 0

    def counting(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counting(name))
        trainer.fit()
    return count


def test_each_step_reads_the_device_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = _reads_during_fit(tmp_path / "a", 3, monkeypatch)
    long = _reads_during_fit(tmp_path / "b", 7, monkeypatch)
    assert (long - short) / 4 == 1  # per extra step: the guard's one transfer, nothing else
