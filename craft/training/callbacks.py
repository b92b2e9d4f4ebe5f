"""Callbacks: the Trainer's extension points, the narrow view of the run they get, and built-ins.

A callback subclasses `Callback` and overrides the hooks it needs. Every hook receives a
`RunContext`, not the Trainer: `run.step`, `run.cfg`, `run.run_dir`, `run.model` (the plain model,
also `run.unwrapped_model`), `run.tokenizer`, `run.device`, `run.rank`, `run.is_main`, ...; call
`run.request_stop(reason)` to end the run after this step with a checkpoint. Hooks run on the main
process only unless `main_process_only = False`.

Hooks and their metrics:
- `on_train_start(run)`
- `on_step_end(run, metrics)` after every optimizer step: step, loss (this process), lr,
  grad_norm, tokens.
- `on_log(run, metrics)` every `training.log_interval` steps: step, loss (averaged over
  processes), lr, grad_norm, tokens, tokens_per_s, ms_per_step, elapsed_s.
- `on_eval(run, metrics)`: step, val_loss (averaged over processes), best_val_loss, eval_s.
- `on_checkpoint(run, path)` after a checkpoint directory is complete.
- `on_train_end(run, status)` with status "completed", "stopped" or "failed".

A callback that keeps state across a resume implements `state_dict()` / `load_state_dict()`
(JSON-serialisable); the Trainer stores it in `trainer_state.json`.

Register a plugin with `@craft.config.registry.register_callback("name")` on a builder
`build(config) -> Callback | None` and list it in `training.callbacks`; returning None disables it.
The built-ins (`craft.training.builtin_callbacks`, and `sample` in `craft.sample_callback` beside
generation) are registered by import path in `craft.config.components` and loaded when a run
builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft.config import registry
from craft.errors import ConfigError
from craft.training.state import TrainState


@dataclass(frozen=True)
class RunContext:
    """What a callback sees of a run. Fixed for the run, except `step` (read live)."""

    cfg: Any  # the validated config
    run_dir: Path
    model: Any  # the plain torch.nn.Module (no DDP / compile wrapper), e.g. for sampling
    tokenizer: Any  # None for random-token data
    device: Any  # torch.device
    rank: int
    is_main: bool
    start_step: int  # the step this invocation started (or resumed) from
    can_sample: bool  # the model runs on one process alone (not sharded by FSDP)
    console: Any  # the rich Console the run logs to
    request_stop: Callable[[str], None]  # end after this step, with a checkpoint (all processes)
    state: TrainState  # read only: step, tokens_seen, best/last validation loss

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def max_steps(self) -> int:
        return self.cfg.training.max_steps

    @property
    def run_name(self) -> str:
        return self.cfg.run.name

    @property
    def unwrapped_model(self) -> Any:
        """`model`, under the Trainer's name for it."""
        return self.model


class Callback:
    """Base class: every hook is a no-op."""

    #: Called only on the main process (rank 0) when True.
    main_process_only: bool = True

    def on_train_start(self, run: RunContext) -> None:
        pass

    def on_step_end(self, run: RunContext, metrics: dict[str, Any]) -> None:
        pass

    def on_log(self, run: RunContext, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, run: RunContext, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, run: RunContext, path: Path) -> None:
        pass

    def on_train_end(self, run: RunContext, status: str) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# Built-ins in the order they run. They are registered by import path in craft.config.components
# (so recipes are checked against them without importing torch): the classes are in
# craft.training.builtin_callbacks, and `sample` in craft.sample_callback, beside the generation
# code it drives. Each builder returns None when its config turns it off.
BUILTINS = ("progress", "metrics_jsonl", "trackers", "sample", "early_stopping", "loss_curve")


def build_callbacks(cfg: Any, extra: list[Callback]) -> list[tuple[str, Callback]]:
    """(name, callback) of the built-ins the config turns on, then of `training.callbacks`, then
    `extra` (named by their class)."""
    out: list[tuple[str, Callback]] = []
    configured = [n for n in cfg.training.callbacks if n not in BUILTINS]
    for name in [*BUILTINS, *configured]:
        try:
            comp = registry.get("callback", name)
        except registry.RegistryError:
            known = ", ".join(registry.names("callback"))
            raise ConfigError(
                f"training.callbacks: unknown callback {name!r}; registered: {known}"
            ) from None
        cb = comp.build_fn()(cfg)
        if cb is not None:
            out.append((name, cb))
    out += [(type(cb).__name__, cb) for cb in extra]
    return out
