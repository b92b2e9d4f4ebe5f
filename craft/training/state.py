"""`TrainState`: how far a run has come, the part of a checkpoint that is neither weights nor
optimizer, scheduler, data or RNG state (those parts carry their own `state_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Progress counters of a run; `state_dict()` is what `trainer_state.json` records of them."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed, over all processes
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    elapsed_s: float = 0.0  # seconds of training, resumed-from runs included (kept at saves)
    # This process's bookkeeping, not saved: the step last evaluated and saved, and where.
    evaluated_step: int = field(default=-1, compare=False)
    saved_step: int = field(default=-1, compare=False)
    last_checkpoint: Path | None = field(default=None, compare=False)

    def record_eval(self, val_loss: float) -> bool:
        """Note a validation loss of the current step; True when it is the best so far."""
        self.last_val_loss = val_loss
        self.evaluated_step = self.step
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "elapsed_s": self.elapsed_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters (the step a checkpoint was saved at counts as saved)."""
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best_val_loss = _optional_float(state.get("best_val_loss"))
        self.last_val_loss = _optional_float(state.get("last_val_loss"))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.saved_step = self.step


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
