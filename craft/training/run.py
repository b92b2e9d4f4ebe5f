"""`train(cfg, resume=None)`: the one call behind `craft train` and `python -m craft.train`."""

from __future__ import annotations

from typing import Any

from craft.training.callbacks import Callback
from craft.training.trainer import Trainer, TrainResult


def train(
    cfg: Any, resume: str | None = None, callbacks: list[Callback] | None = None
) -> TrainResult:
    """Train the run described by a validated config.

    `resume`: None for a new run, "auto" for the newest complete checkpoint of this run name (a new
    run when there is none), or a run / checkpoint directory.
    """
    return Trainer(cfg, resume=resume, callbacks=callbacks).fit()
