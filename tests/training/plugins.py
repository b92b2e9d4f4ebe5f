"""Callbacks that subprocess tests switch on with `imports=["tests.training.plugins"]`.

- `test_sleep`: sleeps CRAFT_TEST_SLEEP seconds after every step (slow steps for signal tests).
- `test_nan`: sets a weight to NaN after step CRAFT_TEST_NAN_STEP.
- `test_rank_losses`: every process appends its own first-step loss to CRAFT_TEST_RANK_FILE.<rank>.
- `test_hold`: when training starts, creates CRAFT_TEST_HOLD.started and waits (up to 120 s) until
  CRAFT_TEST_HOLD exists: a run that holds its run directory for as long as a test needs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from craft.config.registry import register_callback
from craft.training.callbacks import Callback
from tests.training._helpers import PoisonAt


class _Sleep(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        time.sleep(self.seconds)


class _RankLosses(Callback):
    main_process_only = False

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        with open(f"{self.path}.{trainer.rank}", "a") as f:
            f.write(f"{metrics['step']} {metrics['loss']!r}\n")


class _Hold(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Any) -> None:
        open(f"{self.path}.started", "w").close()
        end = time.monotonic() + 120
        while not os.path.exists(self.path) and time.monotonic() < end:
            time.sleep(0.02)


@register_callback("test_sleep")
def build_sleep(cfg: Any) -> Callback:
    return _Sleep(float(os.environ.get("CRAFT_TEST_SLEEP", "0.5")))


@register_callback("test_nan")
def build_nan(cfg: Any) -> Callback:
    return PoisonAt(int(os.environ["CRAFT_TEST_NAN_STEP"]))


@register_callback("test_rank_losses")
def build_rank_losses(cfg: Any) -> Callback:
    return _RankLosses(os.environ["CRAFT_TEST_RANK_FILE"])


@register_callback("test_hold")
def build_hold(cfg: Any) -> Callback:
    return _Hold(os.environ["CRAFT_TEST_HOLD"])
