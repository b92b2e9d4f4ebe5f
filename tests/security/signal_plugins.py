"""Plugins the signal tests switch on with `imports=["tests.security.signal_plugins"]`.

- `test_slow_eval` (callback): writes CRAFT_TEST_FLAG, then sleeps CRAFT_TEST_SLEEP seconds at
  every evaluation, so a signal can arrive while an evaluation runs.
- `test_busy_c` (callback): at step CRAFT_TEST_STEP writes CRAFT_TEST_FLAG, then spends a few
  seconds inside one C call (as a checkpoint write does), during which Python runs no handler.
- `test_sigterm` (tokenizer): a char tokenizer whose training sends SIGTERM to its own process
  halfway through reading the text, as `kill` would during `craft data prepare`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from craft.config.registry import register_callback, register_tokenizer
from craft.config.sections import Section
from craft.data.tokenizers.char import CharTokenizer
from craft.training.callbacks import Callback


class _SlowEval(Callback):
    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        Path(os.environ["CRAFT_TEST_FLAG"]).write_text(str(metrics["step"]))
        time.sleep(float(os.environ.get("CRAFT_TEST_SLEEP", "3")))


class _BusyC(Callback):
    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if metrics["step"] == int(os.environ["CRAFT_TEST_STEP"]):
            Path(os.environ["CRAFT_TEST_FLAG"]).write_text("busy")
            sum(range(int(os.environ.get("CRAFT_TEST_LOOP", "100000000"))))  # one C call


@register_callback("test_slow_eval")
def build_slow_eval(cfg: Any) -> Callback:
    return _SlowEval()


@register_callback("test_busy_c")
def build_busy_c(cfg: Any) -> Callback:
    return _BusyC()


class SigtermTokenizerConfig(Section):
    type: Literal["test_sigterm"] = "test_sigterm"


@register_tokenizer("test_sigterm", config=SigtermTokenizerConfig)
def build_sigterm(cfg: Any, texts: Iterable[str] | None, workdir: Path | None) -> CharTokenizer:
    seen: set[str] = set()
    for i, chunk in enumerate(texts or []):
        seen.update(chunk)
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs during the sleep
    return CharTokenizer(sorted(seen))
